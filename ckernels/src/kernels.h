/* The kernel API the forward pass uses. It knows weight matrices, activations and
 * threads; it knows nothing of transformers.
 *
 * Implemented in ckernels/src (threadpool.c, matmul.c, dispatch.c) over the per-ISA
 * sources in ckernels/src/isa/. */
#ifndef KILN_KERNELS_H
#define KILN_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include "ggml_types.h"

/* ---- thread pool: persistent workers, created once per model ---- */
typedef struct kiln_pool kiln_pool;

/* The most threads a pool has: per-thread partial results live in arrays of this size. */
#define KILN_MAX_THREADS 64

/* 1 <= n_threads <= KILN_MAX_THREADS (the caller's thread is worker 0). NULL on failure
 * or for a count outside that range. */
kiln_pool *kiln_pool_create(int n_threads);
void kiln_pool_free(kiln_pool *pool);
int kiln_pool_size(const kiln_pool *pool);

/* Calls fn(ctx, ith, nth) once on each of the nth = kiln_pool_size() threads and
 * returns when all have finished. Work split by ith alone is what makes results
 * independent of timing. */
typedef void (*kiln_task_fn)(void *ctx, int ith, int nth);
void kiln_pool_run(kiln_pool *pool, kiln_task_fn fn, void *ctx);

/* Items [*i0, *i1) of n for thread ith of nth: contiguous shares, so the same item
 * always gets the same arithmetic whichever thread runs it. */
static inline void kiln_share(int64_t n, int ith, int nth, int64_t *i0, int64_t *i1) {
    *i0 = n * ith / nth;
    *i1 = n * (ith + 1) / nth;
}

/* ---- weight matrices ---- */
/* rows = output features (ggml ne[1]), cols = input features (ne[0]); data points at
 * rows * row_size bytes in GGUF layout (usually inside the mmap, not owned). A matrix
 * may keep a repacked copy of its blocks for faster kernels; resident memory must stay
 * about one copy of the weights. */
typedef struct kiln_matrix {
    int type;             /* enum kiln_ggml_type: a weight type of the type table */
    int64_t rows, cols;
    const void *data;     /* GGUF row-major blocks */
    void *packed;         /* kernel-private layout, or NULL; owned */
    size_t packed_size;
} kiln_matrix;

/* Returns 0, or -1 (a type that is not a weight type of the table, cols not a whole
 * number of blocks, out of memory). */
int kiln_matrix_init(kiln_matrix *m, int type, int64_t rows, int64_t cols, const void *data);
/* (For the repacked types, those with m->packed set, the kernels read only m->packed
 * after init, so a caller whose data lies in a file mapping may release those pages,
 * e.g. madvise(MADV_DONTNEED), to keep resident memory at one copy; the others, the
 * float types and the super-block types (Q2_K .. Q6_K, IQ4_XS), keep reading m->data.) */
void kiln_matrix_free(kiln_matrix *m);

/* Row `row` of m dequantized into y (m->cols floats): the bits the scalar codec gives
 * for the row's GGUF blocks, read back from the packed copy when m has one (so a tied
 * token_embd is looked up without touching the file's pages again), else from m->data. */
void kiln_matrix_row(const kiln_matrix *m, int64_t row, float *y);

/* y[t][r] = sum_c W[r][c] * x[t][c] for t < n_tokens, r < rows.
 * x is (n_tokens, cols) float32, y is (n_tokens, rows) float32. Activations are
 * quantized on the fly to the weight type's activation type in the table (Q8_0; Q8_1
 * for Q4_1 and Q5_1 weights; Q8_K for the super-block types); F32/F16/BF16 weights use
 * float activations. Rows are split over the pool's threads; every output element is
 * computed by exactly one thread in a fixed order, so results do not depend on the
 * thread count. n_tokens == 1 is the token-generation (matrix x vector) path. */
void kiln_matmul(kiln_pool *pool, const kiln_matrix *w, const float *x, int n_tokens, float *y);

/* ys[i] = x W_i^T for n matrices with the same cols (e.g. Q, K, V or gate, up): one
 * activation quantization and one pass of the pool for all, so small matrices do not
 * each pay a wake-up. Results are identical to n kiln_matmul calls. */
void kiln_matmul_multi(kiln_pool *pool, int n, const kiln_matrix *const *ws, const float *x,
                       int n_tokens, float *const *ys);

/* ---- attention over an fp16 KV cache ---- */
#define KILN_ATT_BLOCK 16 /* keys scored / value dimensions summed per step */
#define KILN_ATT_MAX_HEAD_DIM 256 /* largest head size (engine/config.py checks it) */
#define KILN_ATT_TILE 4   /* most queries scored per pass over the keys (the kernels are
                                 * instantiated for 1..4) */

/* scores[r][p] = scale * q[r] . key p for r < R (1 .. KILN_ATT_TILE), p < n_keys, in double.
 * keys_t is (head_dim, n_ctx_pad) halves, key p of dimension d at d * n_ctx_pad + p;
 * score rows are n_ctx_pad apart and are written in whole KILN_ATT_BLOCKs, so n_ctx_pad
 * must be a multiple of KILN_ATT_BLOCK. */
void kiln_attn_scores_f16(int R, double *scores, const float *const *q, const kiln_fp16 *keys_t,
                          int n_keys, int head_dim, int n_ctx_pad, double scale);
/* out[r][d] = sum over p < n_keys of weights[r][p] * values[p * stride + d] for r < R
 * (1 .. KILN_ATT_TILE), d < head_dim; weight rows are n_ctx_pad apart and must be 0
 * past each query's own keys. Summed in double and rounded to float into out, or, when
 * dout is not NULL, left in double in dout (out unused). */
void kiln_attn_values_f16(int R, float *const *out, double *const *dout, const double *weights,
                          const kiln_fp16 *values, int n_keys, int head_dim, int stride,
                          int n_ctx_pad);

/* ---- float activations, in double, rounded once: the same bits on every ISA ---- */
/* a[p] = e^(a[p] - max) over p < n, max the largest a[p] (in *max_out); returns the sum */
double kiln_exp_shifted_f64(double *a, int n, double *max_out);
/* a = softmax(a) over p < n */
void kiln_softmax_f64(double *a, int n);
/* gate[i] = silu(gate[i]) * up[i] for i < n (SwiGLU) */
void kiln_swiglu_f32(float *gate, const float *up, size_t n);

/* ---- ISA dispatch ---- */
const char *kiln_active_isa(void);
/* Names of every variant kiln knows, on any architecture (isa_variants.h). Returns the
 * count; at most max_names are stored. */
int kiln_known_isas(const char **names, int max_names);
/* Names of the variants this CPU supports (and this build contains), best last. */
int kiln_supported_isas(const char **names, int max_names);
/* Force a variant; returns 0, or -1 if the CPU or build lacks it. */
int kiln_set_isa(const char *name);

#endif
