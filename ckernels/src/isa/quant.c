/* Activation quantization to Q8_0 / Q8_1, bit-exact with the scalar reference codecs
 * (codecs.c, ggml's quantize_row_q8_*_ref): d = absmax / 127 in float, q = roundf(x *
 * (1 / d)) (ties away from zero), d stored as fp16 rounded to nearest even, and for
 * Q8_1 s = fp16(sum(q) * d). The SIMD versions differ only in how they compute the same
 * operations; the float products and the rounding are the same, so the bits are. */
#include "isa.h"
#include "codecs.h"
#include "codecs_k.h"
#include "kernels_impl.h"

#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>

/* roundf() of 8 floats: trunc, then step away from zero when |fraction| >= 0.5. */
static inline __m256i kiln_roundf_epi32(__m256 v) {
    __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m256 frac = _mm256_sub_ps(v, t); /* exact */
    __m256 sign_bit = _mm256_set1_ps(-0.0f);
    __m256 afrac = _mm256_andnot_ps(sign_bit, frac);
    __m256 step = _mm256_or_ps(_mm256_and_ps(v, sign_bit), _mm256_set1_ps(1.0f));
    __m256 ge = _mm256_cmp_ps(afrac, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    return _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(ge, step)));
}

/* Quantizes one block of 32; returns d, writes q and the sum of q. */
static inline float kiln_q8_block(const float *x, int8_t *qs, int32_t *sum) {
    __m256 sign_bit = _mm256_set1_ps(-0.0f);
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_loadu_ps(x + 8 * k);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[k]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float d = _mm_cvtss_f32(m4) / 127.0f;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    __m256 vid = _mm256_set1_ps(id);
    __m256i q[4];
    for (int k = 0; k < 4; k++) q[k] = kiln_roundf_epi32(_mm256_mul_ps(v[k], vid));
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    *sum = _mm_cvtsi128_si32(s4);
    /* packs interleave 128-bit lanes; the permute restores element order */
    __m256i p01 = _mm256_packs_epi32(q[0], q[1]);
    __m256i p23 = _mm256_packs_epi32(q[2], q[3]);
    __m256i p = _mm256_packs_epi16(p01, p23);
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)qs, p);
    return d;
}

#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>

static inline float kiln_q8_block(const float *x, int8_t *qs, int32_t *sum) {
    float32x4_t v[8];
    float32x4_t amax = vdupq_n_f32(0.0f);
    for (int k = 0; k < 8; k++) {
        v[k] = vld1q_f32(x + 4 * k);
        amax = vmaxq_f32(amax, vabsq_f32(v[k]));
    }
    float d = vmaxvq_f32(amax) / 127.0f;
    float id = d != 0.0f ? 1.0f / d : 0.0f;
    int32x4_t s = vdupq_n_s32(0);
    int32x4_t q[8];
    for (int k = 0; k < 8; k++) {
        /* vcvtaq: round to nearest, ties away from zero = roundf */
        q[k] = vcvtaq_s32_f32(vmulq_n_f32(v[k], id));
        s = vaddq_s32(s, q[k]);
    }
    *sum = vaddvq_s32(s);
    for (int k = 0; k < 8; k += 2) {
        int16x8_t h = vcombine_s16(vmovn_s32(q[k]), vmovn_s32(q[k + 1]));
        vst1_s8(qs + 4 * k, vmovn_s16(h));
    }
    return d;
}
#endif

/* Q8_K (the K types' activations, codecs_k.c, ggml's quantize_row_q8_K_ref): per 256
 * elements, max = the first element of largest |x|, iscale = -127 / max in float,
 * q = min(127, round-half-even(iscale * x)), d = 1 / iscale, bsums the sums of q per 16;
 * an all-zero block is all zeros. A NaN is skipped by the search for max as by the
 * reference's strict comparison (the max instructions keep the non-NaN operand). */
#if defined(__AVX2__)
static float kiln_q8k_absmax(const float *x, int *first) {
    const __m256 sign_bit = _mm256_set1_ps(-0.0f);
    __m256 amax = _mm256_setzero_ps();
    for (int k = 0; k < QK_K / 8; k++) /* a NaN |x| is the first operand: amax is kept */
        amax = _mm256_max_ps(_mm256_andnot_ps(sign_bit, _mm256_loadu_ps(x + 8 * k)), amax);
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float m = _mm_cvtss_f32(m4);
    __m256 vm = _mm256_set1_ps(m);
    *first = 0;
    for (int k = 0; k < QK_K / 8; k++) {
        int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign_bit, _mm256_loadu_ps(x + 8 * k)), vm, _CMP_EQ_OQ));
        if (hit) {
            *first = 8 * k + __builtin_ctz((unsigned)hit);
            break;
        }
    }
    return m;
}

static inline void kiln_q8k_quants(const float *x, float iscale, int8_t *qs) {
    const __m256 vs = _mm256_set1_ps(iscale);
    const __m256i top = _mm256_set1_epi32(127);
    for (int k = 0; k < QK_K / 32; k++) {
        __m256i q[4];
        for (int j = 0; j < 4; j++) /* the default rounding mode: to nearest, ties to even */
            q[j] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 32 * k + 8 * j), vs)), top);
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(qs + 32 * k), p);
    }
}
#elif defined(__ARM_NEON) && defined(__aarch64__)
static float kiln_q8k_absmax(const float *x, int *first) {
    float32x4_t amax = vdupq_n_f32(0.0f);
    for (int k = 0; k < QK_K / 4; k++) amax = vmaxnmq_f32(amax, vabsq_f32(vld1q_f32(x + 4 * k)));
    float m = vmaxnmvq_f32(amax);
    *first = 0;
    for (int e = 0; e < QK_K; e++)
        if (__builtin_fabsf(x[e]) == m) {
            *first = e;
            break;
        }
    return m;
}

static inline void kiln_q8k_quants(const float *x, float iscale, int8_t *qs) {
    const int32x4_t top = vdupq_n_s32(127);
    for (int k = 0; k < QK_K / 8; k++) {
        /* vcvtnq: round to nearest, ties to even */
        int32x4_t a = vminq_s32(vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + 8 * k), iscale)), top);
        int32x4_t b = vminq_s32(vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + 8 * k + 4), iscale)), top);
        vst1_s8(qs + 8 * k, vqmovn_s16(vcombine_s16(vqmovn_s32(a), vqmovn_s32(b))));
    }
}
#endif

#if defined(__AVX2__) || (defined(__ARM_NEON) && defined(__aarch64__))
static void quantize_row_q8_K(const float *x, block_q8_K *y, int64_t n) {
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K) {
        int first;
        float amax = kiln_q8k_absmax(x, &first);
        if (!(amax > 0.0f)) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -127.f / x[first];
        kiln_q8k_quants(x, iscale, y[i].qs);
        for (int c = 0; c < QK_K / 16; c++) {
            int sum = 0;
            for (int e = 0; e < 16; e++) sum += y[i].qs[16 * c + e];
            y[i].bsums[c] = (int16_t)sum;
        }
        y[i].d = 1 / iscale;
    }
}
#else
#define quantize_row_q8_K kiln_quantize_row_q8_K
#endif

#if defined(__AVX2__) || (defined(__ARM_NEON) && defined(__aarch64__))
static void quantize_row_q8_0(const float *x, block_q8_0 *y, int64_t n) {
    for (int64_t i = 0; i < n / QK; i++) {
        int32_t sum;
        float d = kiln_q8_block(x + i * QK, y[i].qs, &sum);
        y[i].d = kiln_fp32_to_fp16(d);
    }
}

static void quantize_row_q8_1(const float *x, block_q8_1 *y, int64_t n) {
    for (int64_t i = 0; i < n / QK; i++) {
        int32_t sum;
        float d = kiln_q8_block(x + i * QK, y[i].qs, &sum);
        y[i].d = kiln_fp32_to_fp16(d);
        y[i].s = kiln_fp32_to_fp16((float)sum * d);
    }
}

#else
/* the scalar variant is the reference codec itself */
#define quantize_row_q8_0 kiln_quantize_row_q8_0
#define quantize_row_q8_1 kiln_quantize_row_q8_1
#endif

void KILN_FN(kiln_quantize_row_q8_0)(const float *x, block_q8_0 *y, int64_t n) {
    quantize_row_q8_0(x, y, n);
}
void KILN_FN(kiln_quantize_row_q8_K)(const float *x, block_q8_K *y, int64_t n) {
    quantize_row_q8_K(x, y, n);
}
void KILN_FN(kiln_quantize_row_q8_1)(const float *x, block_q8_1 *y, int64_t n) {
    quantize_row_q8_1(x, y, n);
}
