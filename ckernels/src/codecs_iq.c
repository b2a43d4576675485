/* IQ4_NL and IQ4_XS scalar reference codecs: 4-bit indices into a fixed non-uniform grid,
 * one scale per 32 elements. Quantizing follows ggml's quantize_iq4_nl / quantize_iq4_xs
 * without an importance matrix step for step (float32, sums accumulated in element
 * order), so results are bit-exact with ggml and with formats/iquants.py. */
#include <math.h>
#include <string.h>
#include "codecs.h"
#include "codecs_impl.h"

const int8_t kiln_kvalues_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                       1, 13, 25, 38, 53, 69, 89, 113};

#define IQ4_NTRY 7               /* trial scales (itry - 127) / max, itry in [-7, 7] */
#define IQ4_XS_SUB (QK_K / QK)   /* sub-blocks per IQ4_XS super-block */

/* The nearest grid point's index; exactly between two, the upper one (float32 distances). */
static inline uint8_t best_index(float x) {
    const int8_t *v = kiln_kvalues_iq4nl;
    if (x <= v[0]) return 0;
    if (x >= v[15]) return 15;
    int lo = 0, hi = 15;  /* v[lo] <= x < v[hi] */
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (x < v[mid]) hi = mid;
        else lo = mid;
    }
    return (uint8_t)(x - v[hi - 1] < v[hi] - x ? hi - 1 : hi);
}

/* Round half to even through float32's mantissa, as ggml's nearest_int does. */
static inline int nearest_int(float f) {
    const float v = f + 12582912.0f;
    int32_t i;
    memcpy(&i, &v, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

/* sum(w*q*x) and sum(w*q*q), w = x^2, q the grid value nearest inv * x. */
static inline void weighted_sums(const float *x, float inv, float *sumqx, float *sumq2) {
    float sqx = 0.0f, sq2 = 0.0f;
    for (int j = 0; j < QK; j++) {
        const float q = kiln_kvalues_iq4nl[best_index(inv * x[j])];
        const float w = x[j] * x[j];
        sqx += w * q * x[j];
        sq2 += w * q * q;
    }
    *sumqx = sqx;
    *sumq2 = sq2;
}

/* The float32 scale of one block of QK: from max/127 (max the first element of largest
 * magnitude), keep the trial scale of best weighted fit, sumqx^2/sumq2 compared without
 * dividing. 0 for an all-zero block. */
static float block_scale(const float *x) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK; j++) {
        if (fabsf(x[j]) > amax) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    if (amax < GROUP_MAX_EPS) return 0.0f;
    float d = -max / kiln_kvalues_iq4nl[0];
    float sumqx, sumq2;
    weighted_sums(x, 1 / d, &sumqx, &sumq2);
    d = sumq2 > 0 ? sumqx / sumq2 : 0.0f;
    float best = d * sumqx;
    for (int itry = -IQ4_NTRY; itry <= IQ4_NTRY; itry++) {
        weighted_sums(x, (itry + kiln_kvalues_iq4nl[0]) / max, &sumqx, &sumq2);
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    return d;
}

/* Indices for inv * x, packed as in Q4_0: element j low nibble, j + 16 high nibble. */
static void store_indices(const float *x, float inv, uint8_t qs[QK / 2]) {
    for (int j = 0; j < QK / 2; j++)
        qs[j] = (uint8_t)(best_index(inv * x[j]) | best_index(inv * x[j + QK / 2]) << 4);
}

void kiln_quantize_row_iq4_nl(const float *x, block_iq4_nl *y, int64_t n) {
    const int64_t nb = n / QK;
    for (int64_t i = 0; i < nb; i++) {
        const float d = block_scale(x + i * QK);
        y[i].d = kiln_fp32_to_fp16(d);
        /* the indices are re-chosen for the final float32 (not fp16-rounded) scale */
        store_indices(x + i * QK, d ? 1 / d : 0.0f, y[i].qs);
    }
}

void kiln_quantize_row_iq4_xs(const float *x, block_iq4_xs *y, int64_t n) {
    const int64_t nb = n / QK_K;
    for (int64_t i = 0; i < nb; i++) {
        const float *xb = x + i * QK_K;
        float scales[IQ4_XS_SUB];
        float amax = 0.0f, max = 0.0f;
        for (int ib = 0; ib < IQ4_XS_SUB; ib++) {
            scales[ib] = block_scale(xb + ib * QK);
            if (fabsf(scales[ib]) > amax) {
                amax = fabsf(scales[ib]);
                max = scales[ib];
            }
        }
        /* the sub-scale of largest magnitude maps to -32; each becomes a 6-bit l */
        const float d = -max / 32;
        const float id = d ? 1 / d : 0.0f;
        y[i].d = kiln_fp32_to_fp16(d);
        uint16_t scales_h = 0;
        for (int ib = 0; ib < IQ4_XS_SUB; ib++) {
            const int l = MAX(-32, MIN(31, nearest_int(id * scales[ib])));
            const float dl = d * l;
            store_indices(xb + ib * QK, dl ? 1 / dl : 0.0f, y[i].qs + ib * (QK / 2));
            const int u = l + 32;
            if (ib % 2 == 0) y[i].scales_l[ib / 2] = (uint8_t)(u & 0x0F);
            else y[i].scales_l[ib / 2] |= (uint8_t)((u & 0x0F) << 4);
            scales_h |= (uint16_t)((u >> 4) << (2 * ib));
        }
        y[i].scales_h = scales_h;
    }
}

void kiln_dequantize_row_iq4_nl(const block_iq4_nl *x, float *y, int64_t n) {
    const int64_t nb = n / QK;
    for (int64_t i = 0; i < nb; i++) {
        const float d = kiln_fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK / 2; j++) {
            y[i * QK + j] = d * kiln_kvalues_iq4nl[x[i].qs[j] & 0x0F];
            y[i * QK + QK / 2 + j] = d * kiln_kvalues_iq4nl[x[i].qs[j] >> 4];
        }
    }
}

void kiln_dequantize_row_iq4_xs(const block_iq4_xs *x, float *y, int64_t n) {
    const int64_t nb = n / QK_K;
    for (int64_t i = 0; i < nb; i++) {
        const float d = kiln_fp16_to_fp32(x[i].d);
        for (int ib = 0; ib < IQ4_XS_SUB; ib++) {
            const int ls = ((x[i].scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0F) |
                           ((x[i].scales_h >> (2 * ib)) & 3) << 4;
            const float dl = d * (ls - 32);
            const uint8_t *qs = x[i].qs + ib * (QK / 2);
            float *yb = y + i * QK_K + ib * QK;
            for (int j = 0; j < QK / 2; j++) {
                yb[j] = dl * kiln_kvalues_iq4nl[qs[j] & 0x0F];
                yb[j + QK / 2] = dl * kiln_kvalues_iq4nl[qs[j] >> 4];
            }
        }
    }
}
