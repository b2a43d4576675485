/* Attention over the fp16 KV cache: scores of queries against transposed keys, and the
 * weighted sum of value rows. Compiled once per ISA variant like the matrix kernels
 * (F16C / AVX512 conversions where the variant has them: the compiler does not
 * vectorize half -> float conversions on its own); forward.c reaches them through
 * kiln_attn_scores_f16 / kiln_attn_values_f16 (kernels.h). */
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

/* scores[r][p] = scale * q[r] . key p for r < R, p < n_keys, each key block loaded
 * (and widened) once for all R queries; keys_t is (head_dim, n_ctx_pad) halves, score
 * rows are n_ctx_pad apart and are written in whole blocks (the pad is a multiple of
 * ATT_BLOCK). R is a compile-time constant in each caller, so acc stays in registers.
 */
static inline __attribute__((always_inline)) void
scores_tile_scalar(float *scores, const float *const *q, const int R, const kiln_fp16 *keys_t,
                   int n_keys, int head_dim, int n_ctx_pad, float scale) {
    for (int p0 = 0; p0 < n_keys; p0 += ATT_BLOCK) {
        float acc[ATT_TILE][ATT_BLOCK] = {{0}};
        for (int d = 0; d < head_dim; d++) {
            const kiln_fp16 *kd = keys_t + (size_t)d * n_ctx_pad + p0;
            float kf[ATT_BLOCK];
            for (int j = 0; j < ATT_BLOCK; j++) kf[j] = kiln_fp16_to_fp32(kd[j]);
            for (int r = 0; r < R; r++)
                for (int j = 0; j < ATT_BLOCK; j++) acc[r][j] += q[r][d] * kf[j];
        }
        for (int r = 0; r < R; r++)
            for (int j = 0; j < ATT_BLOCK; j++)
                scores[(size_t)r * n_ctx_pad + p0 + j] = acc[r][j] * scale;
    }
}

#ifdef ATT_AVX2
static inline __attribute__((always_inline)) void
scores_tile_avx2(float *scores, const float *const *q, const int R, const kiln_fp16 *keys_t,
                 int n_keys, int head_dim, int n_ctx_pad, float scale) {
    for (int p0 = 0; p0 < n_keys; p0 += ATT_BLOCK) {
        __m256 acc[ATT_TILE][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int d = 0; d < head_dim; d++) {
            const kiln_fp16 *kd = keys_t + (size_t)d * n_ctx_pad + p0;
            __m256 k0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)kd));
            __m256 k1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kd + 8)));
            for (int r = 0; r < R; r++) {
                __m256 qd = _mm256_set1_ps(q[r][d]);
                acc[r][0] = _mm256_fmadd_ps(qd, k0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(qd, k1, acc[r][1]);
            }
        }
        __m256 sc = _mm256_set1_ps(scale);
        for (int r = 0; r < R; r++) {
            float *out = scores + (size_t)r * n_ctx_pad + p0;
            _mm256_storeu_ps(out, _mm256_mul_ps(acc[r][0], sc));
            _mm256_storeu_ps(out + 8, _mm256_mul_ps(acc[r][1], sc));
        }
    }
}

#endif

#ifdef ATT_AVX512
static inline __attribute__((always_inline)) void
scores_tile_avx512(float *scores, const float *const *q, const int R, const kiln_fp16 *keys_t,
                   int n_keys, int head_dim, int n_ctx_pad, float scale) {
    for (int p0 = 0; p0 < n_keys; p0 += ATT_BLOCK) {
        __m512 acc[ATT_TILE];
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
        for (int d = 0; d < head_dim; d++) {
            const kiln_fp16 *kd = keys_t + (size_t)d * n_ctx_pad + p0;
            __m512 kv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)kd));
            for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][d]), kv, acc[r]);
        }
        for (int r = 0; r < R; r++)
            _mm512_storeu_ps(scores + (size_t)r * n_ctx_pad + p0,
                             _mm512_mul_ps(acc[r], _mm512_set1_ps(scale)));
    }
}

#endif

#ifdef ATT_AVX2
static void scores_avx2_1(float *s, const float *const *q, const kiln_fp16 *k,
                                           int n, int hd, int pad, float scale) {
    scores_tile_avx2(s, q, 1, k, n, hd, pad, scale);
}
static void scores_avx2_tile(float *s, const float *const *q, const kiln_fp16 *k,
                                              int n, int hd, int pad, float scale) {
    scores_tile_avx2(s, q, ATT_TILE, k, n, hd, pad, scale);
}
#endif

#ifdef ATT_AVX512
static void scores_avx512_1(float *s, const float *const *q, const kiln_fp16 *k,
                                               int n, int hd, int pad, float scale) {
    scores_tile_avx512(s, q, 1, k, n, hd, pad, scale);
}
static void scores_avx512_tile(float *s, const float *const *q,
                                                  const kiln_fp16 *k, int n, int hd, int pad,
                                                  float scale) {
    scores_tile_avx512(s, q, ATT_TILE, k, n, hd, pad, scale);
}
#endif

static void scores_scalar_1(float *s, const float *const *q, const kiln_fp16 *k, int n, int hd,
                            int pad, float scale) {
    scores_tile_scalar(s, q, 1, k, n, hd, pad, scale);
}
static void scores_scalar_tile(float *s, const float *const *q, const kiln_fp16 *k, int n, int hd,
                               int pad, float scale) {
    scores_tile_scalar(s, q, ATT_TILE, k, n, hd, pad, scale);
}

/* Scores of R = 1 or ATT_TILE queries (see scores_tile_scalar), on the widest loops this
 * variant was compiled for. */
void KILN_FN(kiln_attn_scores_f16)(int R, float *scores, const float *const *q,
                                   const kiln_fp16 *keys_t, int n_keys, int head_dim,
                                   int n_ctx_pad, float scale) {
#if defined(ATT_AVX512)
    (R == 1 ? scores_avx512_1 : scores_avx512_tile)(scores, q, keys_t, n_keys, head_dim,
                                                    n_ctx_pad, scale);
#elif defined(ATT_AVX2)
    (R == 1 ? scores_avx2_1 : scores_avx2_tile)(scores, q, keys_t, n_keys, head_dim, n_ctx_pad,
                                                scale);
#else
    (R == 1 ? scores_scalar_1 : scores_scalar_tile)(scores, q, keys_t, n_keys, head_dim,
                                                    n_ctx_pad, scale);
#endif
}

/* out = sum over p < n_keys of weights[p] * value row p (fp16 rows `stride` halves apart),
 * summed in order of p for each dimension on every path. Blocks of 4 * ATT_BLOCK dims
 * first, so each weight is loaded once for them. */
static void attention_values_scalar(float *out, const float *weights, const kiln_fp16 *values,
                                    int n_keys, int head_dim, int stride) {
    for (int d = 0; d < head_dim; d++) {
        float acc = 0.0f;
        for (int p = 0; p < n_keys; p++)
            acc += weights[p] * kiln_fp16_to_fp32(values[(size_t)p * stride + d]);
        out[d] = acc;
    }
}

#ifdef ATT_AVX2
static void attention_values_avx2(float *out, const float *weights,
                                                   const kiln_fp16 *values, int n_keys,
                                                   int head_dim, int stride) {
    int d0 = 0;
    for (; d0 + 32 <= head_dim; d0 += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int p = 0; p < n_keys; p++) {
            const kiln_fp16 *v = values + (size_t)p * stride + d0;
            __m256 w = _mm256_set1_ps(weights[p]);
            a0 = _mm256_fmadd_ps(w, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)v)), a0);
            a1 = _mm256_fmadd_ps(w, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 8))), a1);
            a2 = _mm256_fmadd_ps(w, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 16))), a2);
            a3 = _mm256_fmadd_ps(w, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 24))), a3);
        }
        _mm256_storeu_ps(out + d0, a0);
        _mm256_storeu_ps(out + d0 + 8, a1);
        _mm256_storeu_ps(out + d0 + 16, a2);
        _mm256_storeu_ps(out + d0 + 24, a3);
    }
    for (; d0 + 8 <= head_dim; d0 += 8) {
        __m256 a = _mm256_setzero_ps();
        for (int p = 0; p < n_keys; p++)
            a = _mm256_fmadd_ps(_mm256_set1_ps(weights[p]),
                                _mm256_cvtph_ps(_mm_loadu_si128(
                                    (const __m128i *)(values + (size_t)p * stride + d0))), a);
        _mm256_storeu_ps(out + d0, a);
    }
    if (d0 < head_dim)
        attention_values_scalar(out + d0, weights, values + d0, n_keys, head_dim - d0, stride);
}

#endif

#ifdef ATT_AVX512
static void attention_values_avx512(float *out, const float *weights,
                                                       const kiln_fp16 *values, int n_keys,
                                                       int head_dim, int stride) {
    int d0 = 0;
    for (; d0 + 4 * ATT_BLOCK <= head_dim; d0 += 4 * ATT_BLOCK) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int p = 0; p < n_keys; p++) {
            const kiln_fp16 *v = values + (size_t)p * stride + d0;
            __m512 w = _mm512_set1_ps(weights[p]);
            a0 = _mm512_fmadd_ps(w, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)v)), a0);
            a1 = _mm512_fmadd_ps(w, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + 16))), a1);
            a2 = _mm512_fmadd_ps(w, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + 32))), a2);
            a3 = _mm512_fmadd_ps(w, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + 48))), a3);
        }
        _mm512_storeu_ps(out + d0, a0);
        _mm512_storeu_ps(out + d0 + 16, a1);
        _mm512_storeu_ps(out + d0 + 32, a2);
        _mm512_storeu_ps(out + d0 + 48, a3);
    }
    for (; d0 + ATT_BLOCK <= head_dim; d0 += ATT_BLOCK) {
        __m512 a = _mm512_setzero_ps();
        for (int p = 0; p < n_keys; p++)
            a = _mm512_fmadd_ps(_mm512_set1_ps(weights[p]),
                                _mm512_cvtph_ps(_mm256_loadu_si256(
                                    (const __m256i *)(values + (size_t)p * stride + d0))), a);
        _mm512_storeu_ps(out + d0, a);
    }
    if (d0 < head_dim)
        attention_values_scalar(out + d0, weights, values + d0, n_keys, head_dim - d0, stride);
}
#endif

void KILN_FN(kiln_attn_values_f16)(float *out, const float *weights, const kiln_fp16 *values,
                                   int n_keys, int head_dim, int stride) {
#if defined(ATT_AVX512)
    attention_values_avx512(out, weights, values, n_keys, head_dim, stride);
#elif defined(ATT_AVX2)
    attention_values_avx2(out, weights, values, n_keys, head_dim, stride);
#else
    attention_values_scalar(out, weights, values, n_keys, head_dim, stride);
#endif
}
