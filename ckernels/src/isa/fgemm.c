/* Unquantized weights (F32, F16, BF16 rows in GGUF layout) times float32
 * activations, for files stored without quantization. Rows [r0, r1), every token;
 * up to KILN_FNT tokens share each weight load. */
#include <stdlib.h>

#include "isa.h"
#include "kernels_impl.h"

#define KILN_FNT 4

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

/* Every output element is one 16-lane accumulator summed over the columns in order
 * (the tail masked to zero), then reduced with _mm512_reduce_add_ps, whatever the
 * tile shape: results do not depend on the split over threads or tokens. */
static inline __attribute__((always_inline)) __m512
kiln_load_w16(const int type, const void *w, int64_t c, __mmask16 m) {
    if (type == KILN_TYPE_F32) return _mm512_maskz_loadu_ps(m, (const float *)w + c);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)w + c);
    if (type == KILN_TYPE_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

#define KILN_FTILE_MAX 16 /* accumulators of the largest tile (4 rows x 4 tokens) */

/* One step of 16 columns for an nr x nt tile: nr weight loads shared by nt tokens,
 * nt activation loads shared by nr rows. */
static inline __attribute__((always_inline)) void
kiln_fstep(__m512 *acc, const uint8_t *w, size_t rb, const float *x, int64_t xs, int64_t c,
           __mmask16 m, const int nr, const int nt, const int type) {
    __m512 wv[8];
    for (int i = 0; i < nr; i++) wv[i] = kiln_load_w16(type, w + (size_t)i * rb, c, m);
    for (int t = 0; t < nt; t++) {
        __m512 xv = _mm512_maskz_loadu_ps(m, x + (size_t)t * xs + c);
        for (int i = 0; i < nr; i++) acc[i * nt + t] = _mm512_fmadd_ps(wv[i], xv, acc[i * nt + t]);
    }
}

/* Rows [r, r + nr) x tokens [t0, t0 + nt). pf: bytes of the next weight tile to pull
 * into cache during this one (0: none), spread evenly over the column steps. */
static inline __attribute__((always_inline)) void
kiln_ftile(const kiln_fgemm_args *a, int64_t r, int t0, const int nr, const int nt, const int type,
           const int pf) {
    const size_t es = type == KILN_TYPE_F32 ? 4 : 2, rb = (size_t)a->cols * es;
    const uint8_t *w = (const uint8_t *)a->w + (size_t)r * rb;
    const float *x = a->x + (size_t)t0 * a->cols;
    __m512 acc[KILN_FTILE_MAX]; /* exactly the largest tile: a bigger array stays in memory */
    for (int i = 0; i < nr * nt; i++) acc[i] = _mm512_setzero_ps();
    const uint8_t *next = w + nr * rb;
    const size_t lines = (size_t)nr * 16 * es / 64; /* per step: the next tile's share */
    int64_t c = 0;
    for (; c + 16 <= a->cols; c += 16) {
        if (pf)
            for (size_t l = 0; l < lines; l++)
                _mm_prefetch((const char *)next + (size_t)c * nr * es + 64 * l, _MM_HINT_T0);
        kiln_fstep(acc, w, rb, x, a->cols, c, (__mmask16)0xffff, nr, nt, type);
    }
    if (c < a->cols)
        kiln_fstep(acc, w, rb, x, a->cols, c, (__mmask16)((1u << (a->cols - c)) - 1), nr, nt, type);
    for (int i = 0; i < nr; i++)
        for (int t = 0; t < nt; t++) a->y[(size_t)(t0 + t) * a->rows + r + i] = _mm512_reduce_add_ps(acc[i * nt + t]);
}

#define KILN_FGEMM_TILED
#define KILN_FGEMM_NR 4 /* rows x tokens per tile for batches: 16 accumulators */
#define KILN_FGEMM_NT 4

/* The token count as a compile-time constant, so a tile's accumulators stay in registers. */
static inline __attribute__((always_inline)) void
kiln_ftile_nt(const kiln_fgemm_args *a, int64_t r, int t, const int nr, int nt, const int type) {
    switch (nt) {
    case 1: kiln_ftile(a, r, t, nr, 1, type, 0); break;
    case 2: kiln_ftile(a, r, t, nr, 2, type, 0); break;
    case 3: kiln_ftile(a, r, t, nr, 3, type, 0); break;
    default: kiln_ftile(a, r, t, nr, 4, type, 0); break;
    }
}

#elif defined(__AVX2__)
#include <immintrin.h>

/* Every output element: one 8-lane accumulator over the full 8-column steps in order,
 * reduced, then the tail columns added one by one, whatever the tile shape. */
static inline __attribute__((always_inline)) __m256 kiln_load_w8(const int type, const uint8_t *w, int64_t c) {
    if (type == KILN_TYPE_F32) return _mm256_loadu_ps((const float *)w + c);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + c));
    if (type == KILN_TYPE_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline __attribute__((always_inline)) void
kiln_ftile(const kiln_fgemm_args *a, int64_t r, int t0, const int nr, const int nt, const int type,
           const int pf) {
    const size_t es = type == KILN_TYPE_F32 ? 4 : 2, rb = (size_t)a->cols * es;
    const uint8_t *w = (const uint8_t *)a->w + (size_t)r * rb;
    const float *x = a->x + (size_t)t0 * a->cols;
    __m256 acc[8 * 2];
    for (int i = 0; i < nr * nt; i++) acc[i] = _mm256_setzero_ps();
    const uint8_t *next = w + nr * rb;
    const size_t lines = (size_t)nr * 8 * es / 64 ? (size_t)nr * 8 * es / 64 : 1;
    int64_t c = 0;
    for (; c + 8 <= a->cols; c += 8) {
        if (pf)
            for (size_t l = 0; l < lines; l++)
                _mm_prefetch((const char *)next + (size_t)c * nr * es + 64 * l, _MM_HINT_T0);
        __m256 wv[8];
        for (int i = 0; i < nr; i++) wv[i] = kiln_load_w8(type, w + (size_t)i * rb, c);
        for (int t = 0; t < nt; t++) {
            __m256 xv = _mm256_loadu_ps(x + (size_t)t * a->cols + c);
            for (int i = 0; i < nr; i++) acc[i * nt + t] = _mm256_fmadd_ps(wv[i], xv, acc[i * nt + t]);
        }
    }
    for (int i = 0; i < nr; i++)
        for (int t = 0; t < nt; t++) {
            __m256 v = acc[i * nt + t];
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            s = _mm_add_ss(s, _mm_movehdup_ps(s));
            float sum = _mm_cvtss_f32(s);
            const float *xt = x + (size_t)t * a->cols;
            for (int64_t k = c; k < a->cols; k++) sum += kiln_weight_f32(type, w + (size_t)i * rb, k) * xt[k];
            a->y[(size_t)(t0 + t) * a->rows + r + i] = sum;
        }
}

#define KILN_FGEMM_TILED
#define KILN_FGEMM_NR 4 /* rows x tokens per tile for batches (16 ymm registers) */
#define KILN_FGEMM_NT 2

/* The token count as a compile-time constant, so a tile's accumulators stay in registers. */
static inline __attribute__((always_inline)) void
kiln_ftile_nt(const kiln_fgemm_args *a, int64_t r, int t, const int nr, int nt, const int type) {
    if (nt == 1) kiln_ftile(a, r, t, nr, 1, type, 0);
    else kiln_ftile(a, r, t, nr, 2, type, 0);
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

#if !(defined(__AVX512F__) && defined(__AVX512BW__)) && !defined(__AVX2__)
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
#endif

#ifdef KILN_FGEMM_TILED
/* The blocked driver shared by the SIMD variants (their tiles differ in size). */
#define KILN_FGEMV_NR 8 /* rows per pass, one token: 8 independent FMA chains */
#define KILN_FGEMM_BLOCK 262144 /* bytes of weight rows kept in L2 across all tokens */

static inline __attribute__((always_inline)) void
kiln_fgemm_t(const kiln_fgemm_args *a, int64_t r0, int64_t r1, const int type) {
    if (a->n_tokens == 1) {
        int64_t r = r0;
        for (; r + KILN_FGEMV_NR <= r1; r += KILN_FGEMV_NR) kiln_ftile(a, r, 0, KILN_FGEMV_NR, 1, type, 1);
        for (; r + 4 <= r1; r += 4) kiln_ftile(a, r, 0, 4, 1, type, 0);
        for (; r < r1; r++) kiln_ftile(a, r, 0, 1, 1, type, 0);
        return;
    }
    const size_t es = type == KILN_TYPE_F32 ? 4 : 2;
    int64_t blk = (int64_t)(KILN_FGEMM_BLOCK / ((size_t)a->cols * es)) & ~(int64_t)(KILN_FGEMM_NR - 1);
    if (blk < KILN_FGEMM_NR) blk = KILN_FGEMM_NR;
    for (int64_t b0 = r0; b0 < r1; b0 += blk) {
        int64_t b1 = b0 + blk < r1 ? b0 + blk : r1;
        for (int t = 0; t < a->n_tokens; t += KILN_FGEMM_NT) {
            int nt = a->n_tokens - t < KILN_FGEMM_NT ? a->n_tokens - t : KILN_FGEMM_NT;
            int64_t r = b0;
            for (; r + KILN_FGEMM_NR <= b1; r += KILN_FGEMM_NR) kiln_ftile_nt(a, r, t, KILN_FGEMM_NR, nt, type);
            for (; r < b1; r++) kiln_ftile_nt(a, r, t, 1, nt, type);
        }
    }
}

void KILN_FN(kiln_fgemm)(const kiln_fgemm_args *a, int64_t r0, int64_t r1) {
    switch (a->type) {
    case KILN_TYPE_F32: kiln_fgemm_t(a, r0, r1, KILN_TYPE_F32); break;
    case KILN_TYPE_F16: kiln_fgemm_t(a, r0, r1, KILN_TYPE_F16); break;
    case KILN_TYPE_BF16: kiln_fgemm_t(a, r0, r1, KILN_TYPE_BF16); break;
    default: abort(); /* kiln_matrix_init takes no other float type */
    }
}
#endif
