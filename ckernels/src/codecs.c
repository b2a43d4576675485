/* Scalar reference block codecs, step for step ggml's quantize_row_*_ref and
 * dequantize_row_* (ggml-quants.c), so results are bit-exact with ggml and with the
 * NumPy reference in formats/quants.py. */
#include <math.h>
#include <float.h>
#include "codecs.h"
#include "codecs_impl.h"
#include "type_traits.h"

void kiln_quantize_row_q4_0(const float *x, block_q4_0 *y, int64_t n) {
    const int64_t nb = n / QK;
    for (int64_t i = 0; i < nb; i++) {
        /* the first element of largest magnitude, with its sign: maps to q = 0 */
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK; j++) {
            const float v = x[i * QK + j];
            if (amax < fabsf(v)) {
                amax = fabsf(v);
                max = v;
            }
        }
        const float d = max / -8;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = kiln_fp32_to_fp16(d);
        for (int j = 0; j < QK / 2; j++) {
            const float x0 = x[i * QK + j] * id;
            const float x1 = x[i * QK + QK / 2 + j] * id;
            const uint8_t q0 = MIN(15, (int8_t)(x0 + 8.5f));
            const uint8_t q1 = MIN(15, (int8_t)(x1 + 8.5f));
            y[i].qs[j] = q0 | (uint8_t)(q1 << 4);
        }
    }
}

void kiln_quantize_row_q4_1(const float *x, block_q4_1 *y, int64_t n) {
    const int64_t nb = n / QK;
    for (int64_t i = 0; i < nb; i++) {
        float min = FLT_MAX, max = -FLT_MAX;
        for (int j = 0; j < QK; j++) {
            const float v = x[i * QK + j];
            if (v < min) min = v;
            if (v > max) max = v;
        }
        const float d = (max - min) / 15;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = kiln_fp32_to_fp16(d);
        y[i].m = kiln_fp32_to_fp16(min);
        for (int j = 0; j < QK / 2; j++) {
            const float x0 = (x[i * QK + j] - min) * id;
            const float x1 = (x[i * QK + QK / 2 + j] - min) * id;
            const uint8_t q0 = MIN(15, (int8_t)(x0 + 0.5f));
            const uint8_t q1 = MIN(15, (int8_t)(x1 + 0.5f));
            y[i].qs[j] = q0 | (uint8_t)(q1 << 4);
        }
    }
}

/* The 5-bit quants of a Q5_0 / Q5_1 block: low nibbles packed as in Q4_0, bit 4 of
 * element j at bit j of qh (a little-endian uint32). */
static inline void q5_store(const uint8_t q[QK], uint8_t qh[4], uint8_t qs[QK / 2]) {
    uint32_t h = 0;
    for (int j = 0; j < QK / 2; j++) {
        qs[j] = (uint8_t)((q[j] & 0x0F) | ((q[j + QK / 2] & 0x0F) << 4));
        h |= (uint32_t)(q[j] >> 4) << j;
        h |= (uint32_t)(q[j + QK / 2] >> 4) << (j + QK / 2);
    }
    for (int k = 0; k < 4; k++) qh[k] = (uint8_t)(h >> (8 * k));
}

static inline void q5_load(const uint8_t qh[4], const uint8_t qs[QK / 2], int q[QK]) {
    const uint32_t h = (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
    for (int j = 0; j < QK / 2; j++) {
        q[j] = (qs[j] & 0x0F) | (int)((h >> j) & 1) << 4;
        q[j + QK / 2] = (qs[j] >> 4) | (int)((h >> (j + QK / 2)) & 1) << 4;
    }
}

void kiln_quantize_row_q5_0(const float *x, block_q5_0 *y, int64_t n) {
    const int64_t nb = n / QK;
    for (int64_t i = 0; i < nb; i++) {
        /* as Q4_0: the first element of largest magnitude, with its sign, maps to q = 0 */
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK; j++) {
            const float v = x[i * QK + j];
            if (amax < fabsf(v)) {
                amax = fabsf(v);
                max = v;
            }
        }
        const float d = max / -16;
        const float id = d ? 1.0f / d : 0.0f;
        uint8_t q[QK];
        for (int j = 0; j < QK; j++) q[j] = (uint8_t)MIN(31, (int8_t)(x[i * QK + j] * id + 16.5f));
        y[i].d = kiln_fp32_to_fp16(d);
        q5_store(q, y[i].qh, y[i].qs);
    }
}

void kiln_quantize_row_q5_1(const float *x, block_q5_1 *y, int64_t n) {
    const int64_t nb = n / QK;
    for (int64_t i = 0; i < nb; i++) {
        float min = FLT_MAX, max = -FLT_MAX;
        for (int j = 0; j < QK; j++) {
            const float v = x[i * QK + j];
            if (v < min) min = v;
            if (v > max) max = v;
        }
        const float d = (max - min) / 31;
        const float id = d ? 1.0f / d : 0.0f;
        uint8_t q[QK];
        /* no clamp, as in ggml: (x - min) * id + 0.5 stays below 32 */
        for (int j = 0; j < QK; j++) q[j] = (uint8_t)((x[i * QK + j] - min) * id + 0.5f);
        y[i].d = kiln_fp32_to_fp16(d);
        y[i].m = kiln_fp32_to_fp16(min);
        q5_store(q, y[i].qh, y[i].qs);
    }
}

/* Q8_0 and Q8_1 share the scale and the rounding (roundf: halves away from zero). */
static inline float q8_block(const float *x, int8_t *qs) {
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) amax = MAX(amax, fabsf(x[j]));
    const float d = amax / 127;
    const float id = d ? 1.0f / d : 0.0f;
    for (int j = 0; j < QK; j++) qs[j] = (int8_t)roundf(x[j] * id);
    return d;
}

void kiln_quantize_row_q8_0(const float *x, block_q8_0 *y, int64_t n) {
    const int64_t nb = n / QK;
    for (int64_t i = 0; i < nb; i++) y[i].d = kiln_fp32_to_fp16(q8_block(x + i * QK, y[i].qs));
}

void kiln_quantize_row_q8_1(const float *x, block_q8_1 *y, int64_t n) {
    const int64_t nb = n / QK;
    for (int64_t i = 0; i < nb; i++) {
        const float d = q8_block(x + i * QK, y[i].qs);
        int sum = 0;
        for (int j = 0; j < QK; j++) sum += y[i].qs[j];
        y[i].d = kiln_fp32_to_fp16(d);
        y[i].s = kiln_fp32_to_fp16((float)sum * d);  /* lets Q4_1 dots add m * s per block */
    }
}

void kiln_quantize_row_f16(const float *x, kiln_fp16 *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = kiln_fp32_to_fp16(x[i]);
}

void kiln_quantize_row_bf16(const float *x, kiln_bf16 *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = kiln_fp32_to_bf16(x[i]);
}

void kiln_dequantize_row_q4_0(const block_q4_0 *x, float *y, int64_t n) {
    const int64_t nb = n / QK;
    for (int64_t i = 0; i < nb; i++) {
        const float d = kiln_fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK / 2; j++) {
            y[i * QK + j] = (float)((x[i].qs[j] & 0x0F) - 8) * d;
            y[i * QK + QK / 2 + j] = (float)((x[i].qs[j] >> 4) - 8) * d;
        }
    }
}

void kiln_dequantize_row_q4_1(const block_q4_1 *x, float *y, int64_t n) {
    const int64_t nb = n / QK;
    for (int64_t i = 0; i < nb; i++) {
        const float d = kiln_fp16_to_fp32(x[i].d);
        const float m = kiln_fp16_to_fp32(x[i].m);
        for (int j = 0; j < QK / 2; j++) {
            y[i * QK + j] = (float)(x[i].qs[j] & 0x0F) * d + m;
            y[i * QK + QK / 2 + j] = (float)(x[i].qs[j] >> 4) * d + m;
        }
    }
}

void kiln_dequantize_row_q5_0(const block_q5_0 *x, float *y, int64_t n) {
    const int64_t nb = n / QK;
    for (int64_t i = 0; i < nb; i++) {
        const float d = kiln_fp16_to_fp32(x[i].d);
        int q[QK];
        q5_load(x[i].qh, x[i].qs, q);
        for (int j = 0; j < QK; j++) y[i * QK + j] = (float)(q[j] - 16) * d;
    }
}

void kiln_dequantize_row_q5_1(const block_q5_1 *x, float *y, int64_t n) {
    const int64_t nb = n / QK;
    for (int64_t i = 0; i < nb; i++) {
        const float d = kiln_fp16_to_fp32(x[i].d);
        const float m = kiln_fp16_to_fp32(x[i].m);
        int q[QK];
        q5_load(x[i].qh, x[i].qs, q);
        for (int j = 0; j < QK; j++) y[i * QK + j] = (float)q[j] * d + m;
    }
}

void kiln_dequantize_row_q8_0(const block_q8_0 *x, float *y, int64_t n) {
    const int64_t nb = n / QK;
    for (int64_t i = 0; i < nb; i++) {
        const float d = kiln_fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK; j++) y[i * QK + j] = (float)x[i].qs[j] * d;
    }
}

void kiln_dequantize_row_q8_1(const block_q8_1 *x, float *y, int64_t n) {
    const int64_t nb = n / QK;
    for (int64_t i = 0; i < nb; i++) {
        const float d = kiln_fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK; j++) y[i * QK + j] = (float)x[i].qs[j] * d;
    }
}

void kiln_dequantize_row_f16(const kiln_fp16 *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = kiln_fp16_to_fp32(x[i]);
}

void kiln_dequantize_row_bf16(const kiln_bf16 *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = kiln_bf16_to_fp32(x[i]);
}

int64_t kiln_row_size(int type, int64_t n) {
    const kiln_type_traits *tt = kiln_type_traits_of(type);
    if (!tt || n < 0 || n % tt->block_size) return 0;
    return n / tt->block_size * tt->type_size;
}

int kiln_quantize_row(int type, const float *x, void *y, int64_t n) {
    const kiln_type_traits *tt = kiln_type_traits_of(type);
    if (!tt || (kiln_row_size(type, n) == 0 && n != 0)) return -1;
    tt->quantize_row(x, y, n);
    return 0;
}

int kiln_dequantize_row(int type, const void *x, float *y, int64_t n) {
    const kiln_type_traits *tt = kiln_type_traits_of(type);
    if (!tt || (kiln_row_size(type, n) == 0 && n != 0)) return -1;
    tt->dequantize_row(x, y, n);
    return 0;
}
