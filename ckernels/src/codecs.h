/* Scalar reference block codecs (codecs.c), bit-exact with formats/quants.py and with
 * ggml's *_ref quantizers. n is the element count and must be a multiple of QK for the
 * block types. These are the references every SIMD kernel is tested against. */
#ifndef KILN_CODECS_H
#define KILN_CODECS_H

#include <stdint.h>
#include "ggml_types.h"

void kiln_quantize_row_q4_0(const float *x, block_q4_0 *y, int64_t n);
void kiln_quantize_row_q4_1(const float *x, block_q4_1 *y, int64_t n);
void kiln_quantize_row_q8_0(const float *x, block_q8_0 *y, int64_t n);
void kiln_quantize_row_q8_1(const float *x, block_q8_1 *y, int64_t n);
void kiln_quantize_row_f16(const float *x, kiln_fp16 *y, int64_t n);
void kiln_quantize_row_bf16(const float *x, kiln_bf16 *y, int64_t n);

void kiln_dequantize_row_q4_0(const block_q4_0 *x, float *y, int64_t n);
void kiln_dequantize_row_q4_1(const block_q4_1 *x, float *y, int64_t n);
void kiln_dequantize_row_q8_0(const block_q8_0 *x, float *y, int64_t n);
void kiln_dequantize_row_q8_1(const block_q8_1 *x, float *y, int64_t n);
void kiln_dequantize_row_f16(const kiln_fp16 *x, float *y, int64_t n);
void kiln_dequantize_row_bf16(const kiln_bf16 *x, float *y, int64_t n);

/* By type id, through the type table (F32 is a copy). Returns 0, or -1 for a type the
 * table lacks or an n that is not a whole number of blocks. */
int kiln_quantize_row(int type, const float *x, void *y, int64_t n);
int kiln_dequantize_row(int type, const void *x, float *y, int64_t n);
/* Bytes in a row of n elements of this type, or 0 for an unknown type / bad n. */
int64_t kiln_row_size(int type, int64_t n);

#endif
