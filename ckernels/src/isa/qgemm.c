/* Quantized weights (packed Q4_0 / Q4_1 / Q8_0, see kernels_impl.h) times quantized
 * activations. Per block the integer dot is exact in int32; the block's float scale
 * d_w * d_x is applied once. Each call computes row groups [rg0, rg1) for every token;
 * a row group's KILN_RG rows share every activation load, and up to KILN_NT tokens
 * share every weight load (prompt batches). */
#include "isa.h"
#include "kernels_impl.h"

#define KILN_NT 4 /* tokens per pass over a row group */

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

/* Four blocks per step: one 512-bit vpdpbusd covers 4 blocks' lo or hi halves. */
static inline __attribute__((always_inline)) void
kiln_qgemm_rg(const kiln_qgemm_args *a, int64_t rg, int t0, const int nt_tok) {
    const kiln_packed_view *w = &a->w;
    const int type = w->type;
    const int q8 = type == KILN_TYPE_Q8_0, q41 = type == KILN_TYPE_Q4_1;
    const size_t bb = q8 ? 32 : 16;
    kiln_act act[KILN_NT];
    for (int t = 0; t < nt_tok; t++) act[t] = kiln_act_at(a->act + (size_t)(t0 + t) * a->act_stride, &a->al);
    __m512 acc[KILN_RG][KILN_NT];
    for (int r = 0; r < KILN_RG; r++)
        for (int t = 0; t < nt_tok; t++) acc[r][t] = _mm512_setzero_ps();
    const __m512i mask4 = _mm512_set1_epi8(0x0f);
    __m512i perm[KILN_RG];
    for (int r = 0; r < KILN_RG; r++) /* lanes 4b..4b+3 <- scale [r][b] */
        perm[r] = _mm512_setr_epi32(4 * r, 4 * r, 4 * r, 4 * r, 4 * r + 1, 4 * r + 1, 4 * r + 1,
                                    4 * r + 1, 4 * r + 2, 4 * r + 2, 4 * r + 2, 4 * r + 2,
                                    4 * r + 3, 4 * r + 3, 4 * r + 3, 4 * r + 3);
    for (int64_t g = 0; g < w->ng; g++) {
        const int nb = (int)(w->nb - g * KILN_KG < KILN_KG ? w->nb - g * KILN_KG : KILN_KG);
        const __mmask64 lm = nb == KILN_KG ? ~(__mmask64)0 : (((__mmask64)1 << (nb * 16)) - 1);
        const uint8_t *qs = kiln_rg_qs(w, rg, g);
        __m512 d16 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)kiln_rg_d(w, rg, g)));
        __m512 m16 = q41 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)kiln_rg_m(w, rg, g)))
                         : _mm512_setzero_ps();
        __m512i al[KILN_NT], ah[KILN_NT], off[KILN_NT];
        __m512 dx[KILN_NT], sx[KILN_NT];
        for (int t = 0; t < nt_tok; t++) {
            al[t] = _mm512_loadu_si512(act[t].qs + g * KILN_KG * QK);
            ah[t] = _mm512_loadu_si512(act[t].qs + g * KILN_KG * QK + KILN_KG * 16);
            off[t] = _mm512_loadu_si512(act[t].off + g * KILN_KG * 4);
            dx[t] = _mm512_loadu_ps(act[t].dx + g * KILN_KG * 4);
            if (q41) sx[t] = _mm512_loadu_ps(act[t].sx + g * KILN_KG * 4);
        }
        for (int r = 0; r < KILN_RG; r++) {
            __m512i wl, wh;
            if (q8) {
                wl = _mm512_maskz_loadu_epi8(lm, qs + (size_t)r * nb * bb);
                wh = _mm512_maskz_loadu_epi8(lm, qs + (size_t)r * nb * bb + nb * 16);
            } else {
                __m512i v = _mm512_maskz_loadu_epi8(lm, qs + (size_t)r * nb * bb);
                wl = _mm512_and_si512(v, mask4);
                wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask4);
            }
            __m512 dw = _mm512_permutexvar_ps(perm[r], d16);
            __m512 mw = q41 ? _mm512_permutexvar_ps(perm[r], m16) : dw;
            for (int t = 0; t < nt_tok; t++) {
                __m512i s = _mm512_dpbusd_epi32(off[t], wl, al[t]);
                s = _mm512_dpbusd_epi32(s, wh, ah[t]);
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, dx[t]), acc[r][t]);
                if (q41) acc[r][t] = _mm512_fmadd_ps(mw, sx[t], acc[r][t]);
            }
        }
    }
    for (int r = 0; r < KILN_RG; r++) {
        int64_t row = rg * KILN_RG + r;
        if (row >= w->rows) break;
        for (int t = 0; t < nt_tok; t++)
            a->y[(size_t)(t0 + t) * w->rows + row] = _mm512_reduce_add_ps(acc[r][t]);
    }
}

#elif defined(__AVX2__)
#include <immintrin.h>

/* u8 x s8 -> 4 int32 lanes per 16 bytes, accumulated into acc. */
static inline __m256i kiln_dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    /* u <= 15 here (nibbles), so the 16-bit pair sums cannot saturate */
    __m256i p = _mm256_maddubs_epi16(u, s);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}

/* 16 or 32 bytes (zero-extended) */
static inline __m256i kiln_load_half(const uint8_t *p, int two) {
    return two ? _mm256_loadu_si256((const __m256i *)p)
               : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)p));
}

/* Two blocks per step (one 256-bit register holds 2 blocks' lo or hi halves). */
static inline __attribute__((always_inline)) void
kiln_qgemm_rg(const kiln_qgemm_args *a, int64_t rg, int t0, const int nt_tok) {
    const kiln_packed_view *w = &a->w;
    const int type = w->type;
    const int q8 = type == KILN_TYPE_Q8_0, q41 = type == KILN_TYPE_Q4_1;
    const size_t bb = q8 ? 32 : 16;
    kiln_act act[KILN_NT];
    for (int t = 0; t < nt_tok; t++) act[t] = kiln_act_at(a->act + (size_t)(t0 + t) * a->act_stride, &a->al);
    __m256 acc[KILN_RG][KILN_NT];
    for (int r = 0; r < KILN_RG; r++)
        for (int t = 0; t < nt_tok; t++) acc[r][t] = _mm256_setzero_ps();
    const __m256i mask4 = _mm256_set1_epi8(0x0f);
    const __m256i sign8 = _mm256_set1_epi8((char)0x80);
    (void)sign8;
    for (int64_t g = 0; g < w->ng; g++) {
        const int nb = (int)(w->nb - g * KILN_KG < KILN_KG ? w->nb - g * KILN_KG : KILN_KG);
        const uint8_t *qs = kiln_rg_qs(w, rg, g);
        const kiln_fp16 *dp = kiln_rg_d(w, rg, g);
        const kiln_fp16 *mp = q41 ? kiln_rg_m(w, rg, g) : dp;
        for (int h = 0; 2 * h < nb; h++) {
            const int two = 2 * h + 1 < nb;
            const __m256i pidx = _mm256_setr_epi32(2 * h, 2 * h, 2 * h, 2 * h, 2 * h + 1, 2 * h + 1,
                                                   2 * h + 1, 2 * h + 1);
            __m256i al[KILN_NT], ah[KILN_NT], off[KILN_NT];
            __m256 dx[KILN_NT], sx[KILN_NT];
            for (int t = 0; t < nt_tok; t++) {
                const int8_t *aq = act[t].qs + g * KILN_KG * QK + 32 * h;
                al[t] = _mm256_loadu_si256((const __m256i *)aq);
                ah[t] = _mm256_loadu_si256((const __m256i *)(aq + KILN_KG * 16));
                off[t] = _mm256_loadu_si256((const __m256i *)(act[t].off + g * KILN_KG * 4 + 8 * h));
                dx[t] = _mm256_loadu_ps(act[t].dx + g * KILN_KG * 4 + 8 * h);
                if (q41) sx[t] = _mm256_loadu_ps(act[t].sx + g * KILN_KG * 4 + 8 * h);
            }
            for (int r = 0; r < KILN_RG; r++) {
                const uint8_t *rq = qs + (size_t)r * nb * bb + 32 * h;
                __m256 d4 = _mm256_castps128_ps256(
                    _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(dp + r * KILN_KG))));
                __m256 dw = _mm256_permutevar8x32_ps(d4, pidx);
                __m256i s[KILN_NT];
                if (q8) {
#if defined(__AVXVNNI__)
                    /* unsigned weights (w + 128) with the activation-side offset */
                    __m256i wl = kiln_load_half(rq, two), wh = kiln_load_half(rq + nb * 16, two);
                    for (int t = 0; t < nt_tok; t++)
                        s[t] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(off[t], wl, al[t]), wh, ah[t]);
#else
                    /* signed x signed via |w| * sign(a, w): no 16-bit saturation, and
                     * no offset since the weights are back to signed */
                    __m256i wl = _mm256_xor_si256(kiln_load_half(rq, two), sign8);
                    __m256i wh = _mm256_xor_si256(kiln_load_half(rq + nb * 16, two), sign8);
                    __m256i awl = _mm256_abs_epi8(wl), awh = _mm256_abs_epi8(wh);
                    for (int t = 0; t < nt_tok; t++) {
                        __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(awl, _mm256_sign_epi8(al[t], wl)),
                                                       _mm256_set1_epi16(1));
                        __m256i ph = _mm256_madd_epi16(_mm256_maddubs_epi16(awh, _mm256_sign_epi8(ah[t], wh)),
                                                       _mm256_set1_epi16(1));
                        s[t] = _mm256_add_epi32(pl, ph);
                    }
#endif
                } else {
                    __m256i v = kiln_load_half(rq, two);
                    __m256i wl = _mm256_and_si256(v, mask4);
                    __m256i wh = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask4);
                    for (int t = 0; t < nt_tok; t++)
                        s[t] = kiln_dot_u8s8(kiln_dot_u8s8(off[t], wl, al[t]), wh, ah[t]);
                }
                for (int t = 0; t < nt_tok; t++)
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), _mm256_mul_ps(dw, dx[t]), acc[r][t]);
                if (q41) {
                    __m256 m4 = _mm256_castps128_ps256(
                        _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(mp + r * KILN_KG))));
                    __m256 mw = _mm256_permutevar8x32_ps(m4, pidx);
                    for (int t = 0; t < nt_tok; t++) acc[r][t] = _mm256_fmadd_ps(mw, sx[t], acc[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < KILN_RG; r++) {
        int64_t row = rg * KILN_RG + r;
        if (row >= w->rows) break;
        for (int t = 0; t < nt_tok; t++) {
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]), _mm256_extractf128_ps(acc[r][t], 1));
            s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            s = _mm_add_ss(s, _mm_movehdup_ps(s));
            a->y[(size_t)(t0 + t) * w->rows + row] = _mm_cvtss_f32(s);
        }
    }
}

#elif defined(__ARM_FEATURE_DOTPROD) && defined(__aarch64__)
#include <arm_neon.h>

/* One block per step: vdotq_s32 leaves 4 int32 lanes per 16 bytes. */
static inline __attribute__((always_inline)) void
kiln_qgemm_rg(const kiln_qgemm_args *a, int64_t rg, int t0, const int nt_tok) {
    const kiln_packed_view *w = &a->w;
    const int type = w->type;
    const int q8 = type == KILN_TYPE_Q8_0, q41 = type == KILN_TYPE_Q4_1;
    const size_t bb = q8 ? 32 : 16;
    kiln_act act[KILN_NT];
    for (int t = 0; t < nt_tok; t++) act[t] = kiln_act_at(a->act + (size_t)(t0 + t) * a->act_stride, &a->al);
    float32x4_t acc[KILN_RG][KILN_NT];
    for (int r = 0; r < KILN_RG; r++)
        for (int t = 0; t < nt_tok; t++) acc[r][t] = vdupq_n_f32(0.0f);
    const uint8x16_t mask4 = vdupq_n_u8(0x0f);
    const uint8x16_t sign8 = vdupq_n_u8(0x80);
    for (int64_t g = 0; g < w->ng; g++) {
        const int nb = (int)(w->nb - g * KILN_KG < KILN_KG ? w->nb - g * KILN_KG : KILN_KG);
        const uint8_t *qs = kiln_rg_qs(w, rg, g);
        const kiln_fp16 *dp = kiln_rg_d(w, rg, g);
        const kiln_fp16 *mp = q41 ? kiln_rg_m(w, rg, g) : dp;
        for (int b = 0; b < nb; b++) {
            int8x16_t al[KILN_NT], ah[KILN_NT];
            int32x4_t off[KILN_NT];
            float32x4_t dx[KILN_NT], sx[KILN_NT];
            for (int t = 0; t < nt_tok; t++) {
                const int8_t *aq = act[t].qs + g * KILN_KG * QK + 16 * b;
                al[t] = vld1q_s8(aq);
                ah[t] = vld1q_s8(aq + KILN_KG * 16);
                off[t] = vld1q_s32(act[t].off + (g * KILN_KG + b) * 4);
                dx[t] = vld1q_f32(act[t].dx + (g * KILN_KG + b) * 4);
                if (q41) sx[t] = vld1q_f32(act[t].sx + (g * KILN_KG + b) * 4);
            }
            for (int r = 0; r < KILN_RG; r++) {
                const uint8_t *rq = qs + (size_t)r * nb * bb + 16 * b;
                int8x16_t wl, wh;
                if (q8) { /* back to signed: the offset is not needed */
                    wl = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(rq), sign8));
                    wh = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(rq + nb * 16), sign8));
                } else {
                    uint8x16_t v = vld1q_u8(rq);
                    wl = vreinterpretq_s8_u8(vandq_u8(v, mask4));
                    wh = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
                }
                float dw = kiln_fp16_to_fp32(dp[r * KILN_KG + b]);
                for (int t = 0; t < nt_tok; t++) {
                    int32x4_t s = vdotq_s32(vdotq_s32(q8 ? vdupq_n_s32(0) : off[t], wl, al[t]), wh, ah[t]);
                    acc[r][t] = vfmaq_f32(acc[r][t], vcvtq_f32_s32(s), vmulq_n_f32(dx[t], dw));
                    if (q41) acc[r][t] = vfmaq_n_f32(acc[r][t], sx[t], kiln_fp16_to_fp32(mp[r * KILN_KG + b]));
                }
            }
        }
    }
    for (int r = 0; r < KILN_RG; r++) {
        int64_t row = rg * KILN_RG + r;
        if (row >= w->rows) break;
        for (int t = 0; t < nt_tok; t++) a->y[(size_t)(t0 + t) * w->rows + row] = vaddvq_f32(acc[r][t]);
    }
}

#else
/* Scalar reference over the same packed layout: blocks in order, one float
 * multiply-add per block. */
static void kiln_qgemm_rg(const kiln_qgemm_args *a, int64_t rg, int t0, const int nt_tok) {
    const kiln_packed_view *w = &a->w;
    const int q8 = w->type == KILN_TYPE_Q8_0, q41 = w->type == KILN_TYPE_Q4_1;
    const size_t bb = q8 ? 32 : 16;
    for (int t = t0; t < t0 + nt_tok; t++) {
        kiln_act act = kiln_act_at(a->act + (size_t)t * a->act_stride, &a->al);
        for (int r = 0; r < KILN_RG; r++) {
            int64_t row = rg * KILN_RG + r;
            if (row >= w->rows) break;
            float sum = 0.0f;
            for (int64_t g = 0; g < w->ng; g++) {
                const int nb = (int)(w->nb - g * KILN_KG < KILN_KG ? w->nb - g * KILN_KG : KILN_KG);
                const uint8_t *rq = kiln_rg_qs(w, rg, g) + (size_t)r * nb * bb;
                const kiln_fp16 *dp = kiln_rg_d(w, rg, g) + r * KILN_KG;
                for (int b = 0; b < nb; b++) {
                    const int8_t *al = act.qs + g * KILN_KG * QK + 16 * b;
                    const int8_t *ah = al + KILN_KG * 16;
                    size_t lane = (size_t)(g * KILN_KG + b) * 4;
                    int32_t isum = act.off[lane];
                    for (int j = 0; j < 16; j++) {
                        if (q8) isum += rq[16 * b + j] * al[j] + rq[nb * 16 + 16 * b + j] * ah[j];
                        else isum += (rq[16 * b + j] & 15) * al[j] + (rq[16 * b + j] >> 4) * ah[j];
                    }
                    sum += (float)isum * (kiln_fp16_to_fp32(dp[b]) * act.dx[lane]);
                    if (q41) sum += kiln_fp16_to_fp32(kiln_rg_m(w, rg, g)[r * KILN_KG + b]) * act.sx[lane];
                }
            }
            a->y[(size_t)t * w->rows + row] = sum;
        }
    }
}
#endif

void KILN_FN(kiln_qgemm)(const kiln_qgemm_args *a, int64_t rg0, int64_t rg1) {
    int t = 0;
    /* whole passes of KILN_NT tokens first, then the remainder; the constant token
     * counts let the compiler keep every accumulator in registers */
    for (; t + KILN_NT <= a->n_tokens; t += KILN_NT)
        for (int64_t rg = rg0; rg < rg1; rg++) kiln_qgemm_rg(a, rg, t, KILN_NT);
    int rest = a->n_tokens - t;
    for (int64_t rg = rg0; rg < rg1; rg++) {
        switch (rest) {
        case 1: kiln_qgemm_rg(a, rg, t, 1); break;
        case 2: kiln_qgemm_rg(a, rg, t, 2); break;
        case 3: kiln_qgemm_rg(a, rg, t, 3); break;
        default: break;
        }
    }
}
