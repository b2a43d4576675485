/* Unquantized weights (F32, F16, BF16 rows in GGUF layout) times float32
 * activations, for files stored without quantization. Rows [r0, r1), every token;
 * up to KILN_FNT tokens share each weight load. */
#include "isa.h"
#include "kernels_impl.h"

#define KILN_FNT 4

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

static inline __m512 kiln_load_w16(int type, const void *w, int64_t c, __mmask16 m) {
    if (type == KILN_TYPE_F32) return _mm512_maskz_loadu_ps(m, (const float *)w + c);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)w + c);
    if (type == KILN_TYPE_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __attribute__((always_inline)) void
kiln_fgemm_row(const kiln_fgemm_args *a, int64_t r, int t0, const int nt) {
    const size_t es = a->type == KILN_TYPE_F32 ? 4 : 2;
    const void *w = (const uint8_t *)a->w + (size_t)r * a->cols * es;
    __m512 acc[KILN_FNT];
    for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < a->cols; c += 16) {
        __mmask16 m = a->cols - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (a->cols - c)) - 1);
        __m512 wv = kiln_load_w16(a->type, w, c, m);
        for (int t = 0; t < nt; t++)
            acc[t] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, a->x + (size_t)(t0 + t) * a->cols + c), acc[t]);
    }
    for (int t = 0; t < nt; t++) a->y[(size_t)(t0 + t) * a->rows + r] = _mm512_reduce_add_ps(acc[t]);
}

#elif defined(__AVX2__)
#include <immintrin.h>

static inline __attribute__((always_inline)) void
kiln_fgemm_row(const kiln_fgemm_args *a, int64_t r, int t0, const int nt) {
    const size_t es = a->type == KILN_TYPE_F32 ? 4 : 2;
    const uint8_t *w = (const uint8_t *)a->w + (size_t)r * a->cols * es;
    __m256 acc[KILN_FNT];
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= a->cols; c += 8) {
        __m256 wv;
        if (a->type == KILN_TYPE_F32) wv = _mm256_loadu_ps((const float *)w + c);
        else {
            __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + c));
            wv = a->type == KILN_TYPE_F16 ? _mm256_cvtph_ps(h)
                                          : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        }
        for (int t = 0; t < nt; t++)
            acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a->x + (size_t)(t0 + t) * a->cols + c), acc[t]);
    }
    for (int t = 0; t < nt; t++) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        float sum = _mm_cvtss_f32(s);
        const float *x = a->x + (size_t)(t0 + t) * a->cols;
        for (int64_t k = c; k < a->cols; k++) {
            sum += kiln_weight_f32(a->type, w, k) * x[k];
        }
        a->y[(size_t)(t0 + t) * a->rows + r] = sum;
    }
}

#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>

static inline __attribute__((always_inline)) void
kiln_fgemm_row(const kiln_fgemm_args *a, int64_t r, int t0, const int nt) {
    const size_t es = a->type == KILN_TYPE_F32 ? 4 : 2;
    const uint8_t *w = (const uint8_t *)a->w + (size_t)r * a->cols * es;
    float32x4_t acc[KILN_FNT];
    for (int t = 0; t < nt; t++) acc[t] = vdupq_n_f32(0.0f);
    int64_t c = 0;
    for (; c + 4 <= a->cols; c += 4) {
        float32x4_t wv;
        if (a->type == KILN_TYPE_F32) wv = vld1q_f32((const float *)w + c);
        else {
            uint16x4_t h = vld1_u16((const uint16_t *)w + c);
            wv = a->type == KILN_TYPE_F16 ? vcvt_f32_f16(vreinterpret_f16_u16(h))
                                          : vreinterpretq_f32_u32(vshll_n_u16(h, 16));
        }
        for (int t = 0; t < nt; t++)
            acc[t] = vfmaq_f32(acc[t], wv, vld1q_f32(a->x + (size_t)(t0 + t) * a->cols + c));
    }
    for (int t = 0; t < nt; t++) {
        float sum = vaddvq_f32(acc[t]);
        const float *x = a->x + (size_t)(t0 + t) * a->cols;
        for (int64_t k = c; k < a->cols; k++) {
            sum += kiln_weight_f32(a->type, w, k) * x[k];
        }
        a->y[(size_t)(t0 + t) * a->rows + r] = sum;
    }
}

#else
static void kiln_fgemm_row(const kiln_fgemm_args *a, int64_t r, int t0, const int nt) {
    const size_t es = a->type == KILN_TYPE_F32 ? 4 : 2;
    const uint8_t *w = (const uint8_t *)a->w + (size_t)r * a->cols * es;
    for (int t = t0; t < t0 + nt; t++) {
        const float *x = a->x + (size_t)t * a->cols;
        float sum = 0.0f;
        for (int64_t k = 0; k < a->cols; k++) {
            sum += kiln_weight_f32(a->type, w, k) * x[k];
        }
        a->y[(size_t)t * a->rows + r] = sum;
    }
}
#endif

void KILN_FN(kiln_fgemm)(const kiln_fgemm_args *a, int64_t r0, int64_t r1) {
    int t = 0;
    for (; t + KILN_FNT <= a->n_tokens; t += KILN_FNT)
        for (int64_t r = r0; r < r1; r++) kiln_fgemm_row(a, r, t, KILN_FNT);
    int rest = a->n_tokens - t;
    for (int64_t r = r0; r < r1; r++) {
        switch (rest) {
        case 1: kiln_fgemm_row(a, r, t, 1); break;
        case 2: kiln_fgemm_row(a, r, t, 2); break;
        case 3: kiln_fgemm_row(a, r, t, 3); break;
        default: break;
        }
    }
}
