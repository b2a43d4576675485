/* The super-block kernels (isa/kgemm.c: Q2_K .. Q6_K, IQ4_XS with Q8_K activations)
 * and the Q8_K activation quantizer: each variant against scalar bit for bit, and its
 * own results independent of threads and batching. The blocks are random bytes with
 * finite fp16 d and dmin (every pattern of the quants and sub-block scales is valid). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

#include "codecs_k.h"

#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))

static kiln_pool *kpools[3];

int is_k_type(int type) {
    const kiln_type_traits *tt = kiln_type_traits_of(type);
    return tt && tt->is_weight && tt->act_type == KILN_TYPE_Q8_K;
}

/* byte offsets of d and dmin (-1: none) in a block */
static void scale_offsets(int type, int *d, int *dmin) {
    *dmin = -1;
    switch (type) {
    case KILN_TYPE_Q2_K: *d = 80, *dmin = 82; break;
    case KILN_TYPE_Q3_K: *d = 108; break;
    case KILN_TYPE_Q4_K: case KILN_TYPE_Q5_K: *d = 0, *dmin = 2; break;
    case KILN_TYPE_Q6_K: *d = 208; break;
    default: *d = 0; break; /* IQ4_XS */
    }
}

static uint8_t *make_k_weights(int type, int64_t rows, int64_t cols) {
    const kiln_type_traits *tt = kiln_type_traits_of(type);
    size_t n = (size_t)rows * (size_t)(cols / QK_K) * (size_t)tt->type_size;
    uint8_t *w = malloc(n);
    for (size_t i = 0; i < n; i++) w[i] = (uint8_t)rnd();
    int od, om;
    scale_offsets(type, &od, &om);
    for (size_t b = 0; b < n / (size_t)tt->type_size; b++) {
        uint8_t *blk = w + b * (size_t)tt->type_size;
        kiln_fp16 d = kiln_fp32_to_fp16(rnd_unit() * 0.01f), m = kiln_fp32_to_fp16(rnd_unit() * 0.01f);
        memcpy(blk + od, &d, 2);
        if (om >= 0) memcpy(blk + om, &m, 2);
    }
    return w;
}

static void check_k_matmul(const char *isa, int type, int64_t rows, int64_t cols, int n_tokens) {
    uint8_t *w = make_k_weights(type, rows, cols);
    float *x = malloc(sizeof(float) * (size_t)n_tokens * (size_t)cols);
    rnd_floats(x, (size_t)n_tokens * (size_t)cols, 3.0f);
    kiln_matrix m;
    char where[96];
    snprintf(where, sizeof where, "%s rows %lld cols %lld tokens %d", kiln_type_traits_of(type)->name,
             (long long)rows, (long long)cols, n_tokens);
    if (kiln_matrix_init(&m, type, rows, cols, w) != 0) {
        fail("kiln_matrix_init", isa, "%s", where);
        free(w), free(x);
        return;
    }
    size_t ny = (size_t)n_tokens * (size_t)rows;
    float *y_s = malloc(sizeof(float) * ny), *y1 = malloc(sizeof(float) * ny);
    float *y2 = malloc(sizeof(float) * ny), *yt = malloc(sizeof(float) * ny);
    use_isa("scalar");
    kiln_matmul(kpools[1], &m, x, n_tokens, y_s);
    use_isa(isa);
    kiln_matmul(kpools[1], &m, x, n_tokens, y1);
    kiln_matmul(kpools[2], &m, x, n_tokens, y2);
    for (int t = 0; t < n_tokens; t++)
        kiln_matmul(kpools[1], &m, x + (size_t)t * (size_t)cols, 1, yt + (size_t)t * (size_t)rows);
    check_bits("kgemm", isa, y1, y_s, ny, 4, where);
    check_bits("kgemm threads", isa, y2, y1, ny, 4, where);
    check_bits("kgemm batching", isa, yt, y1, ny, 4, where);
    kiln_matrix_free(&m);
    free(w), free(x), free(y_s), free(y1), free(y2), free(yt);
}

/* Planted cases: an all-zero super-block, .5 ties (iscale exactly -1 or 1), a |x| tie
 * between a negative first and a positive later element (the first sets the sign),
 * tiny values, a negative absmax. */
static void check_quantize_q8_K(const kiln_isa_ops *ops, const kiln_isa_ops *scalar, int nb) {
    int64_t n = (int64_t)nb * QK_K;
    float *x = malloc(sizeof(float) * (size_t)n);
    rnd_floats(x, (size_t)n, 3.0f);
    for (int b = 0; b < nb && b < 5; b++)
        for (int j = 0; j < QK_K; j++) {
            float *v = &x[b * QK_K + j];
            if (b == 0) *v = 0.0f;
            if (b == 1) *v = j == 0 ? -127.0f : j == 77 ? 127.0f : (float)(j % 40) - 19.5f;
            if (b == 2) *v = j == 9 ? 127.0f : (float)(j % 30) - 14.5f;
            if (b == 3) *v *= 1e-30f;
            if (b == 4) *v = j == 200 ? -50.0f : *v;
        }
    size_t bytes = sizeof(block_q8_K) * (size_t)(nb + 1);
    block_q8_K *a = malloc(bytes), *s = malloc(bytes), *r = malloc(bytes);
    memset(a, 0xa5, bytes), memset(s, 0xa5, bytes), memset(r, 0xa5, bytes);
    ops->quantize_row_q8_K(x, a, n);
    scalar->quantize_row_q8_K(x, s, n);
    kiln_quantize_row_q8_K(x, r, n);
    char where[48];
    snprintf(where, sizeof where, "super-blocks %d", nb);
    check_bits("quantize_row_q8_K", ops->name, a, s, bytes, 1, where);
    check_bits("quantize_row_q8_K (scalar vs the codec)", "scalar", s, r, bytes, 1, where);
    if (nb > 2)
        CHECK(a[1].d > 0 && a[1].qs[0] == -127 && a[1].qs[77] == 127 && a[1].qs[1] == -18 &&
              a[1].qs[2] == -18 && a[2].d < 0 && a[2].qs[1] == 14,
              "quantize_row_q8_K", ops->name, "ties round to even; the first |x| maximum sets d's sign");
    free(x), free(a), free(s), free(r);
}

void test_kgemm(const char *isa) {
    const kiln_isa_ops *scalar = use_isa("scalar"), *ops = use_isa(isa);
    static const int nbs[] = {1, 2, 3, 5, 6, 11};
    for (int i = 0; i < N_OF(nbs); i++) check_quantize_q8_K(ops, scalar, nbs[i]);
    for (int t = 1; t <= 2; t++) kpools[t] = kiln_pool_create(t);
    static const int64_t rows[] = {1, 3, 5, 37};
    static const int64_t cols[] = {256, 512, 1536, 2816};
    static const int tokens[] = {1, 2, 3, 7, 8, 9, 16, 17, 33}; /* AMX: 16-token tiles */
    static const int tokens_small[] = {1, 3, 9, 17};
    const int *tv = small_sizes ? tokens_small : tokens;
    int nt = small_sizes ? N_OF(tokens_small) : N_OF(tokens);
    for (int k = 0; kiln_type_traits_at(k); k++) {
        int type = kiln_type_traits_at(k)->type;
        if (!is_k_type(type)) continue;
        for (int r = 0; r < N_OF(rows); r++)
            for (int c = 0; c < (small_sizes ? 3 : N_OF(cols)); c++)
                for (int t = 0; t < nt; t++) check_k_matmul(isa, type, rows[r], cols[c], tv[t]);
        /* a batch over more than one L2-sized block of rows */
        check_k_matmul(isa, type, small_sizes ? 150 : 600, 2816, 10);
        check_k_matmul(isa, type, small_sizes ? 19 : 45, 2816, small_sizes ? 17 : 40); /* AMX: 8-row tiles and a tail */
    }
    for (int t = 1; t <= 2; t++) kiln_pool_free(kpools[t]);
}
