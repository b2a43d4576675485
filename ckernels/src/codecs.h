/* Scalar reference block codecs (codecs.c), bit-exact with formats/quants.py and with
 * ggml's *_ref quantizers. n is the element count and must be a multiple of QK for the
 * block types. These are the references every SIMD kernel is tested against. */
#ifndef KILN_CODECS_H
#define KILN_CODECS_H

#include <stdint.h>
#include "ggml_types.h"

void kiln_quantize_row_q4_0(const float *x, block_q4_0 *y, int64_t n);
void kiln_quantize_row_q4_1(const float *x, block_q4_1 *y, int64_t n);
void kiln_quantize_row_q5_0(const float *x, block_q5_0 *y, int64_t n);
void kiln_quantize_row_q5_1(const float *x, block_q5_1 *y, int64_t n);
void kiln_quantize_row_q8_0(const float *x, block_q8_0 *y, int64_t n);
void kiln_quantize_row_q8_1(const float *x, block_q8_1 *y, int64_t n);
void kiln_quantize_row_f16(const float *x, kiln_fp16 *y, int64_t n);
void kiln_quantize_row_bf16(const float *x, kiln_bf16 *y, int64_t n);

void kiln_dequantize_row_q4_0(const block_q4_0 *x, float *y, int64_t n);
void kiln_dequantize_row_q4_1(const block_q4_1 *x, float *y, int64_t n);
void kiln_dequantize_row_q5_0(const block_q5_0 *x, float *y, int64_t n);
void kiln_dequantize_row_q5_1(const block_q5_1 *x, float *y, int64_t n);
void kiln_dequantize_row_q8_0(const block_q8_0 *x, float *y, int64_t n);
void kiln_dequantize_row_q8_1(const block_q8_1 *x, float *y, int64_t n);
void kiln_dequantize_row_f16(const kiln_fp16 *x, float *y, int64_t n);
void kiln_dequantize_row_bf16(const kiln_bf16 *x, float *y, int64_t n);

/* IQ4_NL and IQ4_XS (codecs_iq.c): indices into ggml's kvalues_iq4nl grid; quantizing is
 * ggml's quantize_iq4_nl / quantize_iq4_xs without an importance matrix (the scale
 * search of ggml_quantize_chunk). n a multiple of QK (IQ4_NL) or QK_K (IQ4_XS). */
extern const int8_t kiln_kvalues_iq4nl[16];  /* the grid, ascending */
void kiln_quantize_row_iq4_nl(const float *x, block_iq4_nl *y, int64_t n);
void kiln_quantize_row_iq4_xs(const float *x, block_iq4_xs *y, int64_t n);
void kiln_dequantize_row_iq4_nl(const block_iq4_nl *x, float *y, int64_t n);
void kiln_dequantize_row_iq4_xs(const block_iq4_xs *x, float *y, int64_t n);

/* By type id, through the type table (F32 is a copy). Returns 0, or -1 for a type the
 * table lacks or an n that is not a whole number of blocks. */
int kiln_quantize_row(int type, const float *x, void *y, int64_t n);
int kiln_dequantize_row(int type, const void *x, float *y, int64_t n);
/* Bytes in a row of n elements of this type, or 0 for an unknown type / bad n. */
int64_t kiln_row_size(int type, int64_t n);

#endif
