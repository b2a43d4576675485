/* Quantized weights (packed Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, see kernels_impl.h)
 * times quantized activations. Per block the integer dot is exact in int32; the
 * block's float scale d_w * d_x is applied once. Each call computes row groups
 * [rg0, rg1) for every token; a row group's KILN_RG rows share every activation load,
 * and up to KILN_NT tokens share every weight load (prompt batches).
 *
 * The weights are widened to bytes in registers only: 4-bit quants by masks and
 * shifts, Q5_*'s fifth bit from its bit plane by a bit -> byte expansion, IQ4_NL's
 * indices by a 16-entry table lookup (pshufb / tbl) into its grid. Generation reads
 * every weight once per token, so it is bound by memory bandwidth: the bytes of the
 * packed layout are what it costs.
 *
 * The dot-product instructions leave 4 int32 lanes per block and row; the SIMD
 * variants sum those lanes across the 4 rows at once (a 4x4 transpose-add), which
 * leaves one lane per (block, row) in the order of the packed scales.
 *
 * The blocks of a row are summed in double and the result is rounded to float once.
 * Each block's term is exact in double (|isum| < 2^20 times d_w * d_x, itself exact in
 * float: two fp16 significands; for Q4_1 and Q5_1 also m_w * s_x, two fp16 values), so
 * the output is the exact dot product of the quantized operands up to one double
 * rounding per block, whatever the order: every ISA variant, thread count and batch
 * size gives
 * the same float, and a float64 NumPy product of the dequantized operands (the
 * reference model) gives it too. That matters because the next layer quantizes these
 * values to 8 bits again: a last-bit difference can move a value across a rounding
 * boundary, and over 30 layers such flips compound into visibly different logits. */
#include "isa.h"
#include "codecs.h" /* kiln_kvalues_iq4nl */
#include "kernels_impl.h"

#define KILN_NT 8 /* tokens per pass over a row group */

#include <stdlib.h>
#include <string.h>

/* What each weight type's kernel does; type is a compile-time constant in every
 * instantiation (kiln_qgemm_rows), so these fold away. */
#define KILN_WIDE(t) ((t) == KILN_TYPE_Q8_0) /* 8-bit quants: lo and hi halves apart */
#define KILN_Q5(t) ((t) == KILN_TYPE_Q5_0 || (t) == KILN_TYPE_Q5_1) /* nibbles + bit plane */
#define KILN_NL(t) ((t) == KILN_TYPE_IQ4_NL) /* nibbles index kvalues_iq4nl */
#define KILN_HAS_M(t) ((t) == KILN_TYPE_Q4_1 || (t) == KILN_TYPE_Q5_1) /* + m_w * s_x per block */
/* quant bytes of one block in a row of the packed layout */
#define KILN_BLOCK_BYTES(t) (KILN_WIDE(t) ? 32 : KILN_Q5(t) ? 20 : 16)
/* 64-byte lines of one block group of a row group, for the prefetches */
#define KILN_GROUP_LINES(t) (KILN_RG * KILN_KG * KILN_BLOCK_BYTES(t) / 64)

/* The Q5_* bit plane of n blocks' lo (or hi) halves at p, 16 bits per block. */
static inline uint64_t kiln_q5_bits(const uint8_t *p, int n) {
    uint64_t bits = 0;
    memcpy(&bits, p, (size_t)(2 * n)); /* little-endian, as qh is */
    return bits;
}

/* Token t's results for the rows of row group rg (fewer in a last, partial group). */
static inline void kiln_store_rows(const kiln_qgemm_args *a, int64_t rg, int t, const float *y4) {
    int64_t n = a->w.rows - rg * KILN_RG < KILN_RG ? a->w.rows - rg * KILN_RG : KILN_RG;
    memcpy(a->y + (size_t)t * a->w.rows + rg * KILN_RG, y4, sizeof(float) * (size_t)n);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

/* Per 128-bit lane b: s_r holds 4 partial sums of row r; returns [sum s_0 .. sum s_3]. */
static inline __m512i kiln_tsum4(__m512i s0, __m512i s1, __m512i s2, __m512i s3) {
    __m512i a01 = _mm512_add_epi32(_mm512_unpacklo_epi32(s0, s1), _mm512_unpackhi_epi32(s0, s1));
    __m512i a23 = _mm512_add_epi32(_mm512_unpacklo_epi32(s2, s3), _mm512_unpackhi_epi32(s2, s3));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(a01, a23), _mm512_unpackhi_epi64(a01, a23));
}

/* The quants of one block group (nb blocks; lm masks their bytes) of a row group as
 * unsigned bytes: wl[r] holds row r's lo halves (128-bit lane b: elements 0..15 of
 * block b), wh[r] its hi halves (elements 16..31). */
static inline __attribute__((always_inline)) void
kiln_decode_rg512(__m512i wl[KILN_RG], __m512i wh[KILN_RG], const uint8_t *qs, int nb, __mmask64 lm,
                  const int type) {
    const int wide = KILN_WIDE(type), q5 = KILN_Q5(type), nl = KILN_NL(type);
    const size_t bb = KILN_BLOCK_BYTES(type);
    const __m512i mask4 = _mm512_set1_epi8(0x0f), bit4 = _mm512_set1_epi8(0x10);
    /* the grid offset to unsigned, as the type table's act_offset says (128) */
    const __m512i grid = _mm512_broadcast_i32x4(
        _mm_xor_si128(_mm_loadu_si128((const __m128i *)kiln_kvalues_iq4nl), _mm_set1_epi8((char)0x80)));
    for (int r = 0; r < KILN_RG; r++) {
        const uint8_t *rq = qs + (size_t)r * nb * bb;
        if (wide) {
            wl[r] = _mm512_maskz_loadu_epi8(lm, rq);
            wh[r] = _mm512_maskz_loadu_epi8(lm, rq + nb * 16);
        } else {
            __m512i v = _mm512_maskz_loadu_epi8(lm, rq);
            wl[r] = _mm512_and_si512(v, mask4);
            wh[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask4);
            if (nl) { /* padding lanes look up grid[0]; their activations are 0 */
                wl[r] = _mm512_shuffle_epi8(grid, wl[r]);
                wh[r] = _mm512_shuffle_epi8(grid, wh[r]);
            }
            if (q5) { /* bit j of the plane is the fifth bit of byte lane j */
                wl[r] = _mm512_mask_add_epi8(wl[r], (__mmask64)kiln_q5_bits(rq + nb * 16, nb), wl[r], bit4);
                wh[r] = _mm512_mask_add_epi8(wh[r], (__mmask64)kiln_q5_bits(rq + nb * 18, nb), wh[r], bit4);
            }
        }
    }
}

/* One block group (nb blocks; lm masks their quant bytes) of a row group: four blocks
 * per step, one 512-bit vpdpbusd covering 4 blocks' lo or hi halves. */
static inline __attribute__((always_inline)) void
kiln_qstep(__m512d *acc, const kiln_packed_view *w, const kiln_act *act, int64_t rg, int64_t g,
           int nb, __mmask64 lm, const int nt_tok, const int type) {
    const uint8_t *qs = kiln_rg_qs(w, rg, g);
    /* the arithmetic per byte leaves too few loads in flight for the hardware
     * prefetcher to hide DRAM latency on its own */
    for (int i = 0; i < KILN_GROUP_LINES(type); i++)
        _mm_prefetch((const char *)qs + KILN_PREFETCH + 64 * i, _MM_HINT_T0);
    for (int i = 0; i < KILN_GROUP_LINES(type); i++)
        _mm_prefetch((const char *)qs + KILN_PREFETCH_L2 + 64 * i, _MM_HINT_T1);
    __m512i wl[KILN_RG], wh[KILN_RG];
    kiln_decode_rg512(wl, wh, qs, nb, lm, type);
    /* d_w of lanes [b][r] in double, for every token */
    __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)kiln_rg_d(w, rg, g)));
    __m512d dw_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(dw));
    __m512d dw_hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(dw), 1)));
    for (int t = 0; t < nt_tok; t++) {
        const int8_t *aq = act[t].qs + g * KILN_KG * QK;
        __m512i al = _mm512_loadu_si512(aq), ah = _mm512_loadu_si512(aq + KILN_KG * 16);
        __m512i s[KILN_RG];
        for (int r = 0; r < KILN_RG; r++)
            s[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wl[r], al), wh[r], ah);
        __m512i T = kiln_tsum4(s[0], s[1], s[2], s[3]);
        T = _mm512_add_epi32(T, _mm512_loadu_si512(act[t].off + g * KILN_KG * 4));
        /* lanes [b][r]: blocks 0, 1 in the low half, 2, 3 in the high half */
        const double *dx = act[t].dx + g * KILN_KG * 4;
        acc[t] = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(T)),
                                 _mm512_mul_pd(dw_lo, _mm512_loadu_pd(dx)), acc[t]);
        acc[t] = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(T, 1)),
                                 _mm512_mul_pd(dw_hi, _mm512_loadu_pd(dx + 8)), acc[t]);
        if (KILN_HAS_M(type)) {
            __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)kiln_rg_m(w, rg, g)));
            __m512 ms = _mm512_mul_ps(m, _mm512_loadu_ps(act[t].sx + g * KILN_KG * 4));
            acc[t] = _mm512_add_pd(acc[t], _mm512_cvtps_pd(_mm512_castps512_ps256(ms)));
            acc[t] = _mm512_add_pd(acc[t], _mm512_cvtps_pd(_mm256_castpd_ps(
                                               _mm512_extractf64x4_pd(_mm512_castps_pd(ms), 1))));
        }
    }
}

static inline __attribute__((always_inline)) void
kiln_qgemm_rg(const kiln_qgemm_args *a, int64_t rg, int t0, const int nt_tok, const int type) {
    const kiln_packed_view *w = &a->w;
    kiln_act act[KILN_NT];
    __m512d acc[KILN_NT]; /* lanes [b % 2][r] */
    for (int t = 0; t < nt_tok; t++) {
        act[t] = kiln_act_at(a->act + (size_t)(t0 + t) * a->act_stride, &a->al);
        acc[t] = _mm512_setzero_pd();
    }
    const int64_t n_full = w->nb / KILN_KG;
    for (int64_t g = 0; g < n_full; g++)
        kiln_qstep(acc, w, act, rg, g, KILN_KG, ~(__mmask64)0, nt_tok, type);
    if (n_full < w->ng) {
        int nb = (int)(w->nb - n_full * KILN_KG);
        kiln_qstep(acc, w, act, rg, n_full, nb, ((__mmask64)1 << (nb * 16)) - 1, nt_tok, type);
    }
    for (int t = 0; t < nt_tok; t++) {
        /* lanes [b % 2][r] -> sum over b */
        __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(acc[t]), _mm512_extractf64x4_pd(acc[t], 1));
        __m128 y4 = _mm256_cvtpd_ps(h);
        float tmp[4];
        _mm_storeu_ps(tmp, y4);
        kiln_store_rows(a, rg, t0 + t, tmp);
    }
}

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
/* ---- prompt batches with AMX int8 tiles (the amx variant) ----
 * One tile multiply-add (8 rows x 32 bytes of weights times 32 x 16 tokens of
 * activations) gives the exact integer sums of one block for 8 rows x 16 tokens,
 * int32 as every other kernel's. The float step after that is the scalar reference's
 * (per block isum * (d_w * d_x) into a double, then the m term, blocks in order), so
 * the results are the same bits.
 * Weights: the rows of a row tile (4 row groups) are decoded once per call into a panel
 * of tile rows (a weight row's 32 quants of a block, in element order), with the zero
 * point taken off (types with one become signed, tdpbssd; Q4_1 and Q5_1 stay unsigned,
 * tdpbsud), so no offset term is left for the float step.
 * Activations: each call first lays its batch out in the tiles' order, per 16-token
 * tile and block: tile row k holds elements 4k..4k+3 of each of the 16 tokens side by
 * side (zeros past the last token), with the tokens' d_x (and s_x) beside it.
 * The tiles take 8 rows at a time (their 8 x 16 double sums fit the registers), two
 * blocks in flight (tiles 0-2 and 3-5) ahead of the float step. */
#include "amx_tiles.h"

#define KILN_AMX_RGS 4         /* row groups per row tile: 16 rows */
/* the zero point the decode takes off: the type table's act_offset */
#define KILN_ZERO_POINT(t) (kiln_type_traits_of(t)->act_offset)

/* Per block: the weight panel's quants (512 bytes), d_w and m_w of its 16 rows. */
#define KILN_AMX_PANEL_BYTES (512 + 16 * sizeof(double) + 16 * sizeof(float))
/* Per block and token tile: the activations' tile (512 bytes), d_x and s_x. */
#define KILN_AMX_XTILE_BYTES (512 + 16 * sizeof(double) + 16 * sizeof(float))

/* The batch's activations in tile order: xt holds n_tiles x nb x KILN_AMX_XTILE_BYTES. */
static void kiln_amx_layout_acts(uint8_t *xt, const kiln_qgemm_args *a, int has_m) {
    static const int8_t zeros[16] = {0};
    const int64_t nb = a->w.nb;
    for (int t0 = 0; t0 < a->n_tokens; t0 += KILN_AMX_TOKENS) {
        kiln_act act[KILN_AMX_TOKENS];
        const int nt = a->n_tokens - t0 < KILN_AMX_TOKENS ? a->n_tokens - t0 : KILN_AMX_TOKENS;
        for (int t = 0; t < nt; t++) act[t] = kiln_act_at(a->act + (size_t)(t0 + t) * a->act_stride, &a->al);
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *x = xt + ((size_t)(t0 / KILN_AMX_TOKENS) * nb + b) * KILN_AMX_XTILE_BYTES;
            double *dx = (double *)(x + 512);
            float *sx = (float *)(dx + 16);
            const size_t lo = (size_t)(b / KILN_KG) * KILN_KG * QK + 16 * (size_t)(b % KILN_KG);
            const uint8_t *src[2][16];
            for (int t = 0; t < KILN_AMX_TOKENS; t++) {
                src[0][t] = t < nt ? (const uint8_t *)act[t].qs + lo : (const uint8_t *)zeros;
                src[1][t] = t < nt ? (const uint8_t *)act[t].qs + lo + KILN_KG * 16 : (const uint8_t *)zeros;
                dx[t] = t < nt ? act[t].dx[4 * b] : 0.0; /* act lanes 4b..4b+3 */
                sx[t] = t < nt && has_m ? act[t].sx[4 * b] : 0.0f;
            }
            kiln_amx_xpose(x, src[0]);       /* rows 0..3: elements 0..15 */
            kiln_amx_xpose(x + 256, src[1]); /* rows 4..7: elements 16..31 */
        }
    }
}

/* Decodes row groups [rg, rg + nrg) (nrg <= 4; the rest of the tile is zero) into the
 * panel: quants pw, scales pdw (and pm). */
static inline __attribute__((always_inline)) void
kiln_amx_decode(uint8_t *pw, double *pdw, float *pm, const kiln_packed_view *w, int64_t rg, int nrg,
                const int type) {
    const __m512i zp = _mm512_set1_epi8((char)KILN_ZERO_POINT(type));
    for (int64_t g = 0; g < w->ng; g++) {
        const int nb = (int)(w->nb - g * KILN_KG < KILN_KG ? w->nb - g * KILN_KG : KILN_KG);
        const __mmask64 lm = nb == KILN_KG ? ~(__mmask64)0 : ((__mmask64)1 << (nb * 16)) - 1;
        for (int q = 0; q < KILN_AMX_RGS; q++) {
            __m512i wl[KILN_RG], wh[KILN_RG];
            if (q < nrg) kiln_decode_rg512(wl, wh, kiln_rg_qs(w, rg + q, g), nb, lm, type);
            for (int r = 0; r < KILN_RG; r++) {
                __m512i l = q < nrg ? _mm512_sub_epi8(wl[r], zp) : _mm512_setzero_si512();
                __m512i h = q < nrg ? _mm512_sub_epi8(wh[r], zp) : _mm512_setzero_si512();
                __attribute__((aligned(64))) uint8_t lb[64], hb[64];
                _mm512_store_si512(lb, l);
                _mm512_store_si512(hb, h);
                for (int j = 0; j < nb; j++) { /* tile row: elements 0..15, then 16..31 */
                    uint8_t *dst = pw + (size_t)(g * KILN_KG + j) * 512 + (size_t)(q * KILN_RG + r) * 32;
                    memcpy(dst, lb + 16 * j, 16);
                    memcpy(dst + 16, hb + 16 * j, 16);
                }
            }
        }
        for (int j = 0; j < nb; j++) {
            const int64_t b = g * KILN_KG + j;
            /* d_w (and m_w) of the 16 rows: 4 fp16 per row group, [b][r] in the group */
            uint64_t d4[KILN_AMX_RGS] = {0}, m4[KILN_AMX_RGS] = {0};
            for (int q = 0; q < nrg; q++) {
                memcpy(&d4[q], kiln_rg_d(w, rg + q, g) + j * KILN_RG, 8);
                if (KILN_HAS_M(type)) memcpy(&m4[q], kiln_rg_m(w, rg + q, g) + j * KILN_RG, 8);
            }
            __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)d4));
            _mm512_store_pd(pdw + b * 16, _mm512_cvtps_pd(_mm512_castps512_ps256(d)));
            _mm512_store_pd(pdw + b * 16 + 8, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1))));
            if (KILN_HAS_M(type))
                _mm512_store_ps(pm + b * 16, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)m4)));
        }
    }
}

/* Block b's sums for 8 rows (the half of the row tile at pw) x 16 tokens, into ring
 * slot b % 3 of pc. */
#define KILN_AMX_ISSUE(b)                                                                     \
    KILN_AMX_PRODUCT((b) & 1, pw + (size_t)(b) * 512, 32, x0 + (size_t)(b) * KILN_AMX_XTILE_BYTES, \
                     signed_w, pc + (size_t)((b) % 3) * 128)

/* 8 rows (pw, pdw, pm: the half's panel) x the 16 tokens of x0: y8[row][token].
 * Software-pipelined: the tiles of block b + 2 run while block b's sums meet the
 * scales, so the tiles' latency hides behind the float step. */
static inline __attribute__((always_inline)) void
kiln_amx_rows8(float y8[8][16], const uint8_t *pw, const double *pdw, const float *pm, const uint8_t *x0,
               int64_t nb, int32_t *pc, const int type) {
    const int signed_w = KILN_ZERO_POINT(type) != 0; /* the decode made them signed */
    __m512d acc[8][2]; /* [row][tokens 0..7, 8..15] */
    for (int r = 0; r < 8; r++) acc[r][0] = acc[r][1] = _mm512_setzero_pd();
    KILN_AMX_ISSUE(0);
    if (nb > 1) KILN_AMX_ISSUE(1);
    for (int64_t b = 0; b < nb; b++) {
        const double *dx = (const double *)(x0 + (size_t)b * KILN_AMX_XTILE_BYTES + 512);
        const __m512d dx0 = _mm512_load_pd(dx), dx1 = _mm512_load_pd(dx + 8);
        const int32_t *c = pc + (size_t)(b % 3) * 128;
        for (int r = 0; r < 8; r++) {
            /* each token half loaded on its own: a load, where splitting one 512-bit
             * load took a shuffle on the port the conversions need */
            const __m256i s0 = _mm256_load_si256((const __m256i *)(c + 16 * r));
            const __m256i s1 = _mm256_load_si256((const __m256i *)(c + 16 * r + 8));
            const __m512d dw = _mm512_set1_pd(pdw[b * 16 + r]);
            acc[r][0] = _mm512_fmadd_pd(_mm512_cvtepi32_pd(s0), _mm512_mul_pd(dw, dx0), acc[r][0]);
            acc[r][1] = _mm512_fmadd_pd(_mm512_cvtepi32_pd(s1), _mm512_mul_pd(dw, dx1), acc[r][1]);
            if (KILN_HAS_M(type)) {
                __m512 ms = _mm512_mul_ps(_mm512_set1_ps(pm[b * 16 + r]), _mm512_load_ps((const float *)(dx + 16)));
                acc[r][0] = _mm512_add_pd(acc[r][0], _mm512_cvtps_pd(_mm512_castps512_ps256(ms)));
                acc[r][1] = _mm512_add_pd(acc[r][1], _mm512_cvtps_pd(_mm256_castpd_ps(
                                                         _mm512_extractf64x4_pd(_mm512_castps_pd(ms), 1))));
            }
        }
        if (b + 2 < nb) KILN_AMX_ISSUE(b + 2);
    }
    for (int r = 0; r < 8; r++)
        _mm512_store_ps(y8[r], _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(acc[r][0])),
                                                  _mm512_cvtpd_ps(acc[r][1]), 1));
}
#undef KILN_AMX_ISSUE

static inline __attribute__((always_inline)) void
kiln_qgemm_tiles_typed(const kiln_qgemm_args *a, int64_t rg0, int64_t rg1, uint8_t *panel,
                       const uint8_t *xt, const int type) {
    const kiln_packed_view *w = &a->w;
    const int64_t nb = w->nb;
    uint8_t *pw = panel;
    double *pdw = (double *)(pw + (size_t)nb * 512);
    float *pm = (float *)(pdw + (size_t)nb * 16);
    int32_t *pc = (int32_t *)(pm + (size_t)nb * 16);
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(16));
    for (int64_t rg = rg0; rg < rg1; rg += KILN_AMX_RGS) {
        const int nrg = (int)(rg1 - rg < KILN_AMX_RGS ? rg1 - rg : KILN_AMX_RGS);
        kiln_amx_decode(pw, pdw, pm, w, rg, nrg, type);
        const int64_t r0 = rg * KILN_RG;
        const int nrows = (int)(w->rows - r0 < nrg * KILN_RG ? w->rows - r0 : nrg * KILN_RG);
        const __mmask16 rows_mask = (__mmask16)((1u << nrows) - 1);
        for (int t0 = 0; t0 < a->n_tokens; t0 += KILN_AMX_TOKENS) {
            const int nt = a->n_tokens - t0 < KILN_AMX_TOKENS ? a->n_tokens - t0 : KILN_AMX_TOKENS;
            const uint8_t *x0 = xt + (size_t)(t0 / KILN_AMX_TOKENS) * nb * KILN_AMX_XTILE_BYTES;
            __attribute__((aligned(64))) float y16[16][16]; /* [row][token] */
            for (int h = 0; h < 2 && 8 * h < nrows; h++)
                kiln_amx_rows8((float(*)[16])y16[8 * h], pw + 256 * h, pdw + 8 * h, pm + 8 * h, x0, nb, pc, type);
            /* y is (tokens, rows): token t's 16 rows are column t of y16 */
            for (int t = 0; t < nt; t++)
                _mm512_mask_storeu_ps(a->y + (size_t)(t0 + t) * w->rows + r0, rows_mask,
                                      _mm512_mask_i32gather_ps(_mm512_setzero_ps(), rows_mask, column, &y16[0][t], 4));
        }
    }
}

/* Row groups [rg0, rg1) for every token with AMX tiles; 0 when the buffers cannot be
 * allocated (the caller then takes the row kernels, which give the same bits). */
static int kiln_qgemm_tiles(const kiln_qgemm_args *a, int64_t rg0, int64_t rg1) {
    const size_t n_tiles = (size_t)(a->n_tokens + KILN_AMX_TOKENS - 1) / KILN_AMX_TOKENS;
    /* the panel, then a ring of 3 blocks' 8 x 16 sums */
    const size_t panel_size = (size_t)a->w.nb * KILN_AMX_PANEL_BYTES + 3 * 128 * sizeof(int32_t);
    const size_t xt_size = n_tiles * (size_t)a->w.nb * KILN_AMX_XTILE_BYTES;
    uint8_t *buf = aligned_alloc(64, panel_size + xt_size);
    if (!buf) return 0;
    kiln_amx_layout_acts(buf + panel_size, a, KILN_HAS_M(a->w.type));
    kiln_amx_config(32);
    switch (a->w.type) {
#define KILN_AMX_CASE(T) \
    case T: kiln_qgemm_tiles_typed(a, rg0, rg1, buf, buf + panel_size, T); break;
    KILN_AMX_CASE(KILN_TYPE_Q4_0)
    KILN_AMX_CASE(KILN_TYPE_Q4_1)
    KILN_AMX_CASE(KILN_TYPE_Q5_0)
    KILN_AMX_CASE(KILN_TYPE_Q5_1)
    KILN_AMX_CASE(KILN_TYPE_Q8_0)
    KILN_AMX_CASE(KILN_TYPE_IQ4_NL)
#undef KILN_AMX_CASE
    default: /* kiln_matrix_init packs no other type */
        abort();
    }
    _tile_release();
    free(buf);
    return 1;
}
#endif /* __AMX_INT8__ */

#elif defined(__AVX2__)
#include <immintrin.h>

static inline __m256i kiln_tsum4(__m256i s0, __m256i s1, __m256i s2, __m256i s3) {
    __m256i a01 = _mm256_add_epi32(_mm256_unpacklo_epi32(s0, s1), _mm256_unpackhi_epi32(s0, s1));
    __m256i a23 = _mm256_add_epi32(_mm256_unpacklo_epi32(s2, s3), _mm256_unpackhi_epi32(s2, s3));
    return _mm256_add_epi32(_mm256_unpacklo_epi64(a01, a23), _mm256_unpackhi_epi64(a01, a23));
}

/* 16 or 32 bytes (zero-extended) */
static inline __m256i kiln_load_half(const uint8_t *p, int two) {
    return two ? _mm256_loadu_si256((const __m256i *)p)
               : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)p));
}

/* Integer dot of 2 blocks (w: weights, a: activations) -> 4 int32 lanes per block;
 * signed_w: the weights are signed (Q8_0, IQ4_NL without VNNI), else unsigned. */
static inline __m256i kiln_dot2(__m256i wl, __m256i wh, __m256i al, __m256i ah, const int signed_w) {
#if defined(__AVXVNNI__)
    (void)signed_w;
    return _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), wl, al), wh, ah);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    if (signed_w) { /* |w| * sign(a, w) cannot saturate 16 bits: |w|, |a| <= 128 */
        __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wl), _mm256_sign_epi8(al, wl)), ones);
        __m256i ph = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wh), _mm256_sign_epi8(ah, wh)), ones);
        return _mm256_add_epi32(pl, ph);
    }
    /* quants <= 31: the 16-bit sums of both halves' pairs stay below 4 * 31 * 128 */
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(wl, al), _mm256_maddubs_epi16(wh, ah));
    return _mm256_madd_epi16(p, ones);
#endif
}

/* 0x10 in byte j where bit j of bits is set: the fifth bits of two Q5_* blocks' lo
 * (or hi) halves, 16 bits per block. */
static inline __m256i kiln_q5_bytes(uint32_t bits) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread); /* byte j: bits byte j / 8 */
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

/* Two blocks per step (one 256-bit register holds 2 blocks' lo or hi halves). */
static inline __attribute__((always_inline)) void
kiln_qgemm_rg(const kiln_qgemm_args *a, int64_t rg, int t0, const int nt_tok, const int type) {
    const kiln_packed_view *w = &a->w;
    const int wide = KILN_WIDE(type), q5 = KILN_Q5(type), nl = KILN_NL(type);
    const size_t bb = KILN_BLOCK_BYTES(type);
#if defined(__AVXVNNI__)
    const int signed_w = 0;
#else
    /* without VNNI, 8-bit weights are turned back to signed (Q8_0) or looked up signed
     * (IQ4_NL) for the sign trick of kiln_dot2: no offset term */
    const int signed_w = wide || nl;
#endif
    kiln_act act[KILN_NT];
    __m256d acc[KILN_NT]; /* lanes [r] */
    for (int t = 0; t < nt_tok; t++) {
        act[t] = kiln_act_at(a->act + (size_t)(t0 + t) * a->act_stride, &a->al);
        acc[t] = _mm256_setzero_pd();
    }
    const __m256i mask4 = _mm256_set1_epi8(0x0f);
    const __m256i sign8 = _mm256_set1_epi8((char)0x80);
    __m128i grid16 = _mm_loadu_si128((const __m128i *)kiln_kvalues_iq4nl);
    if (!signed_w) grid16 = _mm_xor_si128(grid16, _mm_set1_epi8((char)0x80)); /* + 128 */
    const __m256i grid = _mm256_broadcastsi128_si256(grid16);
    for (int64_t g = 0; g < w->ng; g++) {
        const int nb = (int)(w->nb - g * KILN_KG < KILN_KG ? w->nb - g * KILN_KG : KILN_KG);
        const uint8_t *qs = kiln_rg_qs(w, rg, g);
        for (int i = 0; i < KILN_GROUP_LINES(type); i++) /* see the AVX512 kernel */
            _mm_prefetch((const char *)qs + KILN_PREFETCH + 64 * i, _MM_HINT_T0);
        for (int i = 0; i < KILN_GROUP_LINES(type); i++)
            _mm_prefetch((const char *)qs + KILN_PREFETCH_L2 + 64 * i, _MM_HINT_T1);
        for (int h = 0; 2 * h < nb; h++) {
            const int two = 2 * h + 1 < nb;
            __m256i wl[KILN_RG], wh[KILN_RG];
            for (int r = 0; r < KILN_RG; r++) {
                const uint8_t *rq = qs + (size_t)r * nb * bb;
                if (wide) {
                    wl[r] = kiln_load_half(rq + 32 * h, two);
                    wh[r] = kiln_load_half(rq + nb * 16 + 32 * h, two);
                    if (signed_w) {
                        wl[r] = _mm256_xor_si256(wl[r], sign8);
                        wh[r] = _mm256_xor_si256(wh[r], sign8);
                    }
                } else {
                    __m256i v = kiln_load_half(rq + 32 * h, two);
                    wl[r] = _mm256_and_si256(v, mask4);
                    wh[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask4);
                    if (nl) { /* a missing second block looks up grid[0]; its activations are 0 */
                        wl[r] = _mm256_shuffle_epi8(grid, wl[r]);
                        wh[r] = _mm256_shuffle_epi8(grid, wh[r]);
                    }
                    if (q5) {
                        int n = two ? 2 : 1;
                        wl[r] = _mm256_or_si256(wl[r], kiln_q5_bytes((uint32_t)kiln_q5_bits(rq + nb * 16 + 4 * h, n)));
                        wh[r] = _mm256_or_si256(wh[r], kiln_q5_bytes((uint32_t)kiln_q5_bits(rq + nb * 18 + 4 * h, n)));
                    }
                }
            }
            const size_t lane = (size_t)g * KILN_KG * 4 + 8 * h; /* act lanes of block 2h */
            __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kiln_rg_d(w, rg, g) + 2 * h * KILN_RG)));
            __m256d dw_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(dw));
            __m256d dw_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(dw, 1));
            for (int t = 0; t < nt_tok; t++) {
                const int8_t *aq = act[t].qs + g * KILN_KG * QK + 32 * h;
                __m256i al = _mm256_loadu_si256((const __m256i *)aq);
                __m256i ah = _mm256_loadu_si256((const __m256i *)(aq + KILN_KG * 16));
                __m256i s[KILN_RG];
                for (int r = 0; r < KILN_RG; r++) s[r] = kiln_dot2(wl[r], wh[r], al, ah, signed_w);
                __m256i T = kiln_tsum4(s[0], s[1], s[2], s[3]);
                if (!signed_w) T = _mm256_add_epi32(T, _mm256_loadu_si256((const __m256i *)(act[t].off + lane)));
                /* lanes [b][r] for blocks 2h, 2h + 1 */
                acc[t] = _mm256_fmadd_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(T)),
                                         _mm256_mul_pd(dw_lo, _mm256_loadu_pd(act[t].dx + lane)), acc[t]);
                acc[t] = _mm256_fmadd_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(T, 1)),
                                         _mm256_mul_pd(dw_hi, _mm256_loadu_pd(act[t].dx + lane + 4)), acc[t]);
                if (KILN_HAS_M(type)) {
                    __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kiln_rg_m(w, rg, g) + 2 * h * KILN_RG)));
                    __m256 ms = _mm256_mul_ps(m, _mm256_loadu_ps(act[t].sx + lane));
                    acc[t] = _mm256_add_pd(acc[t], _mm256_cvtps_pd(_mm256_castps256_ps128(ms)));
                    acc[t] = _mm256_add_pd(acc[t], _mm256_cvtps_pd(_mm256_extractf128_ps(ms, 1)));
                }
            }
        }
    }
    for (int t = 0; t < nt_tok; t++) {
        __m128 y4 = _mm256_cvtpd_ps(acc[t]);
        float tmp[4];
        _mm_storeu_ps(tmp, y4);
        kiln_store_rows(a, rg, t0 + t, tmp);
    }
}


#if !defined(__AVXVNNI__)
/* ---- prompt batches without VNNI: row panels ----
 * For a batch of KILN_PANEL_MIN_TOKENS tokens or more, the weights of 8 rows are first
 * decoded into a panel (bytes in registers' order), which KILN_PT tokens then read from
 * L1: the decode (nibbles, fifth bits, grid lookups, the transpose) is paid once per
 * KILN_PT tokens instead of once per KILN_NT. In a panel, chunk c of block b (its
 * elements 4c..4c+3 for c < 4, 16 + 4(c - 4).. for c >= 4) is one register holding the
 * 4 bytes of each of the 8 rows, int32 lane r = row r. A token's 4 activations of the
 * chunk, broadcast to every lane, then give each row's partial sum in its own lane:
 * no horizontal sums, and each block's 8 sums meet the scales as 8 lanes at once.
 * Without VNNI each chunk costs maddubs (+ madd): for 4-bit weights the 16-bit sums of
 * the 8 chunks stay below 8 * 2 * 15 * 127 < 2^15, for 5-bit ones 4 chunks (< 2^15)
 * at a time; 8-bit weights (Q8_0, IQ4_NL) are kept signed with their absolute values
 * beside them for the sign trick, each chunk's pair sums <= 2 * 128 * 127 < 2^15.
 * The float step is the row-by-row kernels' (each block: isum * (d_w * d_x) into a
 * double, then the m term), blocks in order, so the results are the same bits. */
#define KILN_PR 8                  /* rows per panel: two row groups */
#define KILN_PK 64                 /* blocks per panel tile (along a row) */
#define KILN_PT 64                 /* tokens per pass over a panel tile */
#define KILN_PANEL_MIN_TOKENS 16   /* below this the decode would not pay */

typedef struct {
    __m256i w[KILN_PK][8];  /* chunk c of block b, lane r = row r (signed for the sign types) */
    __m256i aw[KILN_PK][8]; /* |w| (signed types) */
    __m256d dw[KILN_PK][2]; /* d_w of rows 0..3, 4..7 */
    __m256 m[KILN_PK];      /* m_w of rows 0..7 (Q4_1, Q5_1) */
} kiln_panel;

/* In place: r[j] (8 int32 of row j) -> r[i] = int32 i of rows 0..7. */
static inline void kiln_transpose8(__m256i r[8]) {
    __m256i t[8], u[8];
    for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_epi32(r[j], r[j + 1]);
        t[j + 1] = _mm256_unpackhi_epi32(r[j], r[j + 1]);
    }
    for (int j = 0; j < 8; j += 4) {
        u[j] = _mm256_unpacklo_epi64(t[j], t[j + 2]);
        u[j + 1] = _mm256_unpackhi_epi64(t[j], t[j + 2]);
        u[j + 2] = _mm256_unpacklo_epi64(t[j + 1], t[j + 3]);
        u[j + 3] = _mm256_unpackhi_epi64(t[j + 1], t[j + 3]);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
    }
}

/* Decodes blocks [kb0, kb0 + nk) of row groups rg, rg + 1 (only rg when !two_rg) into p.
 * kb0 is a multiple of KILN_KG. */
static inline __attribute__((always_inline)) void
kiln_panel_decode(kiln_panel *p, const kiln_packed_view *w, int64_t rg, int two_rg, int64_t kb0,
                  int nk, const int type) {
    const int wide = KILN_WIDE(type), q5 = KILN_Q5(type), nl = KILN_NL(type);
    const int signed_w = wide || nl;
    const size_t bb = KILN_BLOCK_BYTES(type);
    const __m256i mask4 = _mm256_set1_epi8(0x0f), sign8 = _mm256_set1_epi8((char)0x80);
    const __m256i grid = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)kiln_kvalues_iq4nl));
    for (int b = 0; b < nk; b += 2) {
        const int64_t kb = kb0 + b, g = kb / KILN_KG;
        const int h = (int)(kb % KILN_KG) / 2;
        const int nb = (int)(w->nb - g * KILN_KG < KILN_KG ? w->nb - g * KILN_KG : KILN_KG);
        const int two = b + 1 < nk;
        __m256i lo[8], hi[8];
        for (int r = 0; r < KILN_PR; r++) {
            if (r >= KILN_RG && !two_rg) {
                lo[r] = hi[r] = _mm256_setzero_si256();
                continue;
            }
            const uint8_t *rq = kiln_rg_qs(w, rg + r / KILN_RG, g) + (size_t)(r % KILN_RG) * nb * bb;
            if (wide) {
                lo[r] = kiln_load_half(rq + 32 * h, two);
                hi[r] = kiln_load_half(rq + nb * 16 + 32 * h, two);
                lo[r] = _mm256_xor_si256(lo[r], sign8);
                hi[r] = _mm256_xor_si256(hi[r], sign8);
            } else {
                __m256i v = kiln_load_half(rq + 32 * h, two);
                lo[r] = _mm256_and_si256(v, mask4);
                hi[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask4);
                if (nl) {
                    lo[r] = _mm256_shuffle_epi8(grid, lo[r]);
                    hi[r] = _mm256_shuffle_epi8(grid, hi[r]);
                }
                if (q5) {
                    int n = two ? 2 : 1;
                    lo[r] = _mm256_or_si256(lo[r], kiln_q5_bytes((uint32_t)kiln_q5_bits(rq + nb * 16 + 4 * h, n)));
                    hi[r] = _mm256_or_si256(hi[r], kiln_q5_bytes((uint32_t)kiln_q5_bits(rq + nb * 18 + 4 * h, n)));
                }
            }
        }
        /* lo[r] holds elements 0..15 of blocks kb, kb + 1 (4 int32 each): after the
         * transpose lo[i] is chunk i % 4 of block kb + i / 4, hi[i] chunk 4 + i % 4 */
        kiln_transpose8(lo);
        kiln_transpose8(hi);
        for (int i = 0; i < 8; i++) {
            int bi = b + i / 4;
            if (bi >= nk) break;
            p->w[bi][i % 4] = lo[i];
            p->w[bi][4 + i % 4] = hi[i];
        }
    }
    for (int b = 0; b < nk; b++) {
        const int64_t kb = kb0 + b, g = kb / KILN_KG;
        const int bg = (int)(kb % KILN_KG);
        float d[KILN_PR] = {0}, m[KILN_PR] = {0};
        for (int r = 0; r < KILN_PR; r++) {
            if (r >= KILN_RG && !two_rg) break;
            d[r] = kiln_fp16_to_fp32(kiln_rg_d(w, rg + r / KILN_RG, g)[bg * KILN_RG + r % KILN_RG]);
            if (KILN_HAS_M(type))
                m[r] = kiln_fp16_to_fp32(kiln_rg_m(w, rg + r / KILN_RG, g)[bg * KILN_RG + r % KILN_RG]);
        }
        p->dw[b][0] = _mm256_cvtps_pd(_mm_loadu_ps(d));
        p->dw[b][1] = _mm256_cvtps_pd(_mm_loadu_ps(d + 4));
        if (KILN_HAS_M(type)) p->m[b] = _mm256_loadu_ps(m);
        if (signed_w)
            for (int c = 0; c < 8; c++) p->aw[b][c] = _mm256_abs_epi8(p->w[b][c]);
    }
}

static inline __m256i kiln_bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* nt (1 or 2) tokens' sums over the panel tile: acc[t][0..1] (rows 0..3, 4..7) += the
 * blocks' terms, in block order. */
static inline __attribute__((always_inline)) void
kiln_panel_tokens(const kiln_panel *p, const kiln_act *act, int64_t kb0, int nk, __m256d acc[][2],
                  const int nt, const int type) {
    const int signed_w = KILN_WIDE(type) || KILN_NL(type), q5 = KILN_Q5(type);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int b = 0; b < nk; b++) {
        const int64_t kb = kb0 + b, g = kb / KILN_KG;
        const int bg = (int)(kb % KILN_KG);
        const size_t lane = (size_t)kb * 4;
        __m256i s[2];
        for (int t = 0; t < nt; t++) {
            const int8_t *ql = act[t].qs + g * KILN_KG * QK + 16 * bg, *qh = ql + KILN_KG * 16;
            if (signed_w) {
                __m256i sum = _mm256_setzero_si256();
                for (int c = 0; c < 8; c++) {
                    __m256i a4 = kiln_bcast4(c < 4 ? ql + 4 * c : qh + 4 * (c - 4));
                    __m256i pr = _mm256_maddubs_epi16(p->aw[b][c], _mm256_sign_epi8(a4, p->w[b][c]));
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pr, ones));
                }
                s[t] = sum;
            } else {
                __m256i p0 = _mm256_maddubs_epi16(p->w[b][0], kiln_bcast4(ql));
                for (int c = 1; c < 4; c++)
                    p0 = _mm256_add_epi16(p0, _mm256_maddubs_epi16(p->w[b][c], kiln_bcast4(ql + 4 * c)));
                __m256i p1 = _mm256_maddubs_epi16(p->w[b][4], kiln_bcast4(qh));
                for (int c = 5; c < 8; c++)
                    p1 = _mm256_add_epi16(p1, _mm256_maddubs_epi16(p->w[b][c], kiln_bcast4(qh + 4 * (c - 4))));
                __m256i sum = q5 ? _mm256_add_epi32(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones))
                                 : _mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones);
                s[t] = _mm256_add_epi32(sum, _mm256_set1_epi32(act[t].off[lane]));
            }
        }
        for (int t = 0; t < nt; t++) {
            __m256d dx = _mm256_set1_pd(act[t].dx[lane]);
            acc[t][0] = _mm256_fmadd_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(s[t])),
                                        _mm256_mul_pd(p->dw[b][0], dx), acc[t][0]);
            acc[t][1] = _mm256_fmadd_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(s[t], 1)),
                                        _mm256_mul_pd(p->dw[b][1], dx), acc[t][1]);
            if (KILN_HAS_M(type)) {
                __m256 ms = _mm256_mul_ps(p->m[b], _mm256_set1_ps(act[t].sx[lane]));
                acc[t][0] = _mm256_add_pd(acc[t][0], _mm256_cvtps_pd(_mm256_castps256_ps128(ms)));
                acc[t][1] = _mm256_add_pd(acc[t][1], _mm256_cvtps_pd(_mm256_extractf128_ps(ms, 1)));
            }
        }
    }
}

/* Row groups [rg0, rg1) for every token of the batch, panel by panel. */
static inline __attribute__((always_inline)) void
kiln_qgemm_panels_typed(const kiln_qgemm_args *a, int64_t rg0, int64_t rg1, const int type) {
    const kiln_packed_view *w = &a->w;
    kiln_panel p;
    __m256d acc[KILN_PT][2];
    for (int64_t t0 = 0; t0 < a->n_tokens; t0 += KILN_PT) {
        const int ntb = a->n_tokens - t0 < KILN_PT ? (int)(a->n_tokens - t0) : KILN_PT;
        for (int64_t rg = rg0; rg < rg1; rg += 2) {
            const int two_rg = rg + 1 < rg1;
            for (int t = 0; t < ntb; t++) acc[t][0] = acc[t][1] = _mm256_setzero_pd();
            for (int64_t kb0 = 0; kb0 < w->nb; kb0 += KILN_PK) {
                const int nk = (int)(w->nb - kb0 < KILN_PK ? w->nb - kb0 : KILN_PK);
                kiln_panel_decode(&p, w, rg, two_rg, kb0, nk, type);
                int t = 0;
                for (; t + 2 <= ntb; t += 2) {
                    kiln_act act[2] = {kiln_act_at(a->act + (size_t)(t0 + t) * a->act_stride, &a->al),
                                       kiln_act_at(a->act + (size_t)(t0 + t + 1) * a->act_stride, &a->al)};
                    kiln_panel_tokens(&p, act, kb0, nk, &acc[t], 2, type);
                }
                if (t < ntb) {
                    kiln_act act[1] = {kiln_act_at(a->act + (size_t)(t0 + t) * a->act_stride, &a->al)};
                    kiln_panel_tokens(&p, act, kb0, nk, &acc[t], 1, type);
                }
            }
            for (int t = 0; t < ntb; t++) {
                float y8[KILN_PR];
                _mm_storeu_ps(y8, _mm256_cvtpd_ps(acc[t][0]));
                _mm_storeu_ps(y8 + 4, _mm256_cvtpd_ps(acc[t][1]));
                kiln_store_rows(a, rg, (int)(t0 + t), y8);
                if (two_rg) kiln_store_rows(a, rg + 1, (int)(t0 + t), y8 + 4);
            }
        }
    }
}

static void kiln_qgemm_panels(const kiln_qgemm_args *a, int64_t rg0, int64_t rg1) {
    switch (a->w.type) {
#define KILN_PANEL_CASE(T)                                                              \
    case T: kiln_qgemm_panels_typed(a, rg0, rg1, T); break;
    KILN_PANEL_CASE(KILN_TYPE_Q4_0)
    KILN_PANEL_CASE(KILN_TYPE_Q4_1)
    KILN_PANEL_CASE(KILN_TYPE_Q5_0)
    KILN_PANEL_CASE(KILN_TYPE_Q5_1)
    KILN_PANEL_CASE(KILN_TYPE_Q8_0)
    KILN_PANEL_CASE(KILN_TYPE_IQ4_NL)
#undef KILN_PANEL_CASE
    default: /* kiln_matrix_init packs no other type */
        abort();
    }
}
#define KILN_HAS_PANELS 1
#endif /* !__AVXVNNI__ */

#elif defined(__ARM_FEATURE_DOTPROD) && defined(__aarch64__)
#include <arm_neon.h>

/* 0x10 in byte j where bit j of the 16 bits at p is set: the fifth bits of one Q5_*
 * block's lo (or hi) half. */
static inline uint8x16_t kiln_q5_bytes(const uint8_t *p) {
    static const uint8_t spread[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
    static const uint8_t sel[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    uint8x16_t v = vqtbl1q_u8(vreinterpretq_u8_u16(vdupq_n_u16((uint16_t)kiln_q5_bits(p, 1))), vld1q_u8(spread));
    return vandq_u8(vtstq_u8(v, vld1q_u8(sel)), vdupq_n_u8(0x10));
}

/* One block per step: vdotq_s32 leaves 4 int32 lanes per 16 bytes; pairwise adds sum
 * them across the 4 rows into [row 0 .. row 3]. */
static inline __attribute__((always_inline)) void
kiln_qgemm_rg(const kiln_qgemm_args *a, int64_t rg, int t0, const int nt_tok, const int type) {
    const kiln_packed_view *w = &a->w;
    const int wide = KILN_WIDE(type), q5 = KILN_Q5(type), nl = KILN_NL(type);
    /* sdot is signed x signed: 8-bit weights are turned back to signed (Q8_0) or looked
     * up signed (IQ4_NL), with no offset term */
    const int signed_w = wide || nl;
    const size_t bb = KILN_BLOCK_BYTES(type);
    kiln_act act[KILN_NT];
    float64x2_t acc[KILN_NT][2]; /* rows 0, 1 and rows 2, 3 */
    for (int t = 0; t < nt_tok; t++) {
        act[t] = kiln_act_at(a->act + (size_t)(t0 + t) * a->act_stride, &a->al);
        acc[t][0] = acc[t][1] = vdupq_n_f64(0.0);
    }
    const uint8x16_t mask4 = vdupq_n_u8(0x0f);
    const uint8x16_t sign8 = vdupq_n_u8(0x80);
    const int8x16_t grid = vld1q_s8(kiln_kvalues_iq4nl);
    for (int64_t g = 0; g < w->ng; g++) {
        const int nb = (int)(w->nb - g * KILN_KG < KILN_KG ? w->nb - g * KILN_KG : KILN_KG);
        const uint8_t *qs = kiln_rg_qs(w, rg, g);
        for (int b = 0; b < nb; b++) {
            int8x16_t wl[KILN_RG], wh[KILN_RG];
            for (int r = 0; r < KILN_RG; r++) {
                const uint8_t *rq = qs + (size_t)r * nb * bb;
                if (wide) {
                    wl[r] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(rq + 16 * b), sign8));
                    wh[r] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(rq + nb * 16 + 16 * b), sign8));
                } else {
                    uint8x16_t v = vld1q_u8(rq + 16 * b);
                    uint8x16_t lo = vandq_u8(v, mask4), hi = vshrq_n_u8(v, 4);
                    if (q5) {
                        lo = vorrq_u8(lo, kiln_q5_bytes(rq + nb * 16 + 2 * b));
                        hi = vorrq_u8(hi, kiln_q5_bytes(rq + nb * 18 + 2 * b));
                    }
                    if (nl) {
                        wl[r] = vqtbl1q_s8(grid, lo);
                        wh[r] = vqtbl1q_s8(grid, hi);
                    } else {
                        wl[r] = vreinterpretq_s8_u8(lo);
                        wh[r] = vreinterpretq_s8_u8(hi);
                    }
                }
            }
            const size_t lane = (size_t)(g * KILN_KG + b) * 4;
            float32x4_t dw = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(kiln_rg_d(w, rg, g) + b * KILN_RG)));
            float64x2_t dw_lo = vcvt_f64_f32(vget_low_f32(dw)), dw_hi = vcvt_high_f64_f32(dw);
            for (int t = 0; t < nt_tok; t++) {
                const int8_t *aq = act[t].qs + g * KILN_KG * QK + 16 * b;
                int8x16_t al = vld1q_s8(aq), ah = vld1q_s8(aq + KILN_KG * 16);
                int32x4_t s[KILN_RG];
                for (int r = 0; r < KILN_RG; r++)
                    s[r] = vdotq_s32(vdotq_s32(vdupq_n_s32(0), wl[r], al), wh[r], ah);
                int32x4_t T = vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
                if (!signed_w) T = vaddq_s32(T, vld1q_s32(act[t].off + lane));
                acc[t][0] = vfmaq_f64(acc[t][0], vcvtq_f64_s64(vmovl_s32(vget_low_s32(T))),
                                      vmulq_f64(dw_lo, vld1q_f64(act[t].dx + lane)));
                acc[t][1] = vfmaq_f64(acc[t][1], vcvtq_f64_s64(vmovl_high_s32(T)),
                                      vmulq_f64(dw_hi, vld1q_f64(act[t].dx + lane + 2)));
                if (KILN_HAS_M(type)) {
                    float32x4_t m = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(kiln_rg_m(w, rg, g) + b * KILN_RG)));
                    float32x4_t ms = vmulq_f32(m, vld1q_f32(act[t].sx + lane));
                    acc[t][0] = vaddq_f64(acc[t][0], vcvt_f64_f32(vget_low_f32(ms)));
                    acc[t][1] = vaddq_f64(acc[t][1], vcvt_high_f64_f32(ms));
                }
            }
        }
    }
    for (int t = 0; t < nt_tok; t++) {
        float tmp[4];
        vst1q_f32(tmp, vcvt_high_f32_f64(vcvt_f32_f64(acc[t][0]), acc[t][1]));
        kiln_store_rows(a, rg, t0 + t, tmp);
    }
}

#else
/* Scalar reference over the same packed layout: blocks in order, summed in double;
 * every weight as the unsigned value the type table's act_offset is relative to. */
static void kiln_qgemm_rg(const kiln_qgemm_args *a, int64_t rg, int t0, const int nt_tok, const int type) {
    const kiln_packed_view *w = &a->w;
    const int wide = KILN_WIDE(type), q5 = KILN_Q5(type), nl = KILN_NL(type);
    const size_t bb = KILN_BLOCK_BYTES(type);
    for (int t = t0; t < t0 + nt_tok; t++) {
        kiln_act act = kiln_act_at(a->act + (size_t)t * a->act_stride, &a->al);
        for (int r = 0; r < KILN_RG; r++) {
            int64_t row = rg * KILN_RG + r;
            if (row >= w->rows) break;
            double sum = 0.0;
            for (int64_t g = 0; g < w->ng; g++) {
                const int nb = (int)(w->nb - g * KILN_KG < KILN_KG ? w->nb - g * KILN_KG : KILN_KG);
                const uint8_t *rq = kiln_rg_qs(w, rg, g) + (size_t)r * nb * bb;
                for (int b = 0; b < nb; b++) {
                    const int8_t *al = act.qs + g * KILN_KG * QK + 16 * b;
                    const int8_t *ah = al + KILN_KG * 16;
                    size_t lane = (size_t)(g * KILN_KG + b) * 4;
                    /* fifth bits of the lo and hi halves (Q5_*) */
                    uint64_t bl = q5 ? kiln_q5_bits(rq + nb * 16 + 2 * b, 1) : 0;
                    uint64_t bh = q5 ? kiln_q5_bits(rq + nb * 18 + 2 * b, 1) : 0;
                    int32_t isum = act.off[lane];
                    for (int j = 0; j < 16; j++) {
                        int lo, hi;
                        if (wide) {
                            lo = rq[16 * b + j];
                            hi = rq[nb * 16 + 16 * b + j];
                        } else {
                            lo = (rq[16 * b + j] & 15) | (int)((bl >> j) & 1) << 4;
                            hi = (rq[16 * b + j] >> 4) | (int)((bh >> j) & 1) << 4;
                        }
                        if (nl) {
                            lo = kiln_kvalues_iq4nl[lo] + 128;
                            hi = kiln_kvalues_iq4nl[hi] + 128;
                        }
                        isum += lo * al[j] + hi * ah[j];
                    }
                    double dd = kiln_fp16_to_fp32(kiln_rg_d(w, rg, g)[b * KILN_RG + r]) * act.dx[lane];
                    sum += (double)isum * dd;
                    if (KILN_HAS_M(type))
                        sum += (double)(kiln_fp16_to_fp32(kiln_rg_m(w, rg, g)[b * KILN_RG + r]) * act.sx[lane]);
                }
            }
            a->y[(size_t)t * w->rows + row] = (float)sum;
        }
    }
}
#endif

/* Row groups [rg0, rg1) for tokens [t0, t0 + nt_tok) with compile-time token count and
 * type, so every accumulator stays in a register and no type test is left in the loop. */
static inline __attribute__((always_inline)) void
kiln_qgemm_rows(const kiln_qgemm_args *a, int64_t rg0, int64_t rg1, int t0, const int nt_tok) {
    switch (a->w.type) {
#define KILN_QGEMM_CASE(T)                                                              \
    case T:                                                                             \
        for (int64_t rg = rg0; rg < rg1; rg++) kiln_qgemm_rg(a, rg, t0, nt_tok, T);     \
        break;
    KILN_QGEMM_CASE(KILN_TYPE_Q4_0)
    KILN_QGEMM_CASE(KILN_TYPE_Q4_1)
    KILN_QGEMM_CASE(KILN_TYPE_Q5_0)
    KILN_QGEMM_CASE(KILN_TYPE_Q5_1)
    KILN_QGEMM_CASE(KILN_TYPE_Q8_0)
    KILN_QGEMM_CASE(KILN_TYPE_IQ4_NL)
#undef KILN_QGEMM_CASE
    default: /* kiln_matrix_init packs no other type */
        abort();
    }
}

/* All tokens over row groups [rg0, rg1). */
static void kiln_qgemm_block(const kiln_qgemm_args *a, int64_t rg0, int64_t rg1) {
    int t = 0;
    for (; t + KILN_NT <= a->n_tokens; t += KILN_NT) kiln_qgemm_rows(a, rg0, rg1, t, KILN_NT);
#if KILN_NT > 4
    if (a->n_tokens - t >= 4) {
        kiln_qgemm_rows(a, rg0, rg1, t, 4);
        t += 4;
    }
#endif
    switch (a->n_tokens - t) {
    case 1: kiln_qgemm_rows(a, rg0, rg1, t, 1); break;
    case 2: kiln_qgemm_rows(a, rg0, rg1, t, 2); break;
    case 3: kiln_qgemm_rows(a, rg0, rg1, t, 3); break;
    default: break;
    }
}

void KILN_FN(kiln_qgemm)(const kiln_qgemm_args *a, int64_t rg0, int64_t rg1) {
#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
    if (a->n_tokens >= KILN_AMX_MIN_TOKENS && kiln_qgemm_tiles(a, rg0, rg1)) return;
#endif
#if defined(KILN_HAS_PANELS)
    if (a->n_tokens >= KILN_PANEL_MIN_TOKENS) {
        kiln_qgemm_panels(a, rg0, rg1);
        return;
    }
#endif
    /* a batch passes over the weights once per KILN_NT tokens: take them in blocks of
     * row groups small enough to stay in L2 meanwhile */
    int64_t step = a->n_tokens > KILN_NT ? (int64_t)((256u << 10) / a->w.rg_size) : rg1 - rg0;
    if (step < 1) step = 1;
    for (int64_t r0 = rg0; r0 < rg1; r0 += step) kiln_qgemm_block(a, r0, r0 + step < rg1 ? r0 + step : rg1);
}
