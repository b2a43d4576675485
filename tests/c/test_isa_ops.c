/* The kernels of the kiln_isa_ops table other than the matrix products (those are in
 * test_kernels.c): each variant against the scalar variant, bit for bit, at sizes that
 * hit every vector width's full steps and tails. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codecs.h"
#include "harness.h"

#define N_OF(a) (int)(sizeof(a) / sizeof((a)[0]))

/* ---- quantize_row_q8_0 / quantize_row_q8_1 ---- */

/* Random blocks, with the cases a quantizer can get wrong planted in the first ones:
 * .5 ties (roundf goes away from zero), an all-zero block (d = 0), a negative absmax,
 * and values small enough for d to be an fp16 subnormal. */
static void make_quant_input(float *x, int nb) {
    rnd_floats(x, (size_t)nb * QK, 3.0f);
    for (int b = 0; b < nb && b < 4; b++)
        for (int j = 0; j < QK; j++) {
            float *v = &x[b * QK + j];
            if (b == 0) *v = j == 0 ? 127.0f : j - 16.5f;
            if (b == 1) *v = 0.0f;
            if (b == 2) *v = j == 5 ? -100.0f : *v;
            if (b == 3) *v *= 1e-6f;
        }
}

/* The variant's quantizer and scalar's on nb blocks; one block past the row is
 * filled alike beforehand and must be left alone. */
static void check_quantize(const kiln_isa_ops *ops, const kiln_isa_ops *scalar, int nb) {
    float *x = malloc(sizeof(float) * (size_t)nb * QK);
    make_quant_input(x, nb);
    char where[64];
    snprintf(where, sizeof where, "blocks %d", nb);
    size_t n0 = sizeof(block_q8_0) * (size_t)(nb + 1), n1 = sizeof(block_q8_1) * (size_t)(nb + 1);
    block_q8_0 *a0 = malloc(n0), *b0 = malloc(n0), *r0 = malloc(n0);
    block_q8_1 *a1 = malloc(n1), *b1 = malloc(n1), *r1 = malloc(n1);
    memset(a0, 0xa5, n0), memset(b0, 0xa5, n0), memset(r0, 0xa5, n0);
    memset(a1, 0xa5, n1), memset(b1, 0xa5, n1), memset(r1, 0xa5, n1);
    ops->quantize_row_q8_0(x, a0, (int64_t)nb * QK);
    scalar->quantize_row_q8_0(x, b0, (int64_t)nb * QK);
    kiln_quantize_row_q8_0(x, r0, (int64_t)nb * QK); /* the reference codec (codecs.c) */
    ops->quantize_row_q8_1(x, a1, (int64_t)nb * QK);
    scalar->quantize_row_q8_1(x, b1, (int64_t)nb * QK);
    kiln_quantize_row_q8_1(x, r1, (int64_t)nb * QK);
    check_bits("quantize_row_q8_0", ops->name, a0, b0, n0, 1, where);
    check_bits("quantize_row_q8_1", ops->name, a1, b1, n1, 1, where);
    check_bits("quantize_row_q8_0 (scalar vs codecs.c)", "scalar", b0, r0, n0, 1, where);
    check_bits("quantize_row_q8_1 (scalar vs codecs.c)", "scalar", b1, r1, n1, 1, where);
    CHECK(a0[0].qs[1] == -16 && a0[0].qs[31] == 15, "quantize_row_q8_0", ops->name,
          "roundf ties must go away from zero");
    free(x), free(a0), free(b0), free(r0), free(a1), free(b1), free(r1);
}

/* ---- stream_sum ---- */

/* The checksum of n bytes at a few misalignments: around the 8-byte words of scalar
 * and the 128 / 256-byte steps of AVX2 / AVX512, and the whole 64-byte lines
 * kiln_stream_read hands each thread. */
static void check_stream_sum(const kiln_isa_ops *ops, const kiln_isa_ops *scalar) {
    static const size_t sizes[] = {0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 192, 255, 256, 257,
                                   263, 320, 511, 512, 768 + 5, 4096, 65536 + 3};
    uint8_t *buf = malloc(65536 + 16);
    for (size_t i = 0; i < 65536 + 16; i++) buf[i] = (uint8_t)rnd();
    for (int s = 0; s < N_OF(sizes); s++)
        for (int off = 0; off < 9; off += 3) {
            uint64_t got = ops->stream_sum(buf + off, sizes[s]);
            uint64_t want = scalar->stream_sum(buf + off, sizes[s]);
            CHECK(got == want, "stream_sum", ops->name, "bytes %zu offset %d: %llu, scalar %llu",
                  sizes[s], off, (unsigned long long)got, (unsigned long long)want);
        }
    free(buf);
}

/* ---- attn_scores_f16 / attn_values_f16 ---- */

static int round_up(int n, int m) { return (n + m - 1) / m * m; }

static kiln_fp16 *random_halves(size_t n) {
    kiln_fp16 *h = malloc(sizeof(kiln_fp16) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) h[i] = kiln_fp32_to_fp16(rnd_unit() * 2.0f);
    return h;
}

/* R query rows against n_keys keys of head_dim dimensions (keys_t padded to whole
 * blocks, the pad filled with random keys too, as a cache holds stale ones). */
static void check_scores(const kiln_isa_ops *ops, const kiln_isa_ops *scalar, int R, int head_dim,
                         int n_keys) {
    int pad = round_up(n_keys, KILN_ATT_BLOCK);
    kiln_fp16 *keys_t = random_halves((size_t)head_dim * pad);
    float *qbuf = malloc(sizeof(float) * (size_t)R * head_dim);
    rnd_floats(qbuf, (size_t)R * head_dim, 1.0f);
    const float *q[KILN_ATT_TILE];
    for (int r = 0; r < R; r++) q[r] = qbuf + (size_t)r * head_dim;
    size_t n = (size_t)R * pad;
    double *got = malloc(sizeof(double) * n), *want = malloc(sizeof(double) * n);
    double scale = 1.0 / sqrt((double)head_dim);
    ops->attn_scores_f16(R, got, q, keys_t, n_keys, head_dim, pad, scale);
    scalar->attn_scores_f16(R, want, q, keys_t, n_keys, head_dim, pad, scale);
    char where[96];
    int ok = 1;
    for (int r = 0; r < R && ok; r++) { /* past n_keys, variants may or may not write */
        snprintf(where, sizeof where, "R %d head_dim %d keys %d: row %d", R, head_dim, n_keys, r);
        ok = check_bits("attn_scores_f16", ops->name, got + (size_t)r * pad,
                        want + (size_t)r * pad, (size_t)n_keys, 8, where);
    }
    /* and scalar is the sum it says it is */
    for (int r = 0; r < R; r++)
        for (int p = 0; p < n_keys; p++) {
            double s = 0;
            for (int d = 0; d < head_dim; d++)
                s += (double)q[r][d] * kiln_fp16_to_fp32(keys_t[(size_t)d * pad + p]);
            double w = want[(size_t)r * pad + p];
            CHECK(fabs(w - s * scale) <= 1e-12 * (fabs(s) + 1), "attn_scores_f16 (scalar vs reference)",
                  "scalar", "R %d head_dim %d keys %d: [%d][%d] = %.17g, reference %.17g", R,
                  head_dim, n_keys, r, p, w, s * scale);
        }
    free(keys_t), free(qbuf), free(got), free(want);
}

/* Softmax-like weights: row r holds weights for its first n_keys - r keys (at least
 * one) and 0 past them, as the forward pass passes rows of different lengths. */
static double *make_weights_rows(int R, int n_keys, int pad) {
    double *w = calloc((size_t)R * pad, sizeof(double));
    for (int r = 0; r < R; r++) {
        int own = n_keys - r > 0 ? n_keys - r : 1;
        for (int p = 0; p < own; p++) w[(size_t)r * pad + p] = (rnd() >> 11) * (1.0 / 9007199254740992.0);
    }
    return w;
}

/* R rows of weights times n_keys value rows (stride halves apart, wider than head_dim
 * as in the cache, where the other heads' values sit between), both output modes. Each
 * output row has one more element, set alike beforehand, that must be left alone. */
static void check_values(const kiln_isa_ops *ops, const kiln_isa_ops *scalar, int R, int head_dim,
                         int n_keys) {
    int pad = round_up(n_keys, KILN_ATT_BLOCK), stride = head_dim + 3;
    kiln_fp16 *values = random_halves((size_t)n_keys * stride);
    double *w = make_weights_rows(R, n_keys, pad);
    size_t row = (size_t)head_dim + 1, n = (size_t)R * row;
    float *got = malloc(sizeof(float) * n), *want = malloc(sizeof(float) * n);
    double *dgot = malloc(sizeof(double) * n), *dwant = malloc(sizeof(double) * n);
    float *out_got[KILN_ATT_TILE], *out_want[KILN_ATT_TILE];
    double *dout_got[KILN_ATT_TILE], *dout_want[KILN_ATT_TILE];
    for (int r = 0; r < R; r++) {
        out_got[r] = got + r * row, out_want[r] = want + r * row;
        dout_got[r] = dgot + r * row, dout_want[r] = dwant + r * row;
    }
    for (size_t i = 0; i < n; i++) got[i] = want[i] = -7.0f, dgot[i] = dwant[i] = -7.0;
    ops->attn_values_f16(R, out_got, NULL, w, values, n_keys, head_dim, stride, pad);
    scalar->attn_values_f16(R, out_want, NULL, w, values, n_keys, head_dim, stride, pad);
    ops->attn_values_f16(R, NULL, dout_got, w, values, n_keys, head_dim, stride, pad);
    scalar->attn_values_f16(R, NULL, dout_want, w, values, n_keys, head_dim, stride, pad);
    char where[96];
    snprintf(where, sizeof where, "R %d head_dim %d keys %d", R, head_dim, n_keys);
    check_bits("attn_values_f16 out", ops->name, got, want, n, 4, where);
    /* the double partial sums (split attention's segments) too: forward.c combines them */
    check_bits("attn_values_f16 dout", ops->name, dgot, dwant, n, 8, where);
    for (int r = 0; r < R; r++)
        for (int d = 0; d < head_dim; d++) {
            double s = 0;
            for (int p = 0; p < n_keys; p++)
                s += w[(size_t)r * pad + p] * kiln_fp16_to_fp32(values[(size_t)p * stride + d]);
            double v = dwant[r * row + d];
            CHECK(fabs(v - s) <= 1e-12 * (fabs(s) + 1), "attn_values_f16 (scalar vs reference)", "scalar",
                  "%s: [%d][%d] = %.17g, reference %.17g", where, r, d, v, s);
        }
    free(values), free(w), free(got), free(want), free(dgot), free(dwant);
}

/* ---- exp_shifted_f64 / softmax_f64 / swiglu_f32 ---- */

/* Scores as attention sees them, with outliers far enough below the max for exp's
 * clamp at -708 to matter. */
static void make_scores(double *a, int n) {
    for (int p = 0; p < n; p++) {
        a[p] = rnd_unit() * 30.0;
        if (p % 7 == 3) a[p] -= 1000.0;
    }
}

static void check_softmax(const kiln_isa_ops *ops, const kiln_isa_ops *scalar, int n) {
    double *in = malloc(sizeof(double) * n), *a = malloc(sizeof(double) * n), *b = malloc(sizeof(double) * n);
    char where[32];
    snprintf(where, sizeof where, "n %d", n);
    make_scores(in, n);
    memcpy(a, in, sizeof(double) * n);
    memcpy(b, in, sizeof(double) * n);
    double max_a = 0, max_b = 0;
    double sum_a = ops->exp_shifted_f64(a, n, &max_a), sum_b = scalar->exp_shifted_f64(b, n, &max_b);
    check_bits("exp_shifted_f64", ops->name, a, b, (size_t)n, 8, where);
    check_bits("exp_shifted_f64 sum", ops->name, &sum_a, &sum_b, 1, 8, where);
    check_bits("exp_shifted_f64 max", ops->name, &max_a, &max_b, 1, 8, where);
    double ref_sum = 0; /* and scalar against libm's exp, to within exp_f64's few ulp */
    for (int p = 0; p < n; p++) ref_sum += exp(in[p] - max_b);
    CHECK(fabs(sum_b - ref_sum) <= 1e-14 * ref_sum, "exp_shifted_f64 (scalar vs libm)", "scalar",
          "%s: sum %.17g, libm %.17g", where, sum_b, ref_sum);
    memcpy(a, in, sizeof(double) * n);
    memcpy(b, in, sizeof(double) * n);
    ops->softmax_f64(a, n);
    scalar->softmax_f64(b, n);
    check_bits("softmax_f64", ops->name, a, b, (size_t)n, 8, where);
    free(in), free(a), free(b);
}

static void check_swiglu(const kiln_isa_ops *ops, const kiln_isa_ops *scalar, int n) {
    float *g = malloc(sizeof(float) * n), *h = malloc(sizeof(float) * n), *up = malloc(sizeof(float) * n);
    rnd_floats(g, (size_t)n, 12.0f);
    rnd_floats(up, (size_t)n, 2.0f);
    for (int i = 0; i < n; i += 5) g[i] *= 100.0f; /* silu's tails: x and 0 */
    memcpy(h, g, sizeof(float) * n);
    ops->swiglu_f32(g, up, (size_t)n);
    scalar->swiglu_f32(h, up, (size_t)n);
    char where[32];
    snprintf(where, sizeof where, "n %d", n);
    check_bits("swiglu_f32", ops->name, g, h, (size_t)n, 4, where);
    free(g), free(h), free(up);
}

void test_isa_ops(const char *isa) {
    const kiln_isa_ops *scalar = use_isa("scalar"), *ops = use_isa(isa);
    /* blocks: 1..9 (AVX2 and NEON go block by block), 17 and 33 odd, 344 = 11008 */
    static const int blocks[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 33, 344};
    for (int i = 0; i < N_OF(blocks); i++) check_quantize(ops, scalar, blocks[i]);
    check_stream_sum(ops, scalar);

    /* head_dim: below, at and past each values step (8 AVX2, 32 AVX512) with tails
     * (36, 48, 100), up to KILN_ATT_MAX_HEAD_DIM; keys: around the 8 / 16 key steps
     * of the scores kernels and past 256 */
    static const int dims[] = {1, 3, 8, 9, 16, 32, 36, 48, 64, 100, 128, KILN_ATT_MAX_HEAD_DIM};
    static const int keys[] = {1, 2, 7, 8, 9, 15, 16, 17, 33, 100, 300};
    static const int dims_small[] = {1, 9, 36, 48, 128};
    static const int keys_small[] = {1, 7, 9, 16, 17, 33, 300};
    const int *dv = small_sizes ? dims_small : dims, *kv = small_sizes ? keys_small : keys;
    int nd = small_sizes ? N_OF(dims_small) : N_OF(dims), nk = small_sizes ? N_OF(keys_small) : N_OF(keys);
    for (int R = 1; R <= KILN_ATT_TILE; R++)
        for (int d = 0; d < nd; d++)
            for (int k = 0; k < nk; k++) {
                check_scores(ops, scalar, R, dv[d], kv[k]);
                check_values(ops, scalar, R, dv[d], kv[k]);
            }

    static const int lens[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 33, 100, 257, 1000};
    for (int i = 0; i < N_OF(lens); i++) {
        check_softmax(ops, scalar, lens[i]);
        check_swiglu(ops, scalar, lens[i]);
    }
}
