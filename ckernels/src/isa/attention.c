/* Attention over the fp16 KV cache: scores of queries against transposed keys, and the
 * weighted sum of value rows. Compiled once per ISA variant like the matrix kernels
 * (F16C / AVX512 conversions where the variant has them: the compiler does not
 * vectorize half -> float conversions on its own); forward.c reaches them through
 * kiln_attn_scores_f16 / kiln_attn_values_f16 (kernels.h).
 *
 * Both sum in double, so a sum is the exact one up to rounding far below float's: the
 * attention output, rounded to float once at the end, is the same float whatever the
 * ISA, and a float64 NumPy computation (the reference model) gives it too. It feeds the
 * 8-bit quantization of the output projection's input, where a last-bit difference can
 * flip a rounding (qgemm.c).
 *
 * Every variant also gives the same doubles, which split attention's partial sums
 * (dout) need: a float query times an fp16 key is exact in double (24 + 11 significant
 * bits), so the scores may fuse multiply and add; a double weight times an fp16 value
 * is not, so the values loops multiply, round, then add, in key order, as scalar does. */
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

/* The vector variants differ only in width: a small layer of double vectors (VD_W
 * lanes) lets one scores loop and one values loop serve AVX2 and AVX512. */
#if defined(ATT_AVX512)
#define ATT_SIMD 1
typedef __m512d vd;
#define VD_W 8
#define VALUES_NV 4 /* vectors of dimensions per values pass: R x 4 accumulators of 32 */
#define vd_zero _mm512_setzero_pd
#define vd_set1 _mm512_set1_pd
#define vd_fma _mm512_fmadd_pd
#define vd_mul _mm512_mul_pd
#define vd_add _mm512_add_pd
#define vd_store _mm512_storeu_pd
static inline void vd_store_f32(float *p, vd v) { _mm256_storeu_ps(p, _mm512_cvtpd_ps(v)); }
/* 2 * VD_W halves from p, widened to doubles */
static inline __attribute__((always_inline)) void vd_load2_f16(const kiln_fp16 *p, vd *lo, vd *hi) {
    __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    *lo = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
    *hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)));
}
#elif defined(ATT_AVX2)
#define ATT_SIMD 1
typedef __m256d vd;
#define VD_W 4
#define VALUES_NV 2 /* R x 2 accumulators fit the 16 registers */
#define vd_zero _mm256_setzero_pd
#define vd_set1 _mm256_set1_pd
#define vd_fma _mm256_fmadd_pd
#define vd_mul _mm256_mul_pd
#define vd_add _mm256_add_pd
#define vd_store _mm256_storeu_pd
static inline void vd_store_f32(float *p, vd v) { _mm_storeu_ps(p, _mm256_cvtpd_ps(v)); }
static inline __attribute__((always_inline)) void vd_load2_f16(const kiln_fp16 *p, vd *lo, vd *hi) {
    __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    *lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
    *hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
}
#endif

#ifdef ATT_SIMD
/* 2 * VD_W keys per pass (R x 2 accumulators); the queries are widened to double once,
 * so each multiply-add takes its broadcast straight from memory */
static inline __attribute__((always_inline)) void
scores_tile_simd(double *scores, const float *const *q, const int R, const kiln_fp16 *keys_t,
                 int n_keys, int head_dim, int n_ctx_pad, double scale) {
    double qd_all[ATT_TILE][KILN_ATT_MAX_HEAD_DIM];
    for (int r = 0; r < R; r++)
        for (int d = 0; d < head_dim; d++) qd_all[r][d] = q[r][d];
    for (int p0 = 0; p0 < n_keys; p0 += 2 * VD_W) {
        vd acc[ATT_TILE][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = vd_zero();
        for (int d = 0; d < head_dim; d++) {
            vd k0, k1;
            vd_load2_f16(keys_t + (size_t)d * n_ctx_pad + p0, &k0, &k1);
            for (int r = 0; r < R; r++) {
                vd qd = vd_set1(qd_all[r][d]);
                acc[r][0] = vd_fma(qd, k0, acc[r][0]);
                acc[r][1] = vd_fma(qd, k1, acc[r][1]);
            }
        }
        vd sc = vd_set1(scale);
        for (int r = 0; r < R; r++) {
            double *out = scores + (size_t)r * n_ctx_pad + p0;
            vd_store(out, vd_mul(acc[r][0], sc));
            vd_store(out + VD_W, vd_mul(acc[r][1], sc));
        }
    }
}
#define SCORES_TILE scores_tile_simd
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

#ifdef ATT_SIMD
/* VALUES_NV * VD_W dimensions per pass: R x VALUES_NV accumulators; a tail of fewer
 * dimensions goes to the scalar loop */
static inline __attribute__((always_inline)) void
values_tile_simd(float *const *out, double *const *dout, const double *weights, const int R,
                 const kiln_fp16 *values, int n_keys, int head_dim, int stride, int n_ctx_pad) {
    const int step = VALUES_NV * VD_W;
    int d0 = 0;
    for (; d0 + step <= head_dim; d0 += step) {
        vd acc[ATT_TILE][VALUES_NV];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < VALUES_NV; j++) acc[r][j] = vd_zero();
        for (int p = 0; p < n_keys; p++) {
            vd v[VALUES_NV];
            for (int j = 0; j < VALUES_NV; j += 2)
                vd_load2_f16(values + (size_t)p * stride + d0 + j * VD_W, &v[j], &v[j + 1]);
            for (int r = 0; r < R; r++) {
                vd w = vd_set1(weights[(size_t)r * n_ctx_pad + p]);
                /* not fused: see the top of the file */
                for (int j = 0; j < VALUES_NV; j++) acc[r][j] = vd_add(acc[r][j], vd_mul(w, v[j]));
            }
        }
        for (int r = 0; r < R; r++)
            for (int j = 0; j < VALUES_NV; j++) {
                if (dout) vd_store(dout[r] + d0 + j * VD_W, acc[r][j]);
                else vd_store_f32(out[r] + d0 + j * VD_W, acc[r][j]);
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
#define VALUES_TILE values_tile_simd
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
