/* Super-block weights (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, in GGUF layout, read in
 * place) times Q8_K activations. Each call computes rows [r0, r1) for every token; up to
 * KILN_KNT tokens share each decoded super-block (prompt batches), and a batch walks
 * the rows in blocks small enough to stay in L2 meanwhile.
 *
 * Every type is brought to one form per super-block of 256 elements in 16 chunks of 16:
 *   q[e]     a small integer per element (unsigned for the K types, IQ4_XS's signed
 *            grid value), in element order;
 *   sc[c]    the integer scale of chunk c (a 32-element sub-block gives its two chunks
 *            the same scale);
 *   coef[c]  the weight of the chunk's activation sum bsum[c] (Q8_K's bsums): the
 *            chunk's min for the types with mins (Q2_K, Q4_K, Q5_K), -offset * sc[c]
 *            for the types whose quants are stored with an offset (Q3_K: 4, Q6_K: 32),
 *            0 for IQ4_XS.
 * A weight is then d * sc[c] * (q[e] - offset) - dmin * coef[c], and with activations
 * d_x * a[e] the super-block's term is
 *   d * d_x * isum - dmin * d_x * msum,
 *   isum = sum_c sc[c] * sum_{e in c} q[e] a[e]  (+ sum_c coef[c] bsum[c] with offsets),
 *   msum = sum_c coef[c] bsum[c]                   (types with mins; else 0).
 * isum and msum are exact in int32 (|a| <= 127 from the Q8_K quantizer, bounds below),
 * and kiln_ksum_step (kernels_impl.h) does the float part, in the same order in every
 * variant, so all variants give the same bits, and a float64 product of the exactly
 * dequantized operands gives them too up to double roundings.
 *
 * Why the int32 sums cannot overflow (per super-block, |a| <= 127, |bsum| <= 16 * 127):
 *   Q2_K  q <= 3, sc <= 15:        |isum| <= 256 * 3 * 127 * 15 < 2^21; msum: coef
 *                                  <= 15, |msum| <= 15 * 256 * 127 < 2^19.
 *   Q3_K  q - 4 in [-4, 3], |sc| <= 32: |isum| <= 256 * 4 * 127 * 32 < 2^22; the
 *                                  unsigned partial sum_c sc q a and the offset part
 *                                  each < 256 * 7 * 127 * 32 < 2^23.
 *   Q4_K  q <= 15, sc, m <= 63:    |isum| <= 256 * 15 * 127 * 63 < 2^25, |msum| < 2^21.
 *   Q5_K  q <= 31:                 |isum| <= 256 * 31 * 127 * 63 < 2^26, |msum| < 2^21.
 *   Q6_K  q - 32 in [-32, 31], |sc| <= 128: |isum| <= 256 * 32 * 127 * 128 < 2^27; the
 *                                  unsigned part and the offset part each < 2^28.
 *   IQ4_XS |q| <= 127, |sc| <= 32: |isum| <= 256 * 127 * 127 * 32 < 2^28.
 * The SIMD partial sums are sums of subsets of these terms, so they are bounded alike;
 * AVX2's maddubs adds two products u8 * s8 into int16: at most 2 * 63 * 127 = 16002
 * (Q6_K), or 2 * 127 * 127 = 32258 for IQ4_XS's |q| * sign-folded a: no saturation. */
#include "codecs.h"   /* kiln_kvalues_iq4nl, IQ4_XS's grid */
#include "codecs_k.h" /* the packed scales of Q3_K, Q4_K, Q5_K */
#include "isa.h"
#include "kernels_impl.h"

#include <stdlib.h>
#include <string.h>

#define KILN_KNT 8 /* tokens per pass over a row */


/* ---- scales: per super-block, the same portable code in every variant ---- */

typedef struct {
    int8_t sc[16];    /* chunk scales */
    int8_t coef[16];  /* chunk mins (types with mins) */
    float d, dmin;    /* dmin = 0 for types without mins */
} kiln_kscales;

/* Q4_K / Q5_K: 8 6-bit scales and mins (codecs_k.h), each for two chunks of 16. */
static inline void kiln_scales_k4(const uint8_t *s, kiln_kscales *k) {
    for (int j = 0; j < 8; j++) {
        uint8_t sc, m;
        kiln_scale_min_k4(j, s, &sc, &m);
        k->sc[2 * j] = k->sc[2 * j + 1] = (int8_t)sc;
        k->coef[2 * j] = k->coef[2 * j + 1] = (int8_t)m;
    }
}

static inline void kiln_kscales_of(const void *blk, int type, kiln_kscales *k) {
    switch (type) {
    case KILN_TYPE_Q2_K: {
        const block_q2_K *b = blk;
        for (int c = 0; c < 16; c++) {
            k->sc[c] = (int8_t)(b->scales[c] & 15);
            k->coef[c] = (int8_t)(b->scales[c] >> 4);
        }
        k->d = kiln_fp16_to_fp32(b->d);
        k->dmin = kiln_fp16_to_fp32(b->dmin);
        break;
    }
    case KILN_TYPE_Q3_K: {
        /* 16 6-bit scales, offset by 32 */
        const block_q3_K *b = blk;
        for (int c = 0; c < 16; c++) k->sc[c] = (int8_t)(kiln_scale_q3(c, b->scales) - 32);
        k->d = kiln_fp16_to_fp32(b->d);
        k->dmin = 0.0f;
        break;
    }
    case KILN_TYPE_Q4_K: {
        const block_q4_K *b = blk;
        kiln_scales_k4(b->scales, k);
        k->d = kiln_fp16_to_fp32(b->d);
        k->dmin = kiln_fp16_to_fp32(b->dmin);
        break;
    }
    case KILN_TYPE_Q5_K: {
        const block_q5_K *b = blk;
        kiln_scales_k4(b->scales, k);
        k->d = kiln_fp16_to_fp32(b->d);
        k->dmin = kiln_fp16_to_fp32(b->dmin);
        break;
    }
    case KILN_TYPE_Q6_K: {
        const block_q6_K *b = blk;
        memcpy(k->sc, b->scales, 16);
        k->d = kiln_fp16_to_fp32(b->d);
        k->dmin = 0.0f;
        break;
    }
    default: { /* IQ4_XS: 8 6-bit scales offset by 32, 4 bits in scales_l, 2 in scales_h */
        const block_iq4_xs *b = blk;
        for (int j = 0; j < 8; j++) {
            int ls = ((b->scales_l[j / 2] >> (4 * (j % 2))) & 15) | (((b->scales_h >> (2 * j)) & 3) << 4);
            k->sc[2 * j] = k->sc[2 * j + 1] = (int8_t)(ls - 32);
        }
        k->d = kiln_fp16_to_fp32(b->d);
        k->dmin = 0.0f;
        break;
    }
    }
}

/* Types with mins take coef from kiln_kscales; the others -offset * sc. */
static inline int kiln_khas_min(int type) {
    return type == KILN_TYPE_Q2_K || type == KILN_TYPE_Q4_K || type == KILN_TYPE_Q5_K;
}
static inline int kiln_koffset(int type) {
    return type == KILN_TYPE_Q3_K ? 4 : type == KILN_TYPE_Q6_K ? 32 : 0;
}

/* ---- quants, element by element (the scalar and NEON variants) ---- */

/* q[e] for e < 256 as described at the top (unsigned, offset not removed; IQ4_XS's
 * grid values). */
static void kiln_kquants_of(const void *blk, int type, int8_t *q) {
    switch (type) {
    case KILN_TYPE_Q2_K: { /* element e: bits 2 * (e % 128 / 32) of qs[e / 128 * 32 + e % 32] */
        const block_q2_K *b = blk;
        for (int e = 0; e < QK_K; e++)
            q[e] = (int8_t)((b->qs[e / 128 * 32 + e % 32] >> (2 * (e % 128 / 32))) & 3);
        break;
    }
    case KILN_TYPE_Q3_K: { /* two low bits as Q2_K, the third in bit e / 32 of hmask[e % 32] */
        const block_q3_K *b = blk;
        for (int e = 0; e < QK_K; e++) {
            int lo = (b->qs[e / 128 * 32 + e % 32] >> (2 * (e % 128 / 32))) & 3;
            int hi = (b->hmask[e % 32] >> (e / 32)) & 1;
            q[e] = (int8_t)(lo | hi << 2);
        }
        break;
    }
    case KILN_TYPE_Q4_K:
    case KILN_TYPE_Q5_K: { /* element e: nibble (e % 64 >= 32) of qs[e / 64 * 32 + e % 32];
                            * Q5_K's fifth bit in bit e / 32 of qh[e % 32] */
        const uint8_t *qs = type == KILN_TYPE_Q4_K ? ((const block_q4_K *)blk)->qs : ((const block_q5_K *)blk)->qs;
        for (int e = 0; e < QK_K; e++) {
            uint8_t byte = qs[e / 64 * 32 + e % 32];
            int v = e % 64 >= 32 ? byte >> 4 : byte & 15;
            if (type == KILN_TYPE_Q5_K) v |= ((((const block_q5_K *)blk)->qh[e % 32] >> (e / 32)) & 1) << 4;
            q[e] = (int8_t)v;
        }
        break;
    }
    case KILN_TYPE_Q6_K: { /* element e = 128 h + 32 k + l: low 4 bits in nibble k / 2 of
                            * ql[64 h + 32 (k % 2) + l], high 2 bits at bit 2 k of qh[32 h + l] */
        const block_q6_K *b = blk;
        for (int e = 0; e < QK_K; e++) {
            int h = e / 128, k = e % 128 / 32, l = e % 32;
            uint8_t lb = b->ql[64 * h + 32 * (k % 2) + l];
            int lo = k >= 2 ? lb >> 4 : lb & 15;
            int hi = (b->qh[32 * h + l] >> (2 * k)) & 3;
            q[e] = (int8_t)(lo | hi << 4);
        }
        break;
    }
    default: { /* IQ4_XS: sub-block e / 32 in qs[16 (e / 32) ..]: low nibbles, then high */
        const block_iq4_xs *b = blk;
        for (int e = 0; e < QK_K; e++) {
            uint8_t byte = b->qs[e / 32 * 16 + e % 16];
            q[e] = kiln_kvalues_iq4nl[e % 32 >= 16 ? byte >> 4 : byte & 15];
        }
        break;
    }
    }
}

static inline void kiln_kstore(const kiln_kgemm_args *a, int64_t row, int t0, int nt, const double *acc) {
    for (int t = 0; t < nt; t++) a->y[(size_t)(t0 + t) * a->rows + row] = (float)acc[t];
}

#if defined(__AVX2__)
/* The AVX-VNNI and AVX512-VNNI variants compile this AVX2 path with their flags: the
 * chunk scales are applied to 16-bit pair sums (vpmaddwd), which dpbusd's 32-bit sums
 * of four would need a 32-bit multiply for. With AVX512BW the per-token products run
 * 64 bytes wide; the integer sums are the same, so the bits are too. */
#include <immintrin.h>

/* q of super-block blk in 8 registers, q[k] = elements 32k .. 32k + 31. */
static inline __attribute__((always_inline)) void kiln_kquants_avx2(const void *blk, const int type, __m256i *q) {
    const __m256i m2 = _mm256_set1_epi8(3), m4 = _mm256_set1_epi8(15), m1 = _mm256_set1_epi8(1);
    switch (type) {
    case KILN_TYPE_Q2_K:
    case KILN_TYPE_Q3_K: {
        const uint8_t *qs = type == KILN_TYPE_Q2_K ? ((const block_q2_K *)blk)->qs : ((const block_q3_K *)blk)->qs;
        __m256i hm = type == KILN_TYPE_Q3_K ? _mm256_loadu_si256((const __m256i *)((const block_q3_K *)blk)->hmask)
                                            : _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * h));
            for (int j = 0; j < 4; j++) {
                /* 16-bit shifts: the bits shifted across bytes are masked off */
                __m256i x = _mm256_and_si256(_mm256_srli_epi16(v, 2 * j), m2);
                if (type == KILN_TYPE_Q3_K)
                    x = _mm256_or_si256(x, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, 4 * h + j), m1), 2));
                q[4 * h + j] = x;
            }
        }
        break;
    }
    case KILN_TYPE_Q4_K:
    case KILN_TYPE_Q5_K: {
        const uint8_t *qs = type == KILN_TYPE_Q4_K ? ((const block_q4_K *)blk)->qs : ((const block_q5_K *)blk)->qs;
        __m256i qh = type == KILN_TYPE_Q5_K ? _mm256_loadu_si256((const __m256i *)((const block_q5_K *)blk)->qh)
                                            : _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            if (type == KILN_TYPE_Q5_K) {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), m1), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c + 1), m1), 4));
            }
            q[2 * c] = lo;
            q[2 * c + 1] = hi;
        }
        break;
    }
    case KILN_TYPE_Q6_K: {
        const block_q6_K *b = blk;
        const __m256i m30 = _mm256_set1_epi8(0x30);
        for (int h = 0; h < 2; h++) {
            __m256i l0 = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h));
            __m256i l1 = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h + 32));
            __m256i hb = _mm256_loadu_si256((const __m256i *)(b->qh + 32 * h));
            /* bits 2k, 2k + 1 of qh moved to bits 4, 5 */
            q[4 * h + 0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30));
            q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30));
            q[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(hb, m30));
            q[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                           _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30));
        }
        break;
    }
    default: { /* IQ4_XS: a 16-byte sub-block gives 16 low nibbles, then 16 high */
        const block_iq4_xs *b = blk;
        const __m256i grid = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)kiln_kvalues_iq4nl));
        for (int k = 0; k < 8; k++) {
            __m128i v = _mm_loadu_si128((const __m128i *)(b->qs + 16 * k));
            __m256i x = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), m4);
            q[k] = _mm256_shuffle_epi8(grid, x);
        }
        break;
    }
    }
}

static inline float kiln_h2f(kiln_fp16 h) { return _cvtsh_ss(h); } /* exact, as kiln_fp16_to_fp32 */

/* The chunk scales (sc) and mins (coef, types with mins) of super-block blk as 16
 * bytes each, with d and dmin: kiln_kscales_of's values, in registers. */
static inline __attribute__((always_inline)) void
kiln_kscales_avx2(const void *blk, const int type, __m128i *sc, __m128i *coef, float *d, float *dmin) {
    const __m128i m4 = _mm_set1_epi8(15);
    *coef = _mm_setzero_si128();
    *dmin = 0.0f;
    switch (type) {
    case KILN_TYPE_Q2_K: {
        const block_q2_K *b = blk;
        __m128i v = _mm_loadu_si128((const __m128i *)b->scales);
        *sc = _mm_and_si128(v, m4);
        *coef = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        *d = kiln_h2f(b->d);
        *dmin = kiln_h2f(b->dmin);
        break;
    }
    case KILN_TYPE_Q3_K: { /* the layout of kiln_kscales_of, four chunks per 32-bit lane */
        const block_q3_K *b = blk;
        uint64_t lo8;
        uint32_t hi4;
        memcpy(&lo8, b->scales, 8);
        memcpy(&hi4, b->scales + 8, 4);
        __m128i l = _mm_cvtsi64_si128((long long)lo8);
        __m128i lo = _mm_unpacklo_epi64(_mm_and_si128(l, m4), _mm_and_si128(_mm_srli_epi16(l, 4), m4));
        __m128i hi = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32((int)hi4), _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(3));
        *sc = _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), _mm_set1_epi8(32));
        *d = kiln_h2f(b->d);
        break;
    }
    case KILN_TYPE_Q4_K:
    case KILN_TYPE_Q5_K: { /* kiln_scales_k4, four sub-blocks per 32-bit word */
        const uint8_t *s = type == KILN_TYPE_Q4_K ? ((const block_q4_K *)blk)->scales : ((const block_q5_K *)blk)->scales;
        /* three loads into registers: a memcpy of all 12 bytes went through the stack,
         * and its 8-byte store could not forward to the 4-byte reloads */
        uint32_t a[3];
        memcpy(&a[0], s, 4);
        memcpy(&a[1], s + 4, 4);
        memcpy(&a[2], s + 8, 4);
        const uint32_t k6 = 0x3f3f3f3f, k4 = 0x0f0f0f0f, k2 = 0x03030303;
        uint64_t scs = (a[0] & k6) | (uint64_t)((a[2] & k4) | ((a[0] >> 6) & k2) << 4) << 32;
        uint64_t mins = (a[1] & k6) | (uint64_t)(((a[2] >> 4) & k4) | ((a[1] >> 6) & k2) << 4) << 32;
        __m128i v = _mm_cvtsi64_si128((long long)scs), m = _mm_cvtsi64_si128((long long)mins);
        *sc = _mm_unpacklo_epi8(v, v); /* a sub-block's scale for both its chunks */
        *coef = _mm_unpacklo_epi8(m, m);
        const kiln_fp16 *dd = blk; /* d, dmin lead both blocks */
        *d = kiln_h2f(dd[0]);
        *dmin = kiln_h2f(dd[1]);
        break;
    }
    case KILN_TYPE_Q6_K: {
        const block_q6_K *b = blk;
        *sc = _mm_loadu_si128((const __m128i *)b->scales);
        *d = kiln_h2f(b->d);
        break;
    }
    default: { /* IQ4_XS */
        const block_iq4_xs *b = blk;
        uint32_t l4;
        memcpy(&l4, b->scales_l, 4);
        __m128i l = _mm_cvtsi32_si128((int)l4);
        l = _mm_unpacklo_epi8(_mm_and_si128(l, m4), _mm_and_si128(_mm_srli_epi16(l, 4), m4));
        uint64_t h = 0;
        for (int j = 0; j < 8; j++) h |= (uint64_t)((b->scales_h >> (2 * j)) & 3) << (8 * j + 4);
        __m128i v = _mm_sub_epi8(_mm_or_si128(l, _mm_cvtsi64_si128((long long)h)), _mm_set1_epi8(32));
        *sc = _mm_unpacklo_epi8(v, v);
        *d = kiln_h2f(b->d);
        break;
    }
    }
}

/* kiln_ksum_step for one token from the lanes of its sums: isum is the sum of s's 8
 * lanes, msum of m's (types with mins; for the others m is already in s and 0 here).
 * Both reduce side by side and the float step stays in vector registers, with no round
 * trip through integer registers: the same operations on the same values as
 * kiln_ksum_step, so the same bits. Types without mins skip the msum term: it is +-0,
 * and acc, a sum from +0, is never -0, so subtracting it would change nothing. */
static inline __attribute__((always_inline)) double
kiln_kstep_lanes(double acc, __m256i s, __m256i m, float d, float dmin, float d_x, const int has_min) {
    __m256i u = _mm256_add_epi32(_mm256_unpacklo_epi64(s, m), _mm256_unpackhi_epi64(s, m));
    __m128i v = _mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xb1));          /* [S S M M] */
    __m128d sm = _mm_cvtepi32_pd(_mm_shuffle_epi32(v, 0x08)); /* [S M] */
    __m128d f = _mm_mul_pd(_mm_cvtps_pd(_mm_setr_ps(d, dmin, 0.0f, 0.0f)), _mm_set1_pd((double)d_x));
    __m128d pr = _mm_mul_pd(sm, f);
    __m128d a = _mm_add_sd(_mm_set_sd(acc), pr);
    if (has_min) a = _mm_sub_sd(a, _mm_unpackhi_pd(pr, pr));
    return _mm_cvtsd_f64(a);
}

/* Prefetches per super-block of the type, ceil(size / 64): at 0, 64, ... of every
 * block they cover the stream (a line a block's prefetches miss at its end is the
 * next block's first). A constant per instantiation, so the prefetch loop unrolls. */
static inline int kiln_klines(int type) {
    size_t bsize = type == KILN_TYPE_Q2_K ? sizeof(block_q2_K) : type == KILN_TYPE_Q3_K ? sizeof(block_q3_K)
                 : type == KILN_TYPE_Q4_K ? sizeof(block_q4_K) : type == KILN_TYPE_Q5_K ? sizeof(block_q5_K)
                 : type == KILN_TYPE_Q6_K ? sizeof(block_q6_K) : sizeof(block_iq4_xs);
    return (int)((bsize + 63) / 64);
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* One token (generation) for Q4_K, Q5_K and Q6_K, 64 elements per instruction in
 * element order: a 32-byte run of quants is broadcast to both halves of a register and
 * shifted per half (vpsrlvw), so the activations are read as they are; the 16-bit pair
 * sums of vpmaddubsw meet their chunk scales in vpdpwssd. isum and msum are the same
 * exact integers as kiln_krows', and kiln_kstep_lanes does the float step: the same
 * bits. */
static inline __attribute__((always_inline)) void
kiln_krow1_512(const kiln_kgemm_args *a, int64_t r0, int64_t r1, int t0, const int type) {
    const int has_min = kiln_khas_min(type), offset = kiln_koffset(type);
    const size_t bsize = a->row_size / (size_t)a->nb;
    const int lines = kiln_klines(type);
    const __m512i m4 = _mm512_set1_epi8(15), m1 = _mm512_set1_epi8(1), m3 = _mm512_set1_epi8(3);
    /* per-half shift counts (16-bit lanes 0..15 | 16..31) */
    const __m512i sh04 = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(4), 1);
    const __m512i sh02 = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
    const __m512i sh46 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
    /* scale word picks: pick[k] gives the 32 pair lanes of register k (elements 64k ..
     * 64k + 63) the scales of their chunks 4k .. 4k + 3, 8 lanes each */
    __m512i pick[4];
    for (int k = 0; k < 4; k++) {
        int16_t idx[32];
        for (int l = 0; l < 32; l++) idx[l] = (int16_t)(4 * k + l / 8);
        pick[k] = _mm512_loadu_si512((const void *)idx);
    }
    const block_q8_K *xb = a->act + (size_t)t0 * a->nb;
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t *wr = a->w + (size_t)row * a->row_size;
        double acc = 0.0;
        for (int64_t ib = 0; ib < a->nb; ib++) {
            const uint8_t *blk = wr + (size_t)ib * bsize;
            for (int l = 0; l < lines; l++) {
                _mm_prefetch((const char *)blk + KILN_PREFETCH + 64 * l, _MM_HINT_T0);
                _mm_prefetch((const char *)blk + KILN_PREFETCH_L2 + 64 * l, _MM_HINT_T1);
            }
            const block_q8_K *x = xb + ib;
            __m128i sc8, coef8;
            float d, dmin;
            kiln_kscales_avx2(blk, type, &sc8, &coef8, &d, &dmin);
            __m512i q[4];
            if (type == KILN_TYPE_Q6_K) {
                const block_q6_K *b = (const block_q6_K *)blk;
                for (int h = 0; h < 2; h++) {
                    __m512i l = _mm512_loadu_si512((const void *)(b->ql + 64 * h));
                    __m512i hb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b->qh + 32 * h)));
                    /* elements 128h + 0..63: low nibbles, qh bits 0-1 | 2-3;
                     * 128h + 64..127: high nibbles, qh bits 4-5 | 6-7 */
                    __m512i h0 = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(hb, sh02), m3), 4);
                    __m512i h1 = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(hb, sh46), m3), 4);
                    q[2 * h] = _mm512_or_si512(_mm512_and_si512(l, m4), h0);
                    q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m4), h1);
                }
            } else {
                const uint8_t *qs = type == KILN_TYPE_Q4_K ? ((const block_q4_K *)blk)->qs : ((const block_q5_K *)blk)->qs;
                __m512i qh = type == KILN_TYPE_Q5_K
                                 ? _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)((const block_q5_K *)blk)->qh))
                                 : _mm512_setzero_si512();
                for (int c = 0; c < 4; c++) {
                    /* elements 64c .. 64c + 31: low nibbles of qs[32c ..], then the high */
                    __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qs + 32 * c)));
                    q[c] = _mm512_and_si512(_mm512_srlv_epi16(v, sh04), m4);
                    if (type == KILN_TYPE_Q5_K) {
                        /* fifth bits: qh bit 2c (low half), 2c + 1 (high half) */
                        __m512i hv = _mm512_srlv_epi16(qh, _mm512_inserti64x4(_mm512_set1_epi16((short)(2 * c)),
                                                                               _mm256_set1_epi16((short)(2 * c + 1)), 1));
                        q[c] = _mm512_or_si512(q[c], _mm512_slli_epi16(_mm512_and_si512(hv, m1), 4));
                    }
                }
            }
            __m512i sc16 = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(sc8));
            /* two chains of products, so the latency to the float step is shorter */
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int k = 0; k < 4; k += 2) {
                __m512i p0 = _mm512_maddubs_epi16(q[k], _mm512_loadu_si512((const void *)(x->qs + 64 * k)));
                __m512i p1 = _mm512_maddubs_epi16(q[k + 1], _mm512_loadu_si512((const void *)(x->qs + 64 * k + 64)));
                s0 = _mm512_dpwssd_epi32(s0, p0, _mm512_permutexvar_epi16(pick[k], sc16));
                s1 = _mm512_dpwssd_epi32(s1, p1, _mm512_permutexvar_epi16(pick[k + 1], sc16));
            }
            __m512i s = _mm512_add_epi32(s0, s1);
            __m256i coef = has_min ? _mm256_cvtepi8_epi16(coef8)
                                   : _mm256_mullo_epi16(_mm512_castsi512_si256(sc16), _mm256_set1_epi16((short)-offset));
            __m256i m = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)x->bsums), coef);
            __m256i s8 = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
            if (!has_min) s8 = _mm256_add_epi32(s8, m), m = _mm256_setzero_si256();
            acc = kiln_kstep_lanes(acc, s8, m, d, dmin, x->d, has_min);
        }
        a->y[(size_t)t0 * a->rows + row] = (float)acc;
    }
}
#endif

static inline __attribute__((always_inline)) void
kiln_krows(const kiln_kgemm_args *a, int64_t r0, int64_t r1, int t0, int nt, const int type) {
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
    if (nt == 1 && (type == KILN_TYPE_Q4_K || type == KILN_TYPE_Q5_K || type == KILN_TYPE_Q6_K)) {
        kiln_krow1_512(a, r0, r1, t0, type);
        return;
    }
#endif
    const int has_min = kiln_khas_min(type), offset = kiln_koffset(type), sgn = type == KILN_TYPE_IQ4_XS;
    const size_t bsize = a->row_size / (size_t)a->nb;
    const int lines = kiln_klines(type);
#if defined(__AVX512BW__)
    /* 64-byte products for batches: for one token (generation) widening the decoded
     * quants costs more than the halved product loop saves (measured) */
    const int WIDE = nt > 1;
#else
    const int WIDE = 0;
#endif
    /* the scale of chunks 2k (low 128-bit lane) and 2k + 1 (high lane), as 16-bit lanes,
     * picked from 8 scales repeated in both lanes */
    __m256i pick[4];
    for (int k = 0; k < 4; k++)
        pick[k] = _mm256_setr_epi8(4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1,
                                   4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1,
                                   4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3,
                                   4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3);
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t *wr = a->w + (size_t)row * a->row_size;
        double acc[KILN_KNT];
        for (int t = 0; t < nt; t++) acc[t] = 0.0;
        for (int64_t ib = 0; ib < a->nb; ib++) {
            const void *blk = wr + (size_t)ib * bsize;
            /* without these the kernel's arithmetic leaves too few misses in flight
             * (measured from DRAM: Q4_K 7.8 -> 20 GB/s on 2 threads) */
            for (int l = 0; l < lines; l++) {
                _mm_prefetch((const char *)blk + KILN_PREFETCH + 64 * l, _MM_HINT_T0);
                _mm_prefetch((const char *)blk + KILN_PREFETCH_L2 + 64 * l, _MM_HINT_T1);
            }
            __m128i sc8, coef8;
            float d, dmin;
            kiln_kscales_avx2(blk, type, &sc8, &coef8, &d, &dmin);
            __m256i q[8], qa[8], scv[8];
            kiln_kquants_avx2(blk, type, q);
            if (sgn && !WIDE)
                for (int k = 0; k < 8; k++) qa[k] = _mm256_abs_epi8(q[k]);
            __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
            __m256i s_lo = _mm256_permute2x128_si256(sc16, sc16, 0x00), s_hi = _mm256_permute2x128_si256(sc16, sc16, 0x11);
            for (int k = 0; k < 4; k++) {
                scv[k] = _mm256_shuffle_epi8(s_lo, pick[k]);
                scv[k + 4] = _mm256_shuffle_epi8(s_hi, pick[k]);
            }
            __m256i coef = has_min ? _mm256_cvtepi8_epi16(coef8)
                                   : _mm256_mullo_epi16(sc16, _mm256_set1_epi16((short)-offset));
#if defined(__AVX512BW__)
            /* the same products and pair sums, 64 elements (four chunks) per instruction */
            __m512i q5[4], qa5[4], sc5[4];
            if (WIDE)
                for (int k = 0; k < 4; k++) {
                    q5[k] = _mm512_inserti64x4(_mm512_castsi256_si512(q[2 * k]), q[2 * k + 1], 1);
                    sc5[k] = _mm512_inserti64x4(_mm512_castsi256_si512(scv[2 * k]), scv[2 * k + 1], 1);
                    if (sgn) qa5[k] = _mm512_abs_epi8(q5[k]);
                }
#endif
            for (int t = 0; t < nt; t++) {
                const block_q8_K *x = a->act + (size_t)(t0 + t) * a->nb + ib;
                __m256i s;
#if defined(__AVX512BW__)
                if (WIDE) {
                    __m512i s5 = _mm512_setzero_si512();
                    for (int k = 0; k < 4; k++) {
                        __m512i ax = _mm512_loadu_si512((const void *)(x->qs + 64 * k));
                        /* IQ4_XS: |q| times a with q's sign (AVX512 has no sign_epi8; where
                         * q is 0, |q| is 0 and the product too, as sign_epi8 gives) */
                        __m512i p = sgn ? _mm512_maddubs_epi16(qa5[k], _mm512_mask_sub_epi8(ax, _mm512_movepi8_mask(q5[k]),
                                                                                            _mm512_setzero_si512(), ax))
                                        : _mm512_maddubs_epi16(q5[k], ax);
                        s5 = _mm512_add_epi32(s5, _mm512_madd_epi16(p, sc5[k]));
                    }
                    s = _mm256_add_epi32(_mm512_castsi512_si256(s5), _mm512_extracti64x4_epi64(s5, 1));
                } else
#endif
                {
                    s = _mm256_setzero_si256();
                    for (int k = 0; k < 8; k++) {
                        __m256i ax = _mm256_loadu_si256((const __m256i *)(x->qs + 32 * k));
                        __m256i p = sgn ? _mm256_maddubs_epi16(qa[k], _mm256_sign_epi8(ax, q[k]))
                                        : _mm256_maddubs_epi16(q[k], ax);
                        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, scv[k]));
                    }
                }
                __m256i m = _mm256_setzero_si256();
                if (offset || has_min) {
                    m = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)x->bsums), coef);
                    if (!has_min) s = _mm256_add_epi32(s, m), m = _mm256_setzero_si256();
                }
                acc[t] = kiln_kstep_lanes(acc[t], s, m, d, dmin, x->d, has_min);
            }
        }
        kiln_kstore(a, row, t0, nt, acc);
    }
}

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
/* ---- prompt batches with AMX int8 tiles (the amx variant) ----
 * For 8 rows x 16 tokens at a time, one tile product per scale chunk (32 elements for
 * the types with one scale per sub-block of 32: Q4_K, Q5_K, IQ4_XS; 16 for the others)
 * gives the chunk's exact dots q . a in int32; each row then adds them up times its
 * chunk scales (vpmulld), adds the bsums terms (vpdpwssd: coef pairs times bsum pairs,
 * exact in int32), and meets kiln_ksum_step's float step per super-block, vectorised
 * over the tokens with the same operations in the same order (a multiply, then an add
 * or subtract: no fused multiply-add, as -ffp-contract=off keeps the scalar code), so
 * the results are the same bits.
 * The weights of the 8 rows are decoded once per call into a panel (quants in tile
 * rows, scales as int32 for broadcasts); the batch's activations are laid out once per
 * call in the tiles' order (kiln_amx_xpose), with their bsums as int16 pairs of
 * chunks and d_x in double, per 16-token tile. Two chunks are in flight (tiles 0-2 and
 * 3-5) ahead of the integer and float steps. */
#include "amx_tiles.h"

/* elements per chunk scale */
#define KILN_KAMX_CH(t) ((t) == KILN_TYPE_Q4_K || (t) == KILN_TYPE_Q5_K || (t) == KILN_TYPE_IQ4_XS ? 32 : 16)

/* One super-block of 8 rows. */
typedef struct {
    uint8_t q[8 * QK_K];   /* chunk c, row r: CH bytes at (8 c + r) CH */
    int32_t sc[16][8];     /* chunk scale [c][r] */
    int32_t coef2[8][8];   /* [pair p][r]: the bsums weights of chunks 2p (low 16 bits), 2p + 1 */
    float d[8], dmin[8];
} __attribute__((aligned(64))) kiln_kpanel;

/* One super-block of 16 tokens. */
typedef struct {
    uint8_t x[16 * QK_K];  /* chunk c: CH / 4 tile rows of 16 tokens x 4 bytes at 16 CH c */
    int16_t bs[8][16][2];  /* [pair p][token]: bsums of chunks 2p, 2p + 1 */
    double dx[16];
} __attribute__((aligned(64))) kiln_kxtile;

static void kiln_kamx_layout_acts(kiln_kxtile *xt, const kiln_kgemm_args *a) {
    static const int8_t zeros[QK_K] = {0};
    for (int t0 = 0; t0 < a->n_tokens; t0 += KILN_AMX_TOKENS) {
        const int nt = a->n_tokens - t0 < KILN_AMX_TOKENS ? a->n_tokens - t0 : KILN_AMX_TOKENS;
        for (int64_t ib = 0; ib < a->nb; ib++) {
            kiln_kxtile *x = xt + (size_t)(t0 / KILN_AMX_TOKENS) * a->nb + ib;
            const uint8_t *src[16];
            for (int t = 0; t < 16; t++) {
                const block_q8_K *b = t < nt ? a->act + (size_t)(t0 + t) * a->nb + ib : NULL;
                src[t] = b ? (const uint8_t *)b->qs : (const uint8_t *)zeros;
                x->dx[t] = b ? (double)b->d : 0.0;
                for (int p = 0; p < 8; p++) {
                    x->bs[p][t][0] = b ? b->bsums[2 * p] : 0;
                    x->bs[p][t][1] = b ? b->bsums[2 * p + 1] : 0;
                }
            }
            /* 16 elements at a time: 4 tile rows; chunks of 32 are two such, in order */
            for (int e = 0; e < QK_K; e += 16) {
                const uint8_t *s16[16];
                for (int t = 0; t < 16; t++) s16[t] = src[t] + e;
                kiln_amx_xpose(x->x + 16 * e, s16);
            }
        }
    }
}

/* Rows [row, row + nr) (nr <= 8; the rest zero) into the panel, one per super-block. */
static inline __attribute__((always_inline)) void
kiln_kamx_decode(kiln_kpanel *p, const kiln_kgemm_args *a, int64_t row, int nr, const int type) {
    const int ch = KILN_KAMX_CH(type), has_min = kiln_khas_min(type), offset = kiln_koffset(type);
    const size_t bsize = a->row_size / (size_t)a->nb;
    for (int64_t ib = 0; ib < a->nb; ib++) {
        kiln_kpanel *pb = p + ib;
        memset(pb, 0, sizeof *pb);
        for (int r = 0; r < nr; r++) {
            const void *blk = a->w + (size_t)(row + r) * a->row_size + (size_t)ib * bsize;
            __m256i q[8];
            kiln_kquants_avx2(blk, type, q);
            __attribute__((aligned(32))) uint8_t qb[QK_K];
            for (int k = 0; k < 8; k++) _mm256_store_si256((__m256i *)(qb + 32 * k), q[k]);
            for (int c = 0; c < QK_K / ch; c++) memcpy(pb->q + (size_t)(8 * c + r) * ch, qb + c * ch, (size_t)ch);
            __m128i sc8, coef8;
            float d, dmin;
            kiln_kscales_avx2(blk, type, &sc8, &coef8, &d, &dmin);
            int8_t sc[16], cf[16];
            _mm_storeu_si128((__m128i *)sc, sc8);
            _mm_storeu_si128((__m128i *)cf, coef8);
            for (int c = 0; c < QK_K / ch; c++) pb->sc[c][r] = sc[c * ch / 16];
            for (int j = 0; j < 8; j++) {
                int16_t lo = has_min ? cf[2 * j] : (int16_t)(-offset * sc[2 * j]);
                int16_t hi = has_min ? cf[2 * j + 1] : (int16_t)(-offset * sc[2 * j + 1]);
                pb->coef2[j][r] = (int32_t)(uint16_t)lo | (int32_t)((uint32_t)(uint16_t)hi << 16);
            }
            pb->d[r] = d;
            pb->dmin[r] = dmin;
        }
    }
}

/* Chunk i (super-block i / nch, chunk i % nch) of the 8 rows x 16 tokens into ring slot
 * i % 3 of pc; IQ4_XS's grid values are signed. */
#define KILN_KAMX_ISSUE(i)                                                                     \
    KILN_AMX_PRODUCT((i) & 1, p[(i) / nch].q + (size_t)((i) % nch) * 8 * ch, ch,                \
                     x0[(i) / nch].x + (size_t)((i) % nch) * 16 * ch, type == KILN_TYPE_IQ4_XS,  \
                     pc + (size_t)((i) % 3) * 128)

/* The panel's 8 rows x the 16 tokens of x0 over every super-block: y8[row][token].
 * The tiles of chunk i + 2 run while chunk i's sums meet the scales. */
static inline __attribute__((always_inline)) void
kiln_kamx_rows8(float y8[8][16], const kiln_kpanel *p, const kiln_kxtile *x0, int64_t nb, int32_t *pc,
                const int type) {
    const int ch = KILN_KAMX_CH(type), nch = QK_K / ch;
    const int has_min = kiln_khas_min(type), offset = kiln_koffset(type);
    const int64_t n = nb * nch;
    __m512d acc[8][2]; /* [row][tokens 0..7, 8..15] */
    for (int r = 0; r < 8; r++) acc[r][0] = acc[r][1] = _mm512_setzero_pd();
    KILN_KAMX_ISSUE(0);
    if (n > 1) KILN_KAMX_ISSUE(1);
    for (int64_t sb = 0; sb < nb; sb++) {
        __m512i isum[8];
        for (int r = 0; r < 8; r++) isum[r] = _mm512_setzero_si512();
        for (int c = 0; c < nch; c++) {
            const int64_t i = sb * nch + c;
            const int32_t *cs = pc + (size_t)(i % 3) * 128;
            for (int r = 0; r < 8; r++)
                isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(_mm512_load_si512(cs + 16 * r),
                                                                       _mm512_set1_epi32(p[sb].sc[c][r])));
            if (i + 2 < n) KILN_KAMX_ISSUE(i + 2);
        }
        const kiln_kxtile *x = x0 + sb;
        const __m512d dx0 = _mm512_load_pd(x->dx), dx1 = _mm512_load_pd(x->dx + 8);
        for (int r = 0; r < 8; r++) {
            __m512i msum = _mm512_setzero_si512();
            if (has_min || offset) {
                __m512i m = _mm512_setzero_si512();
                for (int j = 0; j < 8; j++)
                    m = _mm512_dpwssd_epi32(m, _mm512_load_si512(x->bs[j]), _mm512_set1_epi32(p[sb].coef2[j][r]));
                if (has_min) msum = m;
                else isum[r] = _mm512_add_epi32(isum[r], m);
            }
            /* kiln_ksum_step, 16 tokens at once */
            const __m512d d = _mm512_set1_pd((double)p[sb].d[r]), dm = _mm512_set1_pd((double)p[sb].dmin[r]);
            acc[r][0] = _mm512_add_pd(acc[r][0], _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(isum[r])), _mm512_mul_pd(d, dx0)));
            acc[r][1] = _mm512_add_pd(acc[r][1], _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(isum[r], 1)), _mm512_mul_pd(d, dx1)));
            acc[r][0] = _mm512_sub_pd(acc[r][0], _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(msum)), _mm512_mul_pd(dm, dx0)));
            acc[r][1] = _mm512_sub_pd(acc[r][1], _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(msum, 1)), _mm512_mul_pd(dm, dx1)));
        }
    }
    for (int r = 0; r < 8; r++)
        _mm512_store_ps(y8[r], _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(acc[r][0])),
                                                  _mm512_cvtpd_ps(acc[r][1]), 1));
}
#undef KILN_KAMX_ISSUE

static inline __attribute__((always_inline)) void
kiln_kgemm_tiles_typed(const kiln_kgemm_args *a, int64_t r0, int64_t r1, kiln_kpanel *p, int32_t *pc,
                       const kiln_kxtile *xt, const int type) {
    kiln_amx_config(KILN_KAMX_CH(type));
    for (int64_t row = r0; row < r1; row += 8) {
        const int nr = (int)(r1 - row < 8 ? r1 - row : 8);
        kiln_kamx_decode(p, a, row, nr, type);
        for (int t0 = 0; t0 < a->n_tokens; t0 += KILN_AMX_TOKENS) {
            const int nt = a->n_tokens - t0 < KILN_AMX_TOKENS ? a->n_tokens - t0 : KILN_AMX_TOKENS;
            __attribute__((aligned(64))) float y8[8][16];
            kiln_kamx_rows8(y8, p, xt + (size_t)(t0 / KILN_AMX_TOKENS) * a->nb, a->nb, pc, type);
            for (int t = 0; t < nt; t++)
                for (int r = 0; r < nr; r++) a->y[(size_t)(t0 + t) * a->rows + row + r] = y8[r][t];
        }
    }
}

/* Rows [r0, r1) for every token with AMX tiles; 0 when the buffers cannot be allocated
 * (the caller then takes the row kernels, which give the same bits). */
static int kiln_kgemm_tiles(const kiln_kgemm_args *a, int64_t r0, int64_t r1) {
    const size_t n_tiles = (size_t)(a->n_tokens + KILN_AMX_TOKENS - 1) / KILN_AMX_TOKENS;
    const size_t panel = (size_t)a->nb * sizeof(kiln_kpanel), ring = 3 * 128 * sizeof(int32_t);
    uint8_t *buf = aligned_alloc(64, panel + ring + n_tiles * (size_t)a->nb * sizeof(kiln_kxtile));
    if (!buf) return 0;
    kiln_kpanel *p = (kiln_kpanel *)buf;
    int32_t *pc = (int32_t *)(buf + panel);
    kiln_kxtile *xt = (kiln_kxtile *)(buf + panel + ring);
    kiln_kamx_layout_acts(xt, a);
    switch (a->type) {
    case KILN_TYPE_Q2_K: kiln_kgemm_tiles_typed(a, r0, r1, p, pc, xt, KILN_TYPE_Q2_K); break;
    case KILN_TYPE_Q3_K: kiln_kgemm_tiles_typed(a, r0, r1, p, pc, xt, KILN_TYPE_Q3_K); break;
    case KILN_TYPE_Q4_K: kiln_kgemm_tiles_typed(a, r0, r1, p, pc, xt, KILN_TYPE_Q4_K); break;
    case KILN_TYPE_Q5_K: kiln_kgemm_tiles_typed(a, r0, r1, p, pc, xt, KILN_TYPE_Q5_K); break;
    case KILN_TYPE_Q6_K: kiln_kgemm_tiles_typed(a, r0, r1, p, pc, xt, KILN_TYPE_Q6_K); break;
    case KILN_TYPE_IQ4_XS: kiln_kgemm_tiles_typed(a, r0, r1, p, pc, xt, KILN_TYPE_IQ4_XS); break;
    default: abort(); /* kiln_matmul routes no other type here */
    }
    _tile_release();
    free(buf);
    return 1;
}
#endif /* __AMX_INT8__ */

#elif defined(__ARM_FEATURE_DOTPROD) && defined(__aarch64__)
#include <arm_neon.h>

/* Quants element by element, then sdot per chunk, scaled per chunk in int32. */
static inline __attribute__((always_inline)) void
kiln_krows(const kiln_kgemm_args *a, int64_t r0, int64_t r1, int t0, int nt, const int type) {
    const int has_min = kiln_khas_min(type), offset = kiln_koffset(type);
    const size_t bsize = a->row_size / (size_t)a->nb;
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t *wr = a->w + (size_t)row * a->row_size;
        double acc[KILN_KNT];
        for (int t = 0; t < nt; t++) acc[t] = 0.0;
        for (int64_t ib = 0; ib < a->nb; ib++) {
            const void *blk = wr + (size_t)ib * bsize;
            kiln_kscales ks;
            kiln_kscales_of(blk, type, &ks);
            int8_t qv[QK_K];
            kiln_kquants_of(blk, type, qv);
            int8x16_t q[16];
            for (int c = 0; c < 16; c++) q[c] = vld1q_s8(qv + 16 * c);
            int16x8_t sc_lo = vmovl_s8(vld1_s8(ks.sc)), sc_hi = vmovl_s8(vld1_s8(ks.sc + 8));
            int16x8_t cf_lo, cf_hi;
            if (has_min) {
                cf_lo = vmovl_s8(vld1_s8(ks.coef));
                cf_hi = vmovl_s8(vld1_s8(ks.coef + 8));
            } else {
                cf_lo = vmulq_n_s16(sc_lo, (int16_t)-offset);
                cf_hi = vmulq_n_s16(sc_hi, (int16_t)-offset);
            }
            for (int t = 0; t < nt; t++) {
                const block_q8_K *x = a->act + (size_t)(t0 + t) * a->nb + ib;
                int32x4_t s = vdupq_n_s32(0);
                for (int c = 0; c < 16; c++) {
                    int32x4_t dc = vdotq_s32(vdupq_n_s32(0), q[c], vld1q_s8(x->qs + 16 * c));
                    s = vmlaq_n_s32(s, dc, ks.sc[c]);
                }
                int16x8_t b_lo = vld1q_s16(x->bsums), b_hi = vld1q_s16(x->bsums + 8);
                int32x4_t m = vmull_s16(vget_low_s16(b_lo), vget_low_s16(cf_lo));
                m = vmlal_s16(m, vget_high_s16(b_lo), vget_high_s16(cf_lo));
                m = vmlal_s16(m, vget_low_s16(b_hi), vget_low_s16(cf_hi));
                m = vmlal_s16(m, vget_high_s16(b_hi), vget_high_s16(cf_hi));
                int32_t isum, msum = 0;
                if (has_min) msum = vaddvq_s32(m);
                else s = vaddq_s32(s, m); /* IQ4_XS: coef 0, adds 0 */
                isum = vaddvq_s32(s);
                acc[t] = kiln_ksum_step(acc[t], isum, msum, ks.d, ks.dmin, x->d);
            }
        }
        kiln_kstore(a, row, t0, nt, acc);
    }
}

#else
/* Scalar reference: each chunk's dot, times its scale, plus the bsums term. */
static inline __attribute__((always_inline)) void kiln_krows(const kiln_kgemm_args *a, int64_t r0, int64_t r1, int t0, int nt, const int type) {
    const int has_min = kiln_khas_min(type), offset = kiln_koffset(type);
    const size_t bsize = a->row_size / (size_t)a->nb;
    for (int64_t row = r0; row < r1; row++) {
        const uint8_t *wr = a->w + (size_t)row * a->row_size;
        double acc[KILN_KNT];
        for (int t = 0; t < nt; t++) acc[t] = 0.0;
        for (int64_t ib = 0; ib < a->nb; ib++) {
            const void *blk = wr + (size_t)ib * bsize;
            kiln_kscales ks;
            kiln_kscales_of(blk, type, &ks);
            int8_t q[QK_K];
            kiln_kquants_of(blk, type, q);
            for (int t = 0; t < nt; t++) {
                const block_q8_K *x = a->act + (size_t)(t0 + t) * a->nb + ib;
                int32_t isum = 0, msum = 0;
                for (int c = 0; c < 16; c++) {
                    int32_t dot = 0;
                    for (int e = 16 * c; e < 16 * c + 16; e++) dot += q[e] * x->qs[e];
                    isum += ks.sc[c] * dot;
                    if (has_min) msum += ks.coef[c] * x->bsums[c];
                    else isum -= offset * ks.sc[c] * x->bsums[c];
                }
                acc[t] = kiln_ksum_step(acc[t], isum, msum, ks.d, ks.dmin, x->d);
            }
        }
        kiln_kstore(a, row, t0, nt, acc);
    }
}
#endif

/* Rows [r0, r1) for tokens [t0, t0 + nt), with the type a compile-time constant, and
 * the token count too for generation (1) and full tiles, so the accumulators stay in
 * registers rather than making a store-reload chain per super-block. */
#define KILN_KROWS_NT(T)                                                                  \
    (nt == 1 ? kiln_krows(a, r0, r1, t0, 1, T)                                            \
             : nt == KILN_KNT ? kiln_krows(a, r0, r1, t0, KILN_KNT, T) : kiln_krows(a, r0, r1, t0, nt, T))
static void kiln_krows_typed(const kiln_kgemm_args *a, int64_t r0, int64_t r1, int t0, int nt) {
    switch (a->type) {
    case KILN_TYPE_Q2_K: KILN_KROWS_NT(KILN_TYPE_Q2_K); break;
    case KILN_TYPE_Q3_K: KILN_KROWS_NT(KILN_TYPE_Q3_K); break;
    case KILN_TYPE_Q4_K: KILN_KROWS_NT(KILN_TYPE_Q4_K); break;
    case KILN_TYPE_Q5_K: KILN_KROWS_NT(KILN_TYPE_Q5_K); break;
    case KILN_TYPE_Q6_K: KILN_KROWS_NT(KILN_TYPE_Q6_K); break;
    case KILN_TYPE_IQ4_XS: KILN_KROWS_NT(KILN_TYPE_IQ4_XS); break;
    default: abort(); /* kiln_matmul routes no other type here */
    }
}

void KILN_FN(kiln_kgemm)(const kiln_kgemm_args *a, int64_t r0, int64_t r1) {
#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
    if (a->n_tokens >= KILN_AMX_MIN_TOKENS && kiln_kgemm_tiles(a, r0, r1)) return;
#endif
    /* a batch passes over the weights once per KILN_KNT tokens: take the rows in
     * blocks small enough to stay in L2 meanwhile */
    int64_t step = a->n_tokens > KILN_KNT ? (int64_t)((256u << 10) / a->row_size) : r1 - r0;
    if (step < 1) step = 1;
    for (int64_t rb = r0; rb < r1; rb += step) {
        int64_t re = rb + step < r1 ? rb + step : r1;
        for (int t0 = 0; t0 < a->n_tokens; t0 += KILN_KNT)
            kiln_krows_typed(a, rb, re, t0, a->n_tokens - t0 < KILN_KNT ? a->n_tokens - t0 : KILN_KNT);
    }
}
