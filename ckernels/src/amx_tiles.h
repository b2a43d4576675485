/* AMX tile helpers shared by the amx variant's kernels (isa/qgemm.c, isa/kgemm.c):
 * the tile registers and their shapes, one tile product, and the 4-byte transpose that
 * lays bytes out in the tiles' order. Only for sources compiled with -mamx-tile -mamx-int8. */
#ifndef KILN_AMX_TILES_H
#define KILN_AMX_TILES_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* Tokens per token tile: a C row holds 16 int32, one per token. Batches smaller than
 * KILN_AMX_MIN_TOKENS take the row kernels. */
#define KILN_AMX_TOKENS 16
#define KILN_AMX_MIN_TOKENS 16

/* Tile registers (literals: the tile intrinsics paste them into register names), two
 * sets so that two products are in flight: W, 8 rows x k bytes of weights; X, k / 4
 * rows of 16 tokens x 4 bytes of activations; C, 8 rows x 16 tokens of int32. */
#define KILN_TW0 0
#define KILN_TX0 1
#define KILN_TC0 2
#define KILN_TW1 3
#define KILN_TX1 4
#define KILN_TC1 5

/* C = W x X over the tile set's registers (signed_w: tdpbssd, else tdpbusd: unsigned
 * weights), loaded from w (rows w_stride apart) and x, stored to out (64 bytes a row). */
#define KILN_AMX_TILE_PRODUCT(W, X, C, w, w_stride, x, signed_w, out)                          \
    do {                                                                                       \
        _tile_zero(C);                                                                         \
        _tile_loadd(W, w, w_stride);                                                           \
        _tile_loadd(X, x, 64);                                                                 \
        if (signed_w) _tile_dpbssd(C, W, X);                                                   \
        else _tile_dpbusd(C, W, X);                                                            \
        _tile_stored(C, out, 64);                                                              \
    } while (0)
/* The same on set 1 if odd, else set 0: consecutive products alternate sets, so two are
 * in flight. */
#define KILN_AMX_PRODUCT(odd, w, w_stride, x, signed_w, out)                                   \
    do {                                                                                       \
        if (odd) KILN_AMX_TILE_PRODUCT(KILN_TW1, KILN_TX1, KILN_TC1, w, w_stride, x, signed_w, out); \
        else KILN_AMX_TILE_PRODUCT(KILN_TW0, KILN_TX0, KILN_TC0, w, w_stride, x, signed_w, out); \
    } while (0)

/* The shapes (palette 1) for products over k bytes (16 or 32). */
static inline void kiln_amx_config(int k) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } __attribute__((aligned(64))) c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    c.rows[KILN_TW0] = c.rows[KILN_TW1] = 8, c.colsb[KILN_TW0] = c.colsb[KILN_TW1] = (uint16_t)k;
    c.rows[KILN_TX0] = c.rows[KILN_TX1] = (uint8_t)(k / 4), c.colsb[KILN_TX0] = c.colsb[KILN_TX1] = 64;
    c.rows[KILN_TC0] = c.rows[KILN_TC1] = 8, c.colsb[KILN_TC0] = c.colsb[KILN_TC1] = 64;
    _tile_loadconfig(&c);
}

/* 16 sources of 16 bytes (4 chunks of 4) -> 4 rows of 64 bytes at dst: row k holds
 * chunk k of every source, source i at bytes 4i..4i+3 (a tile's 16 columns). */
static inline void kiln_amx_xpose(uint8_t *dst, const uint8_t *const src[16]) {
    const __m512i chunks = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int q = 0; q < 4; q++) {
        __m512i z = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)src[4 * q]));
        z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)src[4 * q + 1]), 1);
        z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)src[4 * q + 2]), 2);
        z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)src[4 * q + 3]), 3);
        z = _mm512_permutexvar_epi32(chunks, z); /* lane k: chunk k of sources 4q..4q+3 */
        _mm_storeu_si128((__m128i *)(dst + 16 * q), _mm512_castsi512_si128(z));
        _mm_storeu_si128((__m128i *)(dst + 64 + 16 * q), _mm512_extracti32x4_epi32(z, 1));
        _mm_storeu_si128((__m128i *)(dst + 128 + 16 * q), _mm512_extracti32x4_epi32(z, 2));
        _mm_storeu_si128((__m128i *)(dst + 192 + 16 * q), _mm512_extracti32x4_epi32(z, 3));
    }
}

#endif
