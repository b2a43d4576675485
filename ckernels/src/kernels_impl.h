/* Private to the kernels: the repacked weight layout, the activation layout the
 * quantized kernels read, and the per-ISA function table dispatch.c fills.
 *
 * Quantized weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) are repacked once by
 * kiln_matrix_init so that one SIMD load feeds several blocks and several rows share
 * each activation load:
 *
 *   rows are grouped by KILN_RG (zero rows pad the last group); blocks by KILN_KG.
 *   A row group is [quants of every block group][d of every group][m of every group]
 *   (m only for Q4_1 and Q5_1), padded to 64 bytes.
 *   quants of block group g holding nt <= KILN_KG blocks, row r of the group
 *   (the type table's packed_block_bytes = bytes per block):
 *     Q4_*, IQ4_NL (16): nt * 16 bytes; byte 16*b + j holds element j (low nibble) and
 *           element j + 16 (high nibble) of block b, as in GGUF: the low nibbles of the
 *           nt * 16 bytes are the "lo halves" of the blocks, the high nibbles the "hi
 *           halves". IQ4_NL's nibbles are indices into kvalues_iq4nl.
 *     Q5_* (20): the nibbles as Q4_*, then the fifth bits as a bit plane: nt * 2 bytes
 *           for the lo halves (bit j of the 16-bit word b: element j of block b), then
 *           nt * 2 bytes for the hi halves (element 16 + j). Bit i of the plane thus
 *           belongs to nibble byte i, so a run of blocks expands with one bit -> byte
 *           step; the 5-bit storage is kept (generation is memory-bound).
 *     Q8_0 (32): nt * 16 bytes of lo halves (elements 0..15 of each block, + 128 as u8)
 *           then nt * 16 bytes of hi halves (elements 16..31, + 128).
 *   d (and m) of block group g: KILN_KG * KILN_RG fp16 values, [b][r], 0 for padding.
 *
 * Weights are therefore unsigned (u4, u5 or u8: IQ4_NL's as kvalues_iq4nl[q] + 128);
 * the signed zero point is folded into the activation side: each activation block
 * carries -offset * sum(q) (the type table's act_offset: 8 for Q4_0, 16 for Q5_0, 128
 * for Q8_0 and IQ4_NL, 0 for Q4_1 and Q5_1), added once per block and row, so the
 * integer dot of a block is exact: sum((w - offset) * a) = sum(w * a) - offset * sum(a).
 * (Kernels whose dot instruction is signed x signed, or that use the sign trick, turn
 * 8-bit weights back to signed instead and skip the term.)
 *
 * Activation layout (one per token, kiln_act_size bytes), block group g:
 *   qs  [g][2][KILN_KG * 16] int8: lo halves of the group's blocks, then hi halves
 *   dx  [g][KILN_KG * 4]   double: d of block b repeated in lanes 4b..4b+3 (double:
 *                          the kernels sum in double, see qgemm.c)
 *   off [g][KILN_KG * 4]   int32: -offset * sum(q of block b) in lanes 4b..4b+3
 *   sx  [g][KILN_KG * 4]   float: s of block b (Q8_1, for Q4_1 and Q5_1) in lanes 4b..4b+3
 * Padding blocks are zero everywhere, so they add exactly 0 (whatever weight values a
 * kernel makes of padding quants).
 * Four lanes per block match a 128-bit lane of the kernels, where after summing each
 * row's dot-product lanes, lane 4b + r holds (block b, row r): the order of the packed
 * scales. So one layout serves every ISA. */
#ifndef KILN_KERNELS_IMPL_H
#define KILN_KERNELS_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include "ggml_types.h"
#include "kernels.h"
#include "type_traits.h"

#define KILN_RG 4 /* rows per row group */
#define KILN_KG 4 /* blocks per block group */

/* Software prefetch distances of the weight streams in generation (qgemm, kgemm):
 * bytes ahead into L1, and into L2 far enough ahead to cover DRAM latency. */
#define KILN_PREFETCH 4096
#define KILN_PREFETCH_L2 16384

/* A view of a packed matrix, enough for the kernels. */
typedef struct {
    int type;
    int64_t rows, nb;    /* nb = blocks per row */
    int64_t ng;          /* block groups per row = ceil(nb / KILN_KG) */
    size_t qs_bytes;     /* quant bytes per row per full block group */
    size_t rg_size;      /* bytes per row group */
    const uint8_t *data; /* packed */
} kiln_packed_view;

/* Offsets inside one token's activation layout. */
typedef struct {
    int64_t ng;
    size_t off_qs, off_dx, off_off, off_sx, size;
} kiln_act_layout;

static inline kiln_act_layout kiln_act_layout_for(int64_t cols) {
    kiln_act_layout l;
    l.ng = (cols / QK + KILN_KG - 1) / KILN_KG;
    l.off_qs = 0;
    l.off_dx = l.off_qs + (size_t)l.ng * KILN_KG * QK;
    l.off_off = l.off_dx + (size_t)l.ng * KILN_KG * 4 * sizeof(double);
    l.off_sx = l.off_off + (size_t)l.ng * KILN_KG * 4 * sizeof(int32_t);
    l.size = l.off_sx + (size_t)l.ng * KILN_KG * 4 * sizeof(float);
    l.size = (l.size + 63) & ~(size_t)63;
    return l;
}

/* One token's activations in the kernel layout. */
typedef struct {
    const int8_t *qs;
    const double *dx;
    const int32_t *off;
    const float *sx;
} kiln_act;

static inline kiln_act kiln_act_at(const uint8_t *base, const kiln_act_layout *l) {
    kiln_act a;
    a.qs = (const int8_t *)(base + l->off_qs);
    a.dx = (const double *)(base + l->off_dx);
    a.off = (const int32_t *)(base + l->off_off);
    a.sx = (const float *)(base + l->off_sx);
    return a;
}

/* Quantized matrix kernel arguments: packed weights times n_tokens activations in
 * the layout above (token t at act + t * act_stride), y is (n_tokens, rows). */
typedef struct {
    kiln_packed_view w;
    const uint8_t *act;
    size_t act_stride;
    kiln_act_layout al;
    int n_tokens;
    float *y;
} kiln_qgemm_args;

/* Float matrix kernel arguments: W (rows, cols) of type F32/F16/BF16 in GGUF layout,
 * x (n_tokens, cols) float32, y (n_tokens, rows). */
typedef struct {
    int type;
    int64_t rows, cols;
    const void *w;
    const float *x;
    int n_tokens;
    float *y;
} kiln_fgemm_args;

/* Super-block matrix kernel arguments (the K types and IQ4_XS, isa/kgemm.c): W (rows,
 * cols) in GGUF layout, read in place from the file mapping; n_tokens rows of Q8_K
 * activation blocks (token t's cols / QK_K blocks at act + t * nb); y (n_tokens, rows). */
typedef struct {
    int type;
    int64_t rows, nb;      /* nb = super-blocks per row */
    size_t row_size;       /* bytes per weight row */
    const uint8_t *w;
    const block_q8_K *act;
    int n_tokens;
    float *y;
} kiln_kgemm_args;

/* The float part of one super-block's term, the one piece of floating-point code every
 * kgemm variant runs (the x86 ones as the same operations in vector registers,
 * kiln_kstep_lanes in isa/kgemm.c), in the same order (super-blocks 0, 1, ... of a row): isum is the
 * exact scale-weighted integer dot of the super-block, msum the exact mins term
 * sum_j m_j * bsum_j (0 for types without mins, whose dmin is 0). Each product
 * d * d_x is exact in double (an fp16 times a float: 11 + 24 significant bits); the
 * multiply by the integer and the accumulation round, as written, once each (the
 * build's -ffp-contract=off keeps them separate operations on every ISA). */
static inline double kiln_ksum_step(double acc, int32_t isum, int32_t msum, float d_w,
                                    float dmin_w, float d_x) {
    acc += (double)isum * ((double)d_w * (double)d_x);
    acc -= (double)msum * ((double)dmin_w * (double)d_x);
    return acc;
}

/* Element k of an F32/F16/BF16 row. */
static inline float kiln_weight_f32(int type, const void *row, int64_t k) {
    if (type == KILN_TYPE_F32) return ((const float *)row)[k];
    if (type == KILN_TYPE_F16) return kiln_fp16_to_fp32(((const uint16_t *)row)[k]);
    return kiln_bf16_to_fp32(((const uint16_t *)row)[k]);
}

/* One ISA variant's kernels. The row range is in row groups (quantized) or rows
 * (float); each output element is computed wholly by one call, in a fixed order. */
typedef struct {
    const char *name;
    void (*quantize_row_q8_0)(const float *x, block_q8_0 *y, int64_t n);
    void (*quantize_row_q8_1)(const float *x, block_q8_1 *y, int64_t n);
    void (*quantize_row_q8_K)(const float *x, block_q8_K *y, int64_t n);
    void (*qgemm)(const kiln_qgemm_args *a, int64_t rg0, int64_t rg1);
    void (*fgemm)(const kiln_fgemm_args *a, int64_t r0, int64_t r1);
    void (*kgemm)(const kiln_kgemm_args *a, int64_t r0, int64_t r1); /* rows [r0, r1) */
    uint64_t (*stream_sum)(const void *p, size_t n); /* bandwidth yardstick */
    void (*attn_scores_f16)(int R, double *scores, const float *const *q, const kiln_fp16 *keys_t,
                            int n_keys, int head_dim, int n_ctx_pad, double scale);
    void (*attn_values_f16)(int R, float *const *out, double *const *dout, const double *weights,
                            const kiln_fp16 *values, int n_keys, int head_dim, int stride,
                            int n_ctx_pad);
    double (*exp_shifted_f64)(double *a, int n, double *max_out);
    void (*softmax_f64)(double *a, int n);
    void (*swiglu_f32)(float *gate, const float *up, size_t n);
} kiln_isa_ops;

/* A 64-byte aligned buffer of at least size bytes owned by the pool, valid until the
 * next call (threadpool.c); NULL when out of memory. */
void *kiln_pool_scratch(kiln_pool *pool, size_t size);

/* The active variant's table (dispatch.c). */
const kiln_isa_ops *kiln_ops(void);

/* Sizes and repacking of the packed layout (matmul.c). */
size_t kiln_packed_size(int type, int64_t rows, int64_t cols);
void kiln_pack_rows(kiln_packed_view *v, uint8_t *dst, int type, int64_t rows, int64_t cols,
                    const void *src);
kiln_packed_view kiln_packed_view_of(int type, int64_t rows, int64_t cols, const void *packed);
/* Offset of block group g's d values and quants inside a row group. */
static inline const uint8_t *kiln_rg_qs(const kiln_packed_view *v, int64_t rg, int64_t g) {
    return v->data + (size_t)rg * v->rg_size + (size_t)g * KILN_RG * v->qs_bytes;
}
static inline const kiln_fp16 *kiln_rg_d(const kiln_packed_view *v, int64_t rg, int64_t g) {
    /* quants of the last (maybe partial) group are laid out with its real block count,
     * so the d region starts right after nb blocks' worth of quants per row */
    size_t qs_total = (size_t)KILN_RG * (size_t)v->nb * (v->qs_bytes / KILN_KG);
    return (const kiln_fp16 *)(v->data + (size_t)rg * v->rg_size + qs_total) +
           (size_t)g * KILN_RG * KILN_KG;
}
static inline const kiln_fp16 *kiln_rg_m(const kiln_packed_view *v, int64_t rg, int64_t g) {
    return kiln_rg_d(v, rg, 0) + (size_t)v->ng * KILN_RG * KILN_KG + (size_t)g * KILN_RG * KILN_KG;
}

/* Reads n bytes split over the pool's threads like a matmul splits its rows; returns
 * a checksum (so the reads cannot be optimized away). For benchmarks. */
uint64_t kiln_stream_read(kiln_pool *pool, const void *p, size_t n);

/* Fills one token's activation layout for weights of the repacked type wtype (its
 * activation type and zero point from the type table) from its float row, with the
 * given variant's Q8 quantizer; scratch holds cols / QK Q8_1 blocks. */
void kiln_quantize_act(const kiln_isa_ops *ops, int wtype, const float *x, int64_t cols,
                       const kiln_act_layout *l, uint8_t *dst, void *scratch);

#endif
