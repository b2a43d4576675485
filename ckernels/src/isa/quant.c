/* Activation quantization to Q8_0 / Q8_1, bit-exact with the scalar reference codecs
 * (codecs.c, ggml's quantize_row_q8_*_ref): d = absmax / 127 in float, q = roundf(x *
 * (1 / d)) (ties away from zero), d stored as fp16 rounded to nearest even, and for
 * Q8_1 s = fp16(sum(q) * d). The SIMD versions differ only in how they compute the same
 * operations; the float products and the rounding are the same, so the bits are. */
#include "isa.h"
#include "codecs.h"
#include "kernels_impl.h"

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
void KILN_FN(kiln_quantize_row_q8_1)(const float *x, block_q8_1 *y, int64_t n) {
    quantize_row_q8_1(x, y, n);
}
