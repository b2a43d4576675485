/* Block layouts and scalar conversions shared by every kernel.
 *
 * The structs are byte-for-byte ggml's: a GGUF tensor's data can be cast to an array
 * of them in place (weights are read straight from the memory map). */
#ifndef KILN_GGML_TYPES_H
#define KILN_GGML_TYPES_H

#include <stdint.h>
#include <string.h>

#define QK 32 /* elements per block, for every block format kiln uses */

/* ggml type ids (GGUF tensor info "type") */
enum kiln_ggml_type {
    KILN_TYPE_F32 = 0,
    KILN_TYPE_F16 = 1,
    KILN_TYPE_Q4_0 = 2,
    KILN_TYPE_Q4_1 = 3,
    KILN_TYPE_Q8_0 = 8,
    KILN_TYPE_Q8_1 = 9,
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
