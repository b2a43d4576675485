/* Attention over the fp16 KV cache: scores of queries against transposed keys, and the
 * weighted sum of value rows. Compiled once per ISA variant like the matrix kernels
 * (F16C / AVX512 conversions where the variant has them: the compiler does not
 * vectorize half -> float conversions on its own); forward.c reaches them through
 * kiln_attn_scores_f16 / kiln_attn_values_f16 (kernels.h).
 *
 * Both sum in double. A float query times an fp16 key (or a double weight times an
 * fp16 value) is exact in double, so a sum is the exact one up to rounding far below
 * float's: the attention output, rounded to float once at the end, does not depend on
 * the ISA or the order of the sums, and a float64 NumPy computation (the reference
 * model) gives the same floats. It feeds the 8-bit quantization of the output
 * projection's input, where a last-bit difference can flip a rounding (qgemm.c). */
#include "isa.h"
#include "kernels.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define ATT_AVX512 1
#endif
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define ATT_AVX2 1
#endif

#define ATT_BLOCK KILN_ATT_BLOCK
#define ATT_TILE KILN_ATT_TILE
_Static_assert(ATT_TILE == 4, "the kernels below are instantiated for 1..4 queries");

/* scores[r][p] = scale * q[r] . key p for r < R, p < n_keys, each key block loaded
 * (and widened) once for all R queries; keys_t is (head_dim, n_ctx_pad) halves, score
 * rows are n_ctx_pad apart and are written in whole blocks (the pad is a multiple of
 * ATT_BLOCK). R is a compile-time constant in each caller, so acc stays in registers.
 */
static inline __attribute__((always_inline)) void
scores_tile_scalar(double *scores, const float *const *q, const int R, const kiln_fp16 *keys_t,
                   int n_keys, int head_dim, int n_ctx_pad, double scale) {
    for (int p0 = 0; p0 < n_keys; p0 += ATT_BLOCK) {
        double acc[ATT_TILE][ATT_BLOCK] = {{0}};
        for (int d = 0; d < head_dim; d++) {
            const kiln_fp16 *kd = keys_t + (size_t)d * n_ctx_pad + p0;
            double kf[ATT_BLOCK];
            for (int j = 0; j < ATT_BLOCK; j++) kf[j] = kiln_fp16_to_fp32(kd[j]);
            for (int r = 0; r < R; r++)
                for (int j = 0; j < ATT_BLOCK; j++) acc[r][j] += (double)q[r][d] * kf[j];
        }
        for (int r = 0; r < R; r++)
            for (int j = 0; j < ATT_BLOCK; j++)
                scores[(size_t)r * n_ctx_pad + p0 + j] = acc[r][j] * scale;
    }
}

#ifdef ATT_AVX2
/* 8 keys per pass: 4 doubles per register, so R x 2 accumulators fit the 16 registers */
static inline __attribute__((always_inline)) void
scores_tile_avx2(double *scores, const float *const *q, const int R, const kiln_fp16 *keys_t,
                 int n_keys, int head_dim, int n_ctx_pad, double scale) {
    double qd_all[ATT_TILE][KILN_ATT_MAX_HEAD_DIM];
    for (int r = 0; r < R; r++)
        for (int d = 0; d < head_dim; d++) qd_all[r][d] = q[r][d];
    for (int p0 = 0; p0 < n_keys; p0 += 8) {
        __m256d acc[ATT_TILE][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_pd();
        for (int d = 0; d < head_dim; d++) {
            const kiln_fp16 *kd = keys_t + (size_t)d * n_ctx_pad + p0;
            __m256 k8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)kd));
            __m256d k0 = _mm256_cvtps_pd(_mm256_castps256_ps128(k8));
            __m256d k1 = _mm256_cvtps_pd(_mm256_extractf128_ps(k8, 1));
            for (int r = 0; r < R; r++) {
                __m256d qd = _mm256_set1_pd(qd_all[r][d]);
                acc[r][0] = _mm256_fmadd_pd(qd, k0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_pd(qd, k1, acc[r][1]);
            }
        }
        __m256d sc = _mm256_set1_pd(scale);
        for (int r = 0; r < R; r++) {
            double *out = scores + (size_t)r * n_ctx_pad + p0;
            _mm256_storeu_pd(out, _mm256_mul_pd(acc[r][0], sc));
            _mm256_storeu_pd(out + 4, _mm256_mul_pd(acc[r][1], sc));
        }
    }
}

#endif

#ifdef ATT_AVX512
static inline __attribute__((always_inline)) void
scores_tile_avx512(double *scores, const float *const *q, const int R, const kiln_fp16 *keys_t,
                   int n_keys, int head_dim, int n_ctx_pad, double scale) {
    double qd_all[ATT_TILE][KILN_ATT_MAX_HEAD_DIM];
    for (int r = 0; r < R; r++)
        for (int d = 0; d < head_dim; d++) qd_all[r][d] = q[r][d];
    for (int p0 = 0; p0 < n_keys; p0 += ATT_BLOCK) {
        __m512d acc[ATT_TILE][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_pd();
        for (int d = 0; d < head_dim; d++) {
            const kiln_fp16 *kd = keys_t + (size_t)d * n_ctx_pad + p0;
            __m512 k16 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)kd));
            __m512d k0 = _mm512_cvtps_pd(_mm512_castps512_ps256(k16));
            __m512d k1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(k16), 1)));
            for (int r = 0; r < R; r++) {
                __m512d qd = _mm512_set1_pd(qd_all[r][d]);
                acc[r][0] = _mm512_fmadd_pd(qd, k0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_pd(qd, k1, acc[r][1]);
            }
        }
        __m512d sc = _mm512_set1_pd(scale);
        for (int r = 0; r < R; r++) {
            double *out = scores + (size_t)r * n_ctx_pad + p0;
            _mm512_storeu_pd(out, _mm512_mul_pd(acc[r][0], sc));
            _mm512_storeu_pd(out + 8, _mm512_mul_pd(acc[r][1], sc));
        }
    }
}

#endif

#if defined(ATT_AVX512)
#define SCORES_TILE scores_tile_avx512
#elif defined(ATT_AVX2)
#define SCORES_TILE scores_tile_avx2
#else
#define SCORES_TILE scores_tile_scalar
#endif

/* One instance per query count, so the accumulators of each stay in registers. */
#define SCORES_R(R_)                                                                        \
    static void scores_##R_(double *s, const float *const *q, const kiln_fp16 *k, int n,    \
                            int hd, int pad, double scale) {                                \
        SCORES_TILE(s, q, R_, k, n, hd, pad, scale);                                        \
    }
SCORES_R(1)
SCORES_R(2)
SCORES_R(3)
SCORES_R(4)

/* Scores of R (1 .. ATT_TILE) queries (see scores_tile_scalar), on the widest loops this
 * variant was compiled for. */
void KILN_FN(kiln_attn_scores_f16)(int R, double *scores, const float *const *q,
                                   const kiln_fp16 *keys_t, int n_keys, int head_dim,
                                   int n_ctx_pad, double scale) {
    static void (*const by_r[])(double *, const float *const *, const kiln_fp16 *, int, int, int,
                                double) = {scores_1, scores_2, scores_3, scores_4};
    by_r[R - 1](scores, q, keys_t, n_keys, head_dim, n_ctx_pad, scale);
}

/* out[r][d] = sum over p < n_keys of weights[r][p] * value row p [d] for r < R (1 ..
 * ATT_TILE; weight rows n_ctx_pad apart, 0 past a query's own keys), value rows fp16,
 * `stride` halves apart; in double, rounded to float once, or left in double in dout
 * (partial sums that forward.c combines) when dout is not NULL. Each value block is
 * loaded and widened once for all R queries. */
static inline __attribute__((always_inline)) void
values_tile_scalar(float *const *out, double *const *dout, const double *weights, const int R,
                   const kiln_fp16 *values, int n_keys, int head_dim, int stride, int n_ctx_pad) {
    for (int d = 0; d < head_dim; d++) {
        double acc[ATT_TILE] = {0};
        for (int p = 0; p < n_keys; p++) {
            double v = kiln_fp16_to_fp32(values[(size_t)p * stride + d]);
            for (int r = 0; r < R; r++) acc[r] += weights[(size_t)r * n_ctx_pad + p] * v;
        }
        for (int r = 0; r < R; r++) {
            if (dout) dout[r][d] = acc[r];
            else out[r][d] = (float)acc[r];
        }
    }
}

#ifdef ATT_AVX2
/* 8 dimensions per pass: R x 2 accumulators of 4 doubles */
static inline __attribute__((always_inline)) void
values_tile_avx2(float *const *out, double *const *dout, const double *weights, const int R,
                 const kiln_fp16 *values, int n_keys, int head_dim, int stride, int n_ctx_pad) {
    int d0 = 0;
    for (; d0 + 8 <= head_dim; d0 += 8) {
        __m256d acc[ATT_TILE][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_pd();
        for (int p = 0; p < n_keys; p++) {
            __m256 v8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(values + (size_t)p * stride + d0)));
            __m256d v0 = _mm256_cvtps_pd(_mm256_castps256_ps128(v8));
            __m256d v1 = _mm256_cvtps_pd(_mm256_extractf128_ps(v8, 1));
            for (int r = 0; r < R; r++) {
                __m256d w = _mm256_set1_pd(weights[(size_t)r * n_ctx_pad + p]);
                acc[r][0] = _mm256_fmadd_pd(w, v0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_pd(w, v1, acc[r][1]);
            }
        }
        for (int r = 0; r < R; r++) {
            if (dout) {
                _mm256_storeu_pd(dout[r] + d0, acc[r][0]);
                _mm256_storeu_pd(dout[r] + d0 + 4, acc[r][1]);
            } else {
                _mm_storeu_ps(out[r] + d0, _mm256_cvtpd_ps(acc[r][0]));
                _mm_storeu_ps(out[r] + d0 + 4, _mm256_cvtpd_ps(acc[r][1]));
            }
        }
    }
    if (d0 < head_dim) {
        float *rest[ATT_TILE];
        double *drest[ATT_TILE];
        for (int r = 0; r < R; r++) {
            rest[r] = dout ? NULL : out[r] + d0;
            drest[r] = dout ? dout[r] + d0 : NULL;
        }
        values_tile_scalar(rest, dout ? drest : NULL, weights, R, values + d0, n_keys,
                           head_dim - d0, stride, n_ctx_pad);
    }
}
#endif

#ifdef ATT_AVX512
/* 2 * ATT_BLOCK dimensions per pass: R x 4 accumulators of 8 doubles */
static inline __attribute__((always_inline)) void
values_tile_avx512(float *const *out, double *const *dout, const double *weights, const int R,
                   const kiln_fp16 *values, int n_keys, int head_dim, int stride, int n_ctx_pad) {
    int d0 = 0;
    for (; d0 + 2 * ATT_BLOCK <= head_dim; d0 += 2 * ATT_BLOCK) {
        __m512d acc[ATT_TILE][4];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_pd();
        for (int p = 0; p < n_keys; p++) {
            const kiln_fp16 *v = values + (size_t)p * stride + d0;
            __m512 va = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)v));
            __m512 vb = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + ATT_BLOCK)));
            __m512d vd[4] = {
                _mm512_cvtps_pd(_mm512_castps512_ps256(va)),
                _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(va), 1))),
                _mm512_cvtps_pd(_mm512_castps512_ps256(vb)),
                _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(vb), 1))),
            };
            for (int r = 0; r < R; r++) {
                __m512d w = _mm512_set1_pd(weights[(size_t)r * n_ctx_pad + p]);
                for (int j = 0; j < 4; j++) acc[r][j] = _mm512_fmadd_pd(w, vd[j], acc[r][j]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int j = 0; j < 4; j++) {
                if (dout) _mm512_storeu_pd(dout[r] + d0 + 8 * j, acc[r][j]);
                else _mm256_storeu_ps(out[r] + d0 + 8 * j, _mm512_cvtpd_ps(acc[r][j]));
            }
    }
    if (d0 < head_dim) {
        float *rest[ATT_TILE];
        double *drest[ATT_TILE];
        for (int r = 0; r < R; r++) {
            rest[r] = dout ? NULL : out[r] + d0;
            drest[r] = dout ? dout[r] + d0 : NULL;
        }
        values_tile_scalar(rest, dout ? drest : NULL, weights, R, values + d0, n_keys,
                           head_dim - d0, stride, n_ctx_pad);
    }
}
#endif

#if defined(ATT_AVX512)
#define VALUES_TILE values_tile_avx512
#elif defined(ATT_AVX2)
#define VALUES_TILE values_tile_avx2
#else
#define VALUES_TILE values_tile_scalar
#endif

#define VALUES_R(R_)                                                                        \
    static void values_##R_(float *const *out, double *const *dout, const double *w,        \
                            const kiln_fp16 *v, int n, int hd, int stride, int pad) {       \
        VALUES_TILE(out, dout, w, R_, v, n, hd, stride, pad);                               \
    }
VALUES_R(1)
VALUES_R(2)
VALUES_R(3)
VALUES_R(4)

void KILN_FN(kiln_attn_values_f16)(int R, float *const *out, double *const *dout,
                                   const double *weights, const kiln_fp16 *values, int n_keys,
                                   int head_dim, int stride, int n_ctx_pad) {
    static void (*const by_r[])(float *const *, double *const *, const double *, const kiln_fp16 *,
                                int, int, int, int) = {values_1, values_2, values_3, values_4};
    by_r[R - 1](out, dout, weights, values, n_keys, head_dim, stride, n_ctx_pad);
}
