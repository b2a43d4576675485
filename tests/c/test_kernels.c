/* Standalone harness for the kernels: every ISA variant this CPU (or qemu) supports,
 * against the scalar variant and a double-precision reference computed here straight
 * from the GGUF blocks. Built natively, under ASan+UBSan, and for aarch64 (run under
 * qemu-aarch64) by tests/c/Makefile. Exit status 0 = all passed. */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codecs.h"
#include "kernels.h"
#include "kernels_impl.h"

static int n_failed, n_checked;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        n_checked++;                                                         \
        if (!(cond)) {                                                       \
            n_failed++;                                                      \
            fprintf(stderr, "FAIL %s:%d [%s] ", __FILE__, __LINE__, kiln_active_isa()); \
            fprintf(stderr, __VA_ARGS__);                                    \
            fprintf(stderr, "\n");                                           \
        }                                                                    \
    } while (0)

/* xorshift: reproducible without libc rand's global state */
static uint64_t rng_state = 88172645463325252ull;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static int rnd_int(int lo, int hi) { return lo + (int)(rnd() % (uint64_t)(hi - lo + 1)); }
static float rnd_unit(void) { return (float)((rnd() >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f; }

static const int64_t COLS[] = {32, 64, 576, 1536, 4096, 11008};
#define N_COLS (int)(sizeof COLS / sizeof COLS[0])
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
            if (type == KILN_TYPE_Q4_1)
                for (int64_t b = 0; b < nb; b++) {
                    const block_q4_1 *blk = (const block_q4_1 *)((const uint8_t *)w + row_bytes(type, cols) * (size_t)r) + b;
                    s += kiln_fp16_to_fp32(blk->m) * sx[b];
                }
            y[(size_t)t * rows + r] = s;
        }
    }
    free(xq);
    free(sx);
    free(q);
    return y;
}

static void test_matmul(const char *isa, int type, int64_t rows, int64_t cols, int n_tokens, int pow2) {
    void *w = make_weights(type, rows, cols, pow2);
    float *x = make_acts(n_tokens, cols, pow2);
    double *ref = reference(type, w, rows, cols, x, n_tokens);
    kiln_matrix m;
    CHECK(kiln_matrix_init(&m, type, rows, cols, w) == 0, "init type %d", type);
    size_t ny = (size_t)n_tokens * (size_t)rows;
    float *y = malloc(sizeof(float) * ny), *y_scalar = malloc(sizeof(float) * ny);
    kiln_set_isa("scalar");
    kiln_matmul(NULL, &m, x, n_tokens, y_scalar);
    kiln_set_isa(isa);
    double scale = 0;
    int quant = is_quant(type);
    for (size_t i = 0; i < ny; i++) scale = fmax(scale, fabs(ref[i]));
    for (int n_threads = 1; n_threads <= 3; n_threads++) {
        kiln_pool *pool = kiln_pool_create(n_threads);
        kiln_matmul(pool, &m, x, n_tokens, y);
        kiln_pool_free(pool);
        int bad = 0;
        for (size_t i = 0; i < ny && !bad; i++) {
            if (pow2) bad = y[i] != (float)ref[i];
            /* quantized products are summed in double and rounded once (qgemm.c): every
             * variant gives the scalar result bit for bit */
            else if (quant) bad = y[i] != y_scalar[i] || fabs(y_scalar[i] - ref[i]) > 1e-6 * (fabs(ref[i]) + scale);
            else bad = fabs(y[i] - y_scalar[i]) > 1e-5 * (fabs(y_scalar[i]) + scale) ||
                       fabs(y_scalar[i] - ref[i]) > 1e-5 * (fabs(ref[i]) + scale);
            if (bad)
                CHECK(0, "type %d rows %lld cols %lld threads %d pow2 %d: y[%zu] = %.9g, scalar %.9g, ref %.9g",
                      type, (long long)rows, (long long)cols, n_threads, pow2, i, y[i], y_scalar[i], ref[i]);
        }
        if (!bad) CHECK(1, "%s", "ok");
    }
    kiln_matrix_free(&m);
    free(w);
    free(x);
    free(ref);
    free(y);
    free(y_scalar);
}

/* kiln_matmul_multi gives exactly what separate kiln_matmul calls give. */
static void test_multi(void) {
    const int types[] = {KILN_TYPE_Q4_1, KILN_TYPE_Q4_0, KILN_TYPE_Q8_0, KILN_TYPE_F16};
    const int64_t rows[] = {576, 37, 19, 13}, cols = 576;
    const int n_tokens = 6;
    kiln_matrix m[4];
    const kiln_matrix *mp[4];
    void *w[4];
    float *y[4], *y1 = malloc(sizeof(float) * 576 * n_tokens);
    float *x = make_acts(n_tokens, cols, 0);
    for (int i = 0; i < 4; i++) {
        w[i] = make_weights(types[i], rows[i], cols, 0);
        kiln_matrix_init(&m[i], types[i], rows[i], cols, w[i]);
        mp[i] = &m[i];
        y[i] = malloc(sizeof(float) * (size_t)rows[i] * n_tokens);
    }
    for (int n_threads = 1; n_threads <= 3; n_threads++) {
        kiln_pool *pool = kiln_pool_create(n_threads);
        for (int nt = 1; nt <= n_tokens; nt += n_tokens - 1) {
            kiln_matmul_multi(pool, 4, mp, x, nt, y);
            for (int i = 0; i < 4; i++) {
                kiln_matmul(pool, &m[i], x, nt, y1);
                CHECK(memcmp(y1, y[i], sizeof(float) * (size_t)rows[i] * nt) == 0,
                      "multi matrix %d threads %d tokens %d", i, n_threads, nt);
            }
        }
        kiln_pool_free(pool);
    }
    for (int i = 0; i < 4; i++) {
        kiln_matrix_free(&m[i]);
        free(w[i]);
        free(y[i]);
    }
    free(x);
    free(y1);
}

static void test_quantize(const char *isa, int64_t cols) {
    float *x = make_acts(1, cols, 0);
    for (int j = 0; j < QK; j++) x[j] = j == 0 ? 127.0f : j - 16.5f; /* .5 ties */
    int64_t nb = cols / QK;
    block_q8_0 *a0 = calloc((size_t)nb, sizeof *a0), *b0 = calloc((size_t)nb, sizeof *b0);
    block_q8_1 *a1 = calloc((size_t)nb, sizeof *a1), *b1 = calloc((size_t)nb, sizeof *b1);
    kiln_quantize_row_q8_0(x, a0, cols); /* the reference codecs */
    kiln_quantize_row_q8_1(x, a1, cols);
    CHECK(a0[0].qs[1] == -16 && a0[0].qs[31] == 15, "roundf ties go away from zero");
    kiln_ops()->quantize_row_q8_0(x, b0, cols);
    kiln_ops()->quantize_row_q8_1(x, b1, cols);
    CHECK(memcmp(a0, b0, sizeof *a0 * (size_t)nb) == 0, "q8_0 cols %lld differs from the reference codec", (long long)cols);
    CHECK(memcmp(a1, b1, sizeof *a1 * (size_t)nb) == 0, "q8_1 cols %lld differs from the reference codec", (long long)cols);
    free(x);
    free(a0);
    free(b0);
    free(a1);
    free(b1);
}

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
        CHECK(pool && kiln_pool_size(pool) == n, "pool of %d", n);
        pool_probe pr;
        memset(&pr, 0, sizeof pr);
        for (int rep = 0; rep < 2000; rep++) kiln_pool_run(pool, probe_task, &pr);
        for (int i = 0; i < n; i++) CHECK(pr.calls[i] == 2000, "worker %d of %d ran %d times", i, n, pr.calls[i]);
        CHECK(pr.total == 2000 * n * n, "nth seen by workers");
        kiln_pool_free(pool);
    }
    CHECK(kiln_pool_create(0) == NULL, "pool of 0 threads is refused");
    CHECK(kiln_pool_create(KILN_MAX_THREADS + 1) == NULL, "pool above KILN_MAX_THREADS is refused");
    kiln_pool *max = kiln_pool_create(KILN_MAX_THREADS);
    CHECK(max && kiln_pool_size(max) == KILN_MAX_THREADS, "pool of KILN_MAX_THREADS");
    kiln_pool_free(max);
}

int main(void) {
    const char *names[8];
    int n = kiln_supported_isas(names, 8);
    if (n > 8) n = 8;
    printf("supported:");
    for (int i = 0; i < n; i++) printf(" %s", names[i]);
    printf("\n");
    test_pool();
    kiln_matrix bad;
    CHECK(kiln_matrix_init(&bad, KILN_TYPE_Q4_0, 4, 48, "") == -1, "cols not a multiple of 32");
    const int not_weights[] = {KILN_TYPE_Q8_1, 12 /* Q4_K */, 4, 999, -1};
    for (int i = 0; i < 5; i++)
        CHECK(kiln_matrix_init(&bad, not_weights[i], 4, 64, "") == -1, "type %d refused", not_weights[i]);
    CHECK(kiln_set_isa("bogus") == -1, "unknown variant refused");
    for (int i = 0; i < n; i++) {
        const char *isa = names[i];
        int before = n_failed;
        for (int c = 0; c < N_COLS; c++) {
            int64_t cols = COLS[c];
            /* the reference is O(rows * cols) in double: fewer rows for long rows */
            int64_t rows = cols > 2000 ? 9 : 37;
            test_quantize(isa, cols);
            /* every weight type of the table */
            for (int k = 0; kiln_type_traits_at(k); k++) {
                const kiln_type_traits *tt = kiln_type_traits_at(k);
                if (!tt->is_weight) continue;
                if (is_quant(tt->type)) test_matmul(isa, tt->type, rows, cols, 13, 1); /* 8 + 4 + 1 tokens */
                test_matmul(isa, tt->type, rows, cols, 3, 0);
            }
        }
        test_matmul(isa, KILN_TYPE_F32, 7, 45, 2, 0); /* float rows need not be whole blocks */
        test_multi();
        printf("%-11s %s\n", isa, n_failed == before ? "ok" : "FAILED");
    }
    printf("%d checks, %d failed\n", n_checked, n_failed);
    return n_failed ? 1 : 0;
}
