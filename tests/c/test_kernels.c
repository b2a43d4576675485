/* Standalone harness for the kernels: every ISA variant this CPU (or qemu) supports,
 * against the scalar variant (bit for bit, except the float matrix product) and
 * against double-precision references computed here straight from the GGUF blocks;
 * then a tiny model's forward pass per variant (test_forward.c). Built natively, under
 * ASan+UBSan, and for aarch64 (run under qemu-aarch64) by tests/c/Makefile.
 *
 * KILN_EXPECT_ISAS (required) lists the variants the harness must find supported, in
 * kiln_supported_isas order ("scalar avx2"): the Makefile derives it from the CPU's
 * flags, so a variant that silently stops being built, detected or run fails the run.
 * KILN_TEST_SMALL=1 takes fewer sizes (for qemu). Exit status 0 = all passed. */
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codecs.h"
#include "harness.h"

int n_failed, n_checked, small_sizes;

void fail(const char *what, const char *isa, const char *fmt, ...) {
    n_failed++;
    fprintf(stderr, "FAIL %s [%s] ", what, isa);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
}

int check_bits(const char *what, const char *isa, const void *got, const void *want, size_t n,
               size_t elem_size, const char *where) {
    n_checked++;
    if (memcmp(got, want, n * elem_size) == 0) return 1;
    const uint8_t *g = got, *w = want;
    size_t first = n, n_diff = 0;
    for (size_t i = 0; i < n; i++)
        if (memcmp(g + i * elem_size, w + i * elem_size, elem_size)) {
            if (first == n) first = i;
            n_diff++;
        }
    const void *gi = g + first * elem_size, *wi = w + first * elem_size;
    if (elem_size == 4)
        fail(what, isa, "%s: %zu of %zu differ from scalar, first [%zu] = %.9g, scalar %.9g", where,
             n_diff, n, first, *(const float *)gi, *(const float *)wi);
    else if (elem_size == 8)
        fail(what, isa, "%s: %zu of %zu differ from scalar, first [%zu] = %.17g, scalar %.17g", where,
             n_diff, n, first, *(const double *)gi, *(const double *)wi);
    else
        fail(what, isa, "%s: %zu of %zu bytes differ from scalar, first [%zu] = 0x%02x, scalar 0x%02x",
             where, n_diff, n, first, *(const uint8_t *)gi, *(const uint8_t *)wi);
    return 0;
}

/* xorshift: reproducible without libc rand's global state */
static uint64_t rng_state = 88172645463325252ull;
uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
int rnd_int(int lo, int hi) { return lo + (int)(rnd() % (uint64_t)(hi - lo + 1)); }
float rnd_unit(void) { return (float)((rnd() >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f; }
void rnd_floats(float *x, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) x[i] = rnd_unit() * scale;
}

const kiln_isa_ops *use_isa(const char *isa) {
    if (kiln_set_isa(isa) != 0 || strcmp(kiln_ops()->name, isa) != 0) {
        fprintf(stderr, "FAIL dispatch [%s] kiln_set_isa did not select it\n", isa);
        abort();
    }
    return kiln_ops();
}

/* Pools of 1, 2 and 3 threads, made once (index = thread count). */
static kiln_pool *pools[4];

static size_t row_bytes(int type, int64_t cols) { return (size_t)kiln_row_size(type, cols); }

/* Repacked weights with quantized activations (else float weights and activations). */
static int is_quant(int type) { return kiln_type_traits_of(type)->packed_block_bytes > 0; }

/* Random weights; with pow2, every scale is 1 or 1/2 so all float arithmetic in the
 * kernels is exact and results must match the reference bit for bit. */
static void *make_weights(int type, int64_t rows, int64_t cols, int pow2) {
    size_t rb = row_bytes(type, cols);
    uint8_t *w = malloc(rb * (size_t)rows);
    int64_t nb = cols / QK;
    for (int64_t r = 0; r < rows; r++) {
        uint8_t *row = w + rb * (size_t)r;
        for (int64_t b = 0; b < (is_quant(type) ? nb : 0); b++) {
            float d = pow2 ? (rnd() & 1 ? 1.0f : 0.5f) : rnd_unit() * 0.02f;
            if (type == KILN_TYPE_Q4_0) {
                block_q4_0 *blk = (block_q4_0 *)row + b;
                blk->d = kiln_fp32_to_fp16(d);
                for (int j = 0; j < 16; j++) blk->qs[j] = (uint8_t)rnd();
            } else if (type == KILN_TYPE_Q4_1) {
                block_q4_1 *blk = (block_q4_1 *)row + b;
                blk->d = kiln_fp32_to_fp16(d);
                blk->m = kiln_fp32_to_fp16(pow2 ? rnd_int(-8, 8) / 16.0f : rnd_unit() * 0.1f);
                for (int j = 0; j < 16; j++) blk->qs[j] = (uint8_t)rnd();
            } else if (type == KILN_TYPE_Q5_0) {
                block_q5_0 *blk = (block_q5_0 *)row + b;
                blk->d = kiln_fp32_to_fp16(d);
                for (int j = 0; j < 4; j++) blk->qh[j] = (uint8_t)rnd();
                for (int j = 0; j < 16; j++) blk->qs[j] = (uint8_t)rnd();
            } else if (type == KILN_TYPE_Q5_1) {
                block_q5_1 *blk = (block_q5_1 *)row + b;
                blk->d = kiln_fp32_to_fp16(d);
                blk->m = kiln_fp32_to_fp16(pow2 ? rnd_int(-8, 8) / 16.0f : rnd_unit() * 0.1f);
                for (int j = 0; j < 4; j++) blk->qh[j] = (uint8_t)rnd();
                for (int j = 0; j < 16; j++) blk->qs[j] = (uint8_t)rnd();
            } else if (type == KILN_TYPE_IQ4_NL) {
                block_iq4_nl *blk = (block_iq4_nl *)row + b;
                blk->d = kiln_fp32_to_fp16(d);
                for (int j = 0; j < 16; j++) blk->qs[j] = (uint8_t)rnd();
            } else {
                block_q8_0 *blk = (block_q8_0 *)row + b;
                blk->d = kiln_fp32_to_fp16(d);
                for (int j = 0; j < 32; j++) blk->qs[j] = (int8_t)rnd();
            }
        }
        for (int64_t c = 0; c < cols; c++) {
            float v = rnd_unit();
            if (type == KILN_TYPE_F32) ((float *)row)[c] = v;
            else if (type == KILN_TYPE_F16) ((kiln_fp16 *)row)[c] = kiln_fp32_to_fp16(v);
            else if (type == KILN_TYPE_BF16) ((kiln_bf16 *)row)[c] = kiln_fp32_to_bf16(v);
        }
    }
    return w;
}

/* Activations; with pow2, each block is integers (one of them +-127) times 1 or 1/2,
 * which Q8 quantization reproduces exactly. */
static float *make_acts(int n_tokens, int64_t cols, int pow2) {
    float *x = malloc(sizeof(float) * (size_t)n_tokens * (size_t)cols);
    for (int64_t i = 0; i < n_tokens * cols; i++) {
        if (!pow2) { x[i] = rnd_unit() * 3.0f; continue; }
        float s = (i / QK) & 1 ? 0.5f : 1.0f;
        x[i] = (i % QK == 0 ? (rnd() & 1 ? 127.0f : -127.0f) : (float)rnd_int(-127, 127)) * s;
    }
    return x;
}

/* Reference weight value (row r, column c). */
static double weight_at(int type, const void *w, int64_t cols, int64_t r, int64_t c) {
    const uint8_t *row = (const uint8_t *)w + row_bytes(type, cols) * (size_t)r;
    int64_t b = c / QK, j = c % QK;
    switch (type) {
    case KILN_TYPE_Q4_0: {
        const block_q4_0 *blk = (const block_q4_0 *)row + b;
        int q = j < 16 ? blk->qs[j] & 15 : blk->qs[j - 16] >> 4;
        return (q - 8) * (double)kiln_fp16_to_fp32(blk->d);
    }
    case KILN_TYPE_Q4_1: {
        const block_q4_1 *blk = (const block_q4_1 *)row + b;
        int q = j < 16 ? blk->qs[j] & 15 : blk->qs[j - 16] >> 4;
        return q * (double)kiln_fp16_to_fp32(blk->d); /* + m, added per block by the caller */
    }
    case KILN_TYPE_Q5_0: {
        const block_q5_0 *blk = (const block_q5_0 *)row + b;
        int q = (j < 16 ? blk->qs[j] & 15 : blk->qs[j - 16] >> 4) | ((blk->qh[j / 8] >> (j % 8)) & 1) << 4;
        return (q - 16) * (double)kiln_fp16_to_fp32(blk->d);
    }
    case KILN_TYPE_Q5_1: {
        const block_q5_1 *blk = (const block_q5_1 *)row + b;
        int q = (j < 16 ? blk->qs[j] & 15 : blk->qs[j - 16] >> 4) | ((blk->qh[j / 8] >> (j % 8)) & 1) << 4;
        return q * (double)kiln_fp16_to_fp32(blk->d); /* + m, added per block by the caller */
    }
    case KILN_TYPE_IQ4_NL: {
        const block_iq4_nl *blk = (const block_iq4_nl *)row + b;
        int q = j < 16 ? blk->qs[j] & 15 : blk->qs[j - 16] >> 4;
        return kiln_kvalues_iq4nl[q] * (double)kiln_fp16_to_fp32(blk->d);
    }
    case KILN_TYPE_Q8_0: {
        const block_q8_0 *blk = (const block_q8_0 *)row + b;
        return blk->qs[j] * (double)kiln_fp16_to_fp32(blk->d);
    }
    default:
        return kiln_weight_f32(type, row, c);
    }
}

/* y_ref (n_tokens, rows) in double, with the activations quantized by the reference
 * codec (which every variant's quantizer matches bit for bit, test_quantize). */
static double *reference(int type, const void *w, int64_t rows, int64_t cols, const float *x, int n_tokens) {
    double *y = calloc((size_t)n_tokens * (size_t)rows, sizeof(double));
    int64_t nb = cols / QK;
    float *xq = malloc(sizeof(float) * (size_t)cols);
    double *sx = malloc(sizeof(double) * (size_t)(nb + 1));
    block_q8_1 *q = malloc(sizeof(block_q8_1) * (size_t)(nb + 1));
    int quant = is_quant(type);
    for (int t = 0; t < n_tokens; t++) {
        const float *xt = x + (size_t)t * cols;
        if (quant) {
            kiln_quantize_row_q8_1(xt, q, cols); /* same qs and d as Q8_0 */
            for (int64_t b = 0; b < nb; b++) {
                sx[b] = kiln_fp16_to_fp32(q[b].s);
                for (int j = 0; j < QK; j++) xq[b * QK + j] = q[b].qs[j] * kiln_fp16_to_fp32(q[b].d);
            }
        } else {
            memcpy(xq, xt, sizeof(float) * (size_t)cols);
        }
        for (int64_t r = 0; r < rows; r++) {
            double s = 0;
            for (int64_t c = 0; c < cols; c++) s += weight_at(type, w, cols, r, c) * xq[c];
            if (type == KILN_TYPE_Q4_1 || type == KILN_TYPE_Q5_1) /* m is the second fp16 of both */
                for (int64_t b = 0; b < nb; b++) {
                    const uint8_t *blk = (const uint8_t *)w + row_bytes(type, cols) * (size_t)r +
                                         (size_t)b * (size_t)kiln_type_traits_of(type)->type_size;
                    kiln_fp16 m;
                    memcpy(&m, blk + 2, 2);
                    s += kiln_fp16_to_fp32(m) * sx[b];
                }
            y[(size_t)t * rows + r] = s;
        }
    }
    free(xq);
    free(sx);
    free(q);
    return y;
}

/* ---- matmul against the double reference ---- */

/* Variant isa against the reference (exactly, with pow2 data; else within float
 * rounding) and against scalar, with 1 to 3 threads. Quantized products are summed in
 * double and rounded once (qgemm.c), so every variant gives scalar's bits; float ones
 * (fgemm) are summed in float in each variant's own order, so only to within that
 * rounding: cols * 2^-24 of the sum of |w x| each way. */
static void test_matmul(const char *isa, int type, int64_t rows, int64_t cols, int n_tokens, int pow2) {
    void *w = make_weights(type, rows, cols, pow2);
    float *x = make_acts(n_tokens, cols, pow2);
    double *ref = reference(type, w, rows, cols, x, n_tokens);
    kiln_matrix m;
    CHECK(kiln_matrix_init(&m, type, rows, cols, w) == 0, "kiln_matrix_init", isa, "type %d", type);
    size_t ny = (size_t)n_tokens * (size_t)rows;
    float *y = malloc(sizeof(float) * ny), *y_scalar = malloc(sizeof(float) * ny);
    use_isa("scalar");
    kiln_matmul(NULL, &m, x, n_tokens, y_scalar);
    use_isa(isa);
    double scale = 0;
    int quant = is_quant(type);
    for (size_t i = 0; i < ny; i++) scale = fmax(scale, fabs(ref[i]));
    const char *what = quant ? "qgemm vs reference" : "fgemm vs reference";
    for (int n_threads = 1; n_threads <= 3; n_threads++) {
        kiln_matmul(pools[n_threads], &m, x, n_tokens, y);
        int bad = 0;
        for (size_t i = 0; i < ny && !bad; i++) {
            if (pow2) bad = y[i] != (float)ref[i];
            else if (quant) bad = y[i] != y_scalar[i] || fabs(y_scalar[i] - ref[i]) > 1e-6 * (fabs(ref[i]) + scale);
            else bad = fabs(y[i] - y_scalar[i]) > 1e-5 * (fabs(y_scalar[i]) + scale) ||
                       fabs(y_scalar[i] - ref[i]) > 1e-5 * (fabs(ref[i]) + scale);
            if (bad)
                fail(what, isa, "%s rows %lld cols %lld tokens %d threads %d pow2 %d: y[%zu] = %.9g, scalar %.9g, ref %.9g",
                     kiln_type_traits_of(type)->name, (long long)rows, (long long)cols, n_tokens, n_threads,
                     pow2, i, y[i], y_scalar[i], ref[i]);
        }
        n_checked++;
    }
    kiln_matrix_free(&m);
    free(w), free(x), free(ref), free(y), free(y_scalar);
}

/* ---- matmul against scalar, over the tile shapes ---- */

/* The sum of |w x| per output: the scale of fgemm's rounding. */
static double abs_dot(int type, const void *w, int64_t cols, int64_t r, const float *x) {
    double s = 0;
    const uint8_t *row = (const uint8_t *)w + row_bytes(type, cols) * (size_t)r;
    for (int64_t c = 0; c < cols; c++) s += fabs(kiln_weight_f32(type, row, c) * (double)x[c]);
    return s;
}

/* y (n_tokens, rows) of variant isa against scalar's y_s: the same bits for quantized
 * weights; for float ones within the rounding of two float sums in different orders,
 * each off by at most cols * 2^-24 * sum |w x|. */
static void compare_to_scalar(const char *isa, int type, const void *w, int64_t rows, int64_t cols,
                              const float *x, int n_tokens, const float *y, const float *y_s,
                              const char *where) {
    if (is_quant(type)) {
        check_bits("qgemm", isa, y, y_s, (size_t)n_tokens * rows, 4, where);
        return;
    }
    n_checked++;
    for (int t = 0; t < n_tokens; t++)
        for (int64_t r = 0; r < rows; r++) {
            size_t i = (size_t)t * rows + r;
            double tol = 2.0 * cols * 0x1p-24 * abs_dot(type, w, cols, r, x + (size_t)t * cols);
            if (fabs((double)y[i] - y_s[i]) > tol) {
                fail("fgemm", isa, "%s: y[%d][%lld] = %.9g, scalar %.9g, tolerance %.3g", where, t,
                     (long long)r, y[i], y_s[i], tol);
                return;
            }
        }
}

/* One shape: variant isa against scalar, with 1 and 2 threads, batched and token by
 * token; the variant's own results must not depend on threads or batching (bit for
 * bit, for every weight type: each output is one fixed sum whatever the tile). */
static void check_matmul(const char *isa, int type, int64_t rows, int64_t cols, int n_tokens) {
    void *w = make_weights(type, rows, cols, 0);
    float *x = make_acts(n_tokens, cols, 0);
    kiln_matrix m;
    if (kiln_matrix_init(&m, type, rows, cols, w) != 0) {
        fail("kiln_matrix_init", isa, "%s rows %lld cols %lld", kiln_type_traits_of(type)->name,
             (long long)rows, (long long)cols);
        free(w), free(x);
        return;
    }
    size_t ny = (size_t)n_tokens * rows;
    float *y_s = malloc(sizeof(float) * ny), *y1 = malloc(sizeof(float) * ny);
    float *y2 = malloc(sizeof(float) * ny), *yt = malloc(sizeof(float) * ny);
    use_isa("scalar");
    kiln_matmul(pools[1], &m, x, n_tokens, y_s);
    use_isa(isa);
    kiln_matmul(pools[1], &m, x, n_tokens, y1);
    kiln_matmul(pools[2], &m, x, n_tokens, y2);
    for (int t = 0; t < n_tokens; t++)
        kiln_matmul(pools[1], &m, x + (size_t)t * cols, 1, yt + (size_t)t * rows);
    char where[96];
    snprintf(where, sizeof where, "%s rows %lld cols %lld tokens %d", kiln_type_traits_of(type)->name,
             (long long)rows, (long long)cols, n_tokens);
    const char *self = is_quant(type) ? "qgemm threads/batching" : "fgemm threads/batching";
    compare_to_scalar(isa, type, w, rows, cols, x, n_tokens, y1, y_s, where);
    check_bits(self, isa, y2, y1, ny, 4, where);
    check_bits(self, isa, yt, y1, ny, 4, where);
    kiln_matrix_free(&m);
    free(w), free(x), free(y_s), free(y1), free(y2), free(yt);
}

/* Every weight type of the table over rows around KILN_RG (and the 8-row float gemv
 * pass), column counts around the vector steps (whole blocks for the quantized types:
 * block counts around KILN_KG, and 4096 for the L2-blocked batch path) and token
 * counts around each variant's token tiles (qgemm 8, 4, 1..3, AMX 16; fgemm 4 or 2). */
static void test_matmul_shapes(const char *isa) {
    static const int64_t rows[] = {1, 3, 5, 9, 37}; /* 37 = 4 x 8 + 4 + 1 */
    static const int64_t qcols[] = {32, 96, 160, 288, 576};
    static const int64_t fcols[] = {1, 7, 8, 9, 15, 16, 17, 33, 45, 100, 576};
    static const int tokens[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 17, 33};
    static const int tokens_small[] = {1, 2, 3, 4, 5, 9, 17};
    const int *tv = small_sizes ? tokens_small : tokens;
    int ntok = small_sizes ? 7 : 13;
    for (int k = 0; kiln_type_traits_at(k); k++) {
        const kiln_type_traits *tt = kiln_type_traits_at(k);
        if (!tt->is_weight || is_k_type(tt->type)) continue;
        int quant = is_quant(tt->type);
        const int64_t *cv = quant ? qcols : fcols;
        int nc = quant ? 5 : 11;
        for (int r = 0; r < 5; r++)
            for (int c = 0; c < nc; c++)
                for (int t = 0; t < ntok; t++) check_matmul(isa, tt->type, rows[r], cv[c], tv[t]);
        if (quant) check_matmul(isa, tt->type, 70, 4096, 9); /* > 1 step of L2-sized row blocks */
        /* prompt batches: past a 64-token pass, a 64-block row tile plus a tail */
        if (quant) check_matmul(isa, tt->type, 45, 67 * 32, small_sizes ? 17 : 70);
    }
}

/* kiln_matmul_multi gives exactly what separate kiln_matmul calls give. */
static void test_multi(const char *isa) {
    /* some share an activation layout (Q8_0 and IQ4_NL; Q4_1 and Q5_1), some not */
    const int types[] = {KILN_TYPE_Q4_1, KILN_TYPE_Q4_0, KILN_TYPE_Q8_0, KILN_TYPE_F16,
                         KILN_TYPE_Q5_0, KILN_TYPE_Q5_1, KILN_TYPE_IQ4_NL};
    enum { N = sizeof types / sizeof types[0] };
    const int64_t rows[N] = {576, 37, 19, 13, 21, 7, 45}, cols = 576;
    const int n_tokens = 6;
    kiln_matrix m[N];
    const kiln_matrix *mp[N];
    void *w[N];
    float *y[N], *y1 = malloc(sizeof(float) * 576 * n_tokens);
    float *x = make_acts(n_tokens, cols, 0);
    use_isa(isa);
    for (int i = 0; i < N; i++) {
        w[i] = make_weights(types[i], rows[i], cols, 0);
        kiln_matrix_init(&m[i], types[i], rows[i], cols, w[i]);
        mp[i] = &m[i];
        y[i] = malloc(sizeof(float) * (size_t)rows[i] * n_tokens);
    }
    for (int n_threads = 1; n_threads <= 3; n_threads++) {
        for (int nt = 1; nt <= n_tokens; nt += n_tokens - 1) {
            kiln_matmul_multi(pools[n_threads], N, mp, x, nt, y);
            for (int i = 0; i < N; i++) {
                kiln_matmul(pools[n_threads], &m[i], x, nt, y1);
                char where[64];
                snprintf(where, sizeof where, "matrix %d threads %d tokens %d", i, n_threads, nt);
                check_bits("matmul_multi vs matmul", isa, y[i], y1, (size_t)rows[i] * nt, 4, where);
            }
        }
    }
    for (int i = 0; i < N; i++) {
        kiln_matrix_free(&m[i]);
        free(w[i]);
        free(y[i]);
    }
    free(x);
    free(y1);
}

/* ---- the pool, refusals, the variants found ---- */

typedef struct {
    _Atomic int calls[8];
    _Atomic int total;
} pool_probe;

static void probe_task(void *p, int ith, int nth) {
    pool_probe *pr = p;
    atomic_fetch_add(&pr->calls[ith], 1);
    atomic_fetch_add(&pr->total, nth);
}

static void test_pool(void) {
    for (int n = 1; n <= 4; n++) {
        kiln_pool *pool = kiln_pool_create(n);
        CHECK(pool && kiln_pool_size(pool) == n, "pool", "-", "pool of %d", n);
        pool_probe pr;
        memset(&pr, 0, sizeof pr);
        for (int rep = 0; rep < 2000; rep++) kiln_pool_run(pool, probe_task, &pr);
        for (int i = 0; i < n; i++)
            CHECK(pr.calls[i] == 2000, "pool", "-", "worker %d of %d ran %d times", i, n, pr.calls[i]);
        CHECK(pr.total == 2000 * n * n, "pool", "-", "nth seen by workers");
        kiln_pool_free(pool);
    }
    CHECK(kiln_pool_create(0) == NULL, "pool", "-", "pool of 0 threads is refused");
    CHECK(kiln_pool_create(KILN_MAX_THREADS + 1) == NULL, "pool", "-", "pool above KILN_MAX_THREADS is refused");
    kiln_pool *max = kiln_pool_create(KILN_MAX_THREADS);
    CHECK(max && kiln_pool_size(max) == KILN_MAX_THREADS, "pool", "-", "pool of KILN_MAX_THREADS");
    kiln_pool_free(max);
}

/* kiln_matrix_row: every row of every weight type, read back from the packed copy (or
 * the blocks), is the scalar codec's dequantization of the row's GGUF blocks, bit for
 * bit; shapes with a partial row group and a partial block group. */
static void test_matrix_row(void) {
    static const int64_t shapes[][2] = {{7, 32}, {9, 160}, {5, 576}, {4, 256}};
    for (int k = 0; kiln_type_traits_at(k); k++) {
        const kiln_type_traits *tt = kiln_type_traits_at(k);
        if (!tt->is_weight || is_k_type(tt->type)) continue; /* (make_weights makes no K blocks) */
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            int64_t rows = shapes[s][0], cols = shapes[s][1];
            if (cols % tt->block_size) continue;
            void *w = make_weights(tt->type, rows, cols, 0);
            kiln_matrix m;
            CHECK(kiln_matrix_init(&m, tt->type, rows, cols, w) == 0, "kiln_matrix_row", "-", "init %s", tt->name);
            float *got = malloc(sizeof(float) * cols), *want = malloc(sizeof(float) * cols);
            size_t row_bytes = (size_t)(cols / tt->block_size) * (size_t)tt->type_size;
            for (int64_t r = 0; r < rows; r++) {
                kiln_matrix_row(&m, r, got);
                tt->dequantize_row((const uint8_t *)w + (size_t)r * row_bytes, want, cols);
                CHECK(memcmp(got, want, sizeof(float) * cols) == 0, "kiln_matrix_row", "-",
                      "%s rows %lld cols %lld: row %lld differs (packed %d)", tt->name, (long long)rows,
                      (long long)cols, (long long)r, m.packed != NULL);
            }
            free(got);
            free(want);
            kiln_matrix_free(&m);
            free(w);
        }
    }
}

static void test_refusals(void) {
    kiln_matrix bad;
    CHECK(kiln_matrix_init(&bad, KILN_TYPE_Q4_0, 4, 48, "") == -1, "kiln_matrix_init", "-",
          "cols not a multiple of 32");
    CHECK(kiln_matrix_init(&bad, KILN_TYPE_Q4_K, 4, 288, "") == -1, "kiln_matrix_init", "-",
          "cols not a multiple of 256");
    const int not_weights[] = {KILN_TYPE_Q8_1, KILN_TYPE_Q8_K, 4, 999, -1};
    for (int i = 0; i < 5; i++)
        CHECK(kiln_matrix_init(&bad, not_weights[i], 4, 64, "") == -1, "kiln_matrix_init", "-",
              "type %d refused", not_weights[i]);
    CHECK(kiln_set_isa("bogus") == -1, "kiln_set_isa", "-", "unknown variant refused");
}

/* The supported variants, space-separated, must be exactly KILN_EXPECT_ISAS. */
static void test_expected_isas(const char **names, int n) {
    char got[256] = "", want[256] = "";
    for (int i = 0; i < n; i++) snprintf(got + strlen(got), sizeof got - strlen(got), "%s%s", i ? " " : "", names[i]);
    const char *env = getenv("KILN_EXPECT_ISAS");
    if (!env) {
        fail("KILN_EXPECT_ISAS", "-", "not set: give the variants this CPU must run, e.g. "
             "KILN_EXPECT_ISAS=\"%s\" (tests/c/Makefile derives it from /proc/cpuinfo)", got);
        return;
    }
    /* normalize the spacing */
    for (const char *p = env; *p;) {
        while (*p == ' ') p++;
        size_t len = strcspn(p, " ");
        if (len) snprintf(want + strlen(want), sizeof want - strlen(want), "%s%.*s", *want ? " " : "", (int)len, p);
        p += len;
    }
    CHECK(strcmp(got, want) == 0, "kiln_supported_isas", "-", "\"%s\", expected \"%s\"", got, want);
}

int main(void) {
    small_sizes = getenv("KILN_TEST_SMALL") && strcmp(getenv("KILN_TEST_SMALL"), "1") == 0;
    const char *names[8];
    int n = kiln_supported_isas(names, 8);
    if (n > 8) n = 8;
    printf("supported:");
    for (int i = 0; i < n; i++) printf(" %s", names[i]);
    printf("\n");
    test_expected_isas(names, n);
    test_pool();
    test_refusals();
    test_matrix_row();
    test_codecs();
    for (int t = 1; t <= 3; t++) pools[t] = kiln_pool_create(t);
    for (int i = 0; i < n; i++) {
        const char *isa = names[i];
        int before = n_failed;
        test_isa_ops(isa);
        test_kgemm(isa);
        static const int64_t cols_ref[] = {32, 64, 576, 1536, 4096, 11008};
        for (int c = 0; c < (small_sizes ? 4 : 6); c++) {
            int64_t cols = cols_ref[c];
            /* the reference is O(rows * cols) in double: fewer rows for long rows */
            int64_t rows = cols > 2000 ? 9 : 37;
            for (int k = 0; kiln_type_traits_at(k); k++) {
                const kiln_type_traits *tt = kiln_type_traits_at(k);
                if (!tt->is_weight || is_k_type(tt->type)) continue;
                if (is_quant(tt->type)) test_matmul(isa, tt->type, rows, cols, 13, 1); /* 8 + 4 + 1 tokens */
                test_matmul(isa, tt->type, rows, cols, 3, 0);
            }
        }
        test_matmul(isa, KILN_TYPE_F32, 7, 45, 2, 0); /* float rows need not be whole blocks */
        test_matmul_shapes(isa);
        test_multi(isa);
        printf("%-11s kernels %s\n", isa, n_failed == before ? "ok" : "FAILED");
    }
    int before = n_failed;
    test_forward(names, n);
    printf("forward     %s\n", n_failed == before ? "ok" : "FAILED");
    for (int t = 1; t <= 3; t++) kiln_pool_free(pools[t]);
    printf("%d checks, %d failed\n", n_checked, n_failed);
    return n_failed ? 1 : 0;
}
