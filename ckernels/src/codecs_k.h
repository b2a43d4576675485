/* Scalar reference codecs of the K types (codecs_k.c): Q2_K .. Q6_K super-blocks and the
 * Q8_K activation format, bit-exact with formats/kquants.py and with ggml's
 * quantize_row_*_ref / dequantize_row_*. n is the element count, a multiple of QK_K.
 * kiln_quantize_row_q8_K is the reference every SIMD Q8_K activation quantizer is
 * tested against. */
#ifndef KILN_CODECS_K_H
#define KILN_CODECS_K_H

#include <stdint.h>
#include "ggml_types.h"

void kiln_quantize_row_q2_K(const float *x, block_q2_K *y, int64_t n);
void kiln_quantize_row_q3_K(const float *x, block_q3_K *y, int64_t n);
void kiln_quantize_row_q4_K(const float *x, block_q4_K *y, int64_t n);
void kiln_quantize_row_q5_K(const float *x, block_q5_K *y, int64_t n);
void kiln_quantize_row_q6_K(const float *x, block_q6_K *y, int64_t n);
/* q = nearest_int(-127 / max * x), max the first value of largest magnitude; d = 1 /
 * that scale (float32); bsums the sums of q per 16. An all-zero block is all zeros. */
void kiln_quantize_row_q8_K(const float *x, block_q8_K *y, int64_t n);

void kiln_dequantize_row_q2_K(const block_q2_K *x, float *y, int64_t n);
void kiln_dequantize_row_q3_K(const block_q3_K *x, float *y, int64_t n);
void kiln_dequantize_row_q4_K(const block_q4_K *x, float *y, int64_t n);
void kiln_dequantize_row_q5_K(const block_q5_K *x, float *y, int64_t n);
void kiln_dequantize_row_q6_K(const block_q6_K *x, float *y, int64_t n);
void kiln_dequantize_row_q8_K(const block_q8_K *x, float *y, int64_t n);

/* ggml's rounding of the K quantizers: add 1.5 * 2^23 and read the low mantissa bits,
 * which rounds halves to even (|v| < 2^22; beyond, the same bits as ggml's). */
static inline int kiln_nearest_int(float v) {
    const float f = v + 12582912.0f;
    int32_t i;
    memcpy(&i, &f, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

/* The packed sub-block scales, read the same way by the codecs and the kernels
 * (isa/kgemm.c). The 6-bit scale and min of sub-block j of a Q4_K / Q5_K scales[12] (ggml's
 * get_scale_min_k4): 0-3 in the low 6 bits of bytes 0-3 / 4-7; 4-7 as the nibbles of
 * bytes 8-11 with their top 2 bits in bits 6-7 of bytes 0-3 / 4-7. */
static inline void kiln_scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* The 6-bit scale j (0..63, offset 32) of a Q3_K scales[12]: low nibbles of 0-7 in the
 * low nibbles of bytes 0-7, of 8-15 in their high nibbles; the top 2 bits of scale j at
 * bits 2 * (j / 4) of byte 8 + j % 4. */
static inline int kiln_scale_q3(int j, const uint8_t *s) {
    const int lo = j < 8 ? s[j] & 0xF : s[j - 8] >> 4;
    return lo | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4);
}

#endif
