/* This variant's function table, which dispatch.c picks from. */
#include "isa.h"
#include "kernels_impl.h"

void KILN_FN(kiln_quantize_row_q8_0)(const float *x, block_q8_0 *y, int64_t n);
void KILN_FN(kiln_quantize_row_q8_1)(const float *x, block_q8_1 *y, int64_t n);
void KILN_FN(kiln_quantize_row_q8_K)(const float *x, block_q8_K *y, int64_t n);
void KILN_FN(kiln_kgemm)(const kiln_kgemm_args *a, int64_t r0, int64_t r1);
void KILN_FN(kiln_qgemm)(const kiln_qgemm_args *a, int64_t rg0, int64_t rg1);
void KILN_FN(kiln_fgemm)(const kiln_fgemm_args *a, int64_t r0, int64_t r1);
uint64_t KILN_FN(kiln_stream_sum)(const void *p, size_t n);
void KILN_FN(kiln_attn_scores_f16)(int R, double *scores, const float *const *q,
                                   const kiln_fp16 *keys_t, int n_keys, int head_dim,
                                   int n_ctx_pad, double scale);
void KILN_FN(kiln_attn_values_f16)(int R, float *const *out, double *const *dout,
                                   const double *weights, const kiln_fp16 *values, int n_keys,
                                   int head_dim, int stride, int n_ctx_pad);
double KILN_FN(kiln_exp_shifted_f64)(double *a, int n, double *max_out);
void KILN_FN(kiln_softmax_f64)(double *a, int n);
void KILN_FN(kiln_swiglu_f32)(float *gate, const float *up, size_t n);

const kiln_isa_ops KILN_FN(kiln_ops) = {
    .name = KILN_STR(KILN_ISA),
    .quantize_row_q8_0 = KILN_FN(kiln_quantize_row_q8_0),
    .quantize_row_q8_1 = KILN_FN(kiln_quantize_row_q8_1),
    .quantize_row_q8_K = KILN_FN(kiln_quantize_row_q8_K),
    .qgemm = KILN_FN(kiln_qgemm),
    .kgemm = KILN_FN(kiln_kgemm),
    .fgemm = KILN_FN(kiln_fgemm),
    .stream_sum = KILN_FN(kiln_stream_sum),
    .attn_scores_f16 = KILN_FN(kiln_attn_scores_f16),
    .attn_values_f16 = KILN_FN(kiln_attn_values_f16),
    .exp_shifted_f64 = KILN_FN(kiln_exp_shifted_f64),
    .softmax_f64 = KILN_FN(kiln_softmax_f64),
    .swiglu_f32 = KILN_FN(kiln_swiglu_f32),
};
