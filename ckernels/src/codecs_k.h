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

#endif
