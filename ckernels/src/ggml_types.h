/* Block layouts and scalar conversions shared by every kernel.
 *
 * The structs are byte-for-byte ggml's: a GGUF tensor's data can be cast to an array
 * of them in place (weights are read straight from the memory map). */
#ifndef KILN_GGML_TYPES_H
#define KILN_GGML_TYPES_H

#include <stdint.h>
#include <string.h>

#define QK 32     /* elements per block of the 32-wide types (Q4_0 .. Q8_1, IQ4_NL) */
#define QK_K 256  /* elements per super-block of the K types and IQ4_XS */
#define K_SCALE_SIZE 12 /* bytes of packed 6-bit scales and mins (Q4_K, Q5_K) */

/* ggml type ids (GGUF tensor info "type") */
enum kiln_ggml_type {
    KILN_TYPE_F32 = 0,
    KILN_TYPE_F16 = 1,
    KILN_TYPE_Q4_0 = 2,
    KILN_TYPE_Q4_1 = 3,
    KILN_TYPE_Q5_0 = 6,
    KILN_TYPE_Q5_1 = 7,
    KILN_TYPE_Q8_0 = 8,
    KILN_TYPE_Q8_1 = 9,
    KILN_TYPE_Q2_K = 10,
    KILN_TYPE_Q3_K = 11,
    KILN_TYPE_Q4_K = 12,
    KILN_TYPE_Q5_K = 13,
    KILN_TYPE_Q6_K = 14,
    KILN_TYPE_Q8_K = 15,
    KILN_TYPE_IQ4_NL = 20,
    KILN_TYPE_IQ4_XS = 23,
    KILN_TYPE_BF16 = 30,
};

typedef uint16_t kiln_fp16;
typedef uint16_t kiln_bf16;

/* x = (q - 8) * d; element j in the low nibble of qs[j], element j+16 in the high */
typedef struct { kiln_fp16 d; uint8_t qs[QK / 2]; } block_q4_0;
/* x = q * d + m */
typedef struct { kiln_fp16 d; kiln_fp16 m; uint8_t qs[QK / 2]; } block_q4_1;
/* x = q * d */
typedef struct { kiln_fp16 d; int8_t qs[QK]; } block_q8_0;
/* x = q * d; s = d * sum(q), stored so Q4_1 dot products can add m * s per block */
typedef struct { kiln_fp16 d; kiln_fp16 s; int8_t qs[QK]; } block_q8_1;

/* x = (q - 16) * d; q's low 4 bits as in Q4_0, bit 4 of element j in bit j of qh */
typedef struct { kiln_fp16 d; uint8_t qh[4]; uint8_t qs[QK / 2]; } block_q5_0;
/* x = q * d + m; q as in Q5_0 */
typedef struct { kiln_fp16 d; kiln_fp16 m; uint8_t qh[4]; uint8_t qs[QK / 2]; } block_q5_1;
/* x = kvalues_iq4nl[q] * d; q as in Q4_0 (a 4-bit index into a non-uniform grid) */
typedef struct { kiln_fp16 d; uint8_t qs[QK / 2]; } block_iq4_nl;

/* The K types: super-blocks of QK_K elements in sub-blocks of 16 or 32, each with its
 * own small integer scale (and min) times the super-block's fp16 d (and dmin).
 * Layouts are ggml's (ggml-common.h); the codecs in codecs_k.c say where each bit is. */
/* 16 sub-blocks of 16: x = d * (scales & 15) * q - dmin * (scales >> 4), q 2 bits */
typedef struct { uint8_t scales[QK_K / 16]; uint8_t qs[QK_K / 4]; kiln_fp16 d; kiln_fp16 dmin; } block_q2_K;
/* 16 sub-blocks of 16: x = d * (s - 32) * (q - 4 * !hbit), q 2 low bits + hmask bit,
 * s 6 bits packed in scales[12] */
typedef struct { uint8_t hmask[QK_K / 8]; uint8_t qs[QK_K / 4]; uint8_t scales[12]; kiln_fp16 d; } block_q3_K;
/* 8 sub-blocks of 32: x = d * sc * q - dmin * m, q 4 bits, sc and m 6 bits in scales[12] */
typedef struct { kiln_fp16 d; kiln_fp16 dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qs[QK_K / 2]; } block_q4_K;
/* as Q4_K with a fifth bit of q in qh */
typedef struct { kiln_fp16 d; kiln_fp16 dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qh[QK_K / 8]; uint8_t qs[QK_K / 2]; } block_q5_K;
/* 16 sub-blocks of 16: x = d * scales[i] * (q - 32), q 4 low bits in ql, 2 high in qh */
typedef struct { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; kiln_fp16 d; } block_q6_K;
/* The K types' activation format: x = d * q (d float32), bsums[i] = sum of q over
 * elements 16i .. 16i + 15 (for the mins terms) */
typedef struct { float d; int8_t qs[QK_K]; int16_t bsums[QK_K / 16]; } block_q8_K;
/* 8 sub-blocks of 32: x = d * (ls - 32) * kvalues_iq4nl[q], ls 6 bits: 4 in scales_l,
 * 2 in scales_h */
typedef struct { kiln_fp16 d; uint16_t scales_h; uint8_t scales_l[QK_K / 64]; uint8_t qs[QK_K / 2]; } block_iq4_xs;

_Static_assert(sizeof(block_q5_0) == 22, "block_q5_0 must be 22 bytes");
_Static_assert(sizeof(block_q5_1) == 24, "block_q5_1 must be 24 bytes");
_Static_assert(sizeof(block_iq4_nl) == 18, "block_iq4_nl must be 18 bytes");
_Static_assert(sizeof(block_q2_K) == 84, "block_q2_K must be 84 bytes");
_Static_assert(sizeof(block_q3_K) == 110, "block_q3_K must be 110 bytes");
_Static_assert(sizeof(block_q4_K) == 144, "block_q4_K must be 144 bytes");
_Static_assert(sizeof(block_q5_K) == 176, "block_q5_K must be 176 bytes");
_Static_assert(sizeof(block_q6_K) == 210, "block_q6_K must be 210 bytes");
_Static_assert(sizeof(block_q8_K) == 292, "block_q8_K must be 292 bytes");
_Static_assert(sizeof(block_iq4_xs) == 136, "block_iq4_xs must be 136 bytes");
_Static_assert(sizeof(block_q4_0) == 18, "block_q4_0 must be 18 bytes");
_Static_assert(sizeof(block_q4_1) == 20, "block_q4_1 must be 20 bytes");
_Static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must be 34 bytes");
_Static_assert(sizeof(block_q8_1) == 36, "block_q8_1 must be 36 bytes");

static inline uint32_t kiln_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float kiln_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* IEEE half -> float, exact. */
static inline float kiln_fp16_to_fp32(kiln_fp16 h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    if (exp == 0x1f) return kiln_bits_f32(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        if (mant == 0) return kiln_bits_f32(sign);
        /* subnormal: mant * 2^-24 is exact in float */
        float f = (float)mant * 5.9604644775390625e-08f;
        return sign ? -f : f;
    }
    return kiln_bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

/* float -> IEEE half, round to nearest even (what NumPy's astype(float16), F16C's
 * vcvtps2ph and ggml all do), overflow to inf, NaN stays NaN. */
static inline kiln_fp16 kiln_fp32_to_fp16(float f) {
    uint32_t x = kiln_f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf or NaN */
        return (kiln_fp16)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 | ((ax >> 13) & 0x3ff) : 0));
    if (ax >= 0x477ff000u) /* rounds to >= 65520: overflow */
        return (kiln_fp16)(sign | 0x7c00);
    if (ax < 0x38800000u) { /* result is subnormal or zero */
        /* adding 0.5 makes the FPU do the round-to-nearest-even at 2^-24 granularity */
        float r = kiln_bits_f32(ax) + 0.5f;
        return (kiln_fp16)(sign | (kiln_f32_bits(r) - 0x3f000000u));
    }
    uint32_t mant_odd = (ax >> 13) & 1;
    ax += 0xc8000fffu + mant_odd; /* rebias exponent (-112 << 23) and round */
    return (kiln_fp16)(sign | (ax >> 13));
}

/* bfloat16 is the top half of a float32. */
static inline float kiln_bf16_to_fp32(kiln_bf16 h) { return kiln_bits_f32((uint32_t)h << 16); }

/* float -> bfloat16, round to nearest even; NaN quieted (ggml_compute_fp32_to_bf16). */
static inline kiln_bf16 kiln_fp32_to_bf16(float f) {
    uint32_t u = kiln_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (kiln_bf16)((u >> 16) | 64);
    return (kiln_bf16)((u + (0x7fff + ((u >> 16) & 1))) >> 16);
}

#endif
