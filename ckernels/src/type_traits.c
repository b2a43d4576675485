/* The table of block types (type_traits.h). */
#include <stddef.h>
#include <string.h>

#include "codecs.h"
#include "codecs_k.h"
#include "type_traits.h"

/* The codecs with untyped pointers, as the table holds them. */
#define KILN_CODECS(name, elem)                                                         \
    static void quantize_##name(const float *x, void *y, int64_t n) {                   \
        kiln_quantize_row_##name(x, (elem *)y, n);                                      \
    }                                                                                   \
    static void dequantize_##name(const void *x, float *y, int64_t n) {                 \
        kiln_dequantize_row_##name((const elem *)x, y, n);                              \
    }
KILN_CODECS(f16, kiln_fp16)
KILN_CODECS(bf16, kiln_bf16)
KILN_CODECS(q4_0, block_q4_0)
KILN_CODECS(q4_1, block_q4_1)
KILN_CODECS(q5_0, block_q5_0)
KILN_CODECS(q5_1, block_q5_1)
KILN_CODECS(q8_0, block_q8_0)
KILN_CODECS(q8_1, block_q8_1)
KILN_CODECS(q2_K, block_q2_K)
KILN_CODECS(q3_K, block_q3_K)
KILN_CODECS(q4_K, block_q4_K)
KILN_CODECS(q5_K, block_q5_K)
KILN_CODECS(q6_K, block_q6_K)
KILN_CODECS(q8_K, block_q8_K)
KILN_CODECS(iq4_nl, block_iq4_nl)
KILN_CODECS(iq4_xs, block_iq4_xs)

static void quantize_f32(const float *x, void *y, int64_t n) { memcpy(y, x, (size_t)n * sizeof(float)); }
static void dequantize_f32(const void *x, float *y, int64_t n) { memcpy(y, x, (size_t)n * sizeof(float)); }

/* Packing (kernels_impl.h): 4-bit quants keep GGUF's byte order, both halves in one
 * 16-byte run (IQ4_NL's indices too); 5-bit quants add their fifth bits as a bit plane
 * after the group's nibbles, the lo halves' 16 bits of each block, then the hi halves';
 * 8-bit quants are split into their two halves and offset to unsigned. */
static void pack_q4_0(const void *block, uint8_t *q, int b, int nt, kiln_fp16 *d, kiln_fp16 *m) {
    const block_q4_0 *x = block;
    (void)nt, (void)m;
    memcpy(q + 16 * b, x->qs, 16);
    *d = x->d;
}

static void pack_q4_1(const void *block, uint8_t *q, int b, int nt, kiln_fp16 *d, kiln_fp16 *m) {
    const block_q4_1 *x = block;
    (void)nt;
    memcpy(q + 16 * b, x->qs, 16);
    *d = x->d;
    *m = x->m;
}

/* qh is little-endian: its first two bytes hold the bits of elements 0..15 (the lo
 * half), the last two those of elements 16..31 */
static void pack_q5_bits(const uint8_t qh[4], const uint8_t qs[16], uint8_t *q, int b, int nt) {
    memcpy(q + 16 * b, qs, 16);
    memcpy(q + 16 * nt + 2 * b, qh, 2);
    memcpy(q + 18 * nt + 2 * b, qh + 2, 2);
}

static void pack_q5_0(const void *block, uint8_t *q, int b, int nt, kiln_fp16 *d, kiln_fp16 *m) {
    const block_q5_0 *x = block;
    (void)m;
    pack_q5_bits(x->qh, x->qs, q, b, nt);
    *d = x->d;
}

static void pack_q5_1(const void *block, uint8_t *q, int b, int nt, kiln_fp16 *d, kiln_fp16 *m) {
    const block_q5_1 *x = block;
    pack_q5_bits(x->qh, x->qs, q, b, nt);
    *d = x->d;
    *m = x->m;
}

static void pack_q8_0(const void *block, uint8_t *q, int b, int nt, kiln_fp16 *d, kiln_fp16 *m) {
    const block_q8_0 *x = block;
    (void)m;
    for (int j = 0; j < 16; j++) {
        q[16 * b + j] = (uint8_t)(x->qs[j] + 128);
        q[16 * nt + 16 * b + j] = (uint8_t)(x->qs[j + 16] + 128);
    }
    *d = x->d;
}

/* The inverses, for a row looked up in a packed copy (kiln_matrix_row). */
static void unpack_q4_0(const uint8_t *q, int b, int nt, kiln_fp16 d, kiln_fp16 m, void *block) {
    block_q4_0 *x = block;
    (void)nt, (void)m;
    memcpy(x->qs, q + 16 * b, 16);
    x->d = d;
}

static void unpack_q4_1(const uint8_t *q, int b, int nt, kiln_fp16 d, kiln_fp16 m, void *block) {
    block_q4_1 *x = block;
    (void)nt;
    memcpy(x->qs, q + 16 * b, 16);
    x->d = d;
    x->m = m;
}

static void unpack_q5_bits(const uint8_t *q, int b, int nt, uint8_t qh[4], uint8_t qs[16]) {
    memcpy(qs, q + 16 * b, 16);
    memcpy(qh, q + 16 * nt + 2 * b, 2);
    memcpy(qh + 2, q + 18 * nt + 2 * b, 2);
}

static void unpack_q5_0(const uint8_t *q, int b, int nt, kiln_fp16 d, kiln_fp16 m, void *block) {
    block_q5_0 *x = block;
    (void)m;
    unpack_q5_bits(q, b, nt, x->qh, x->qs);
    x->d = d;
}

static void unpack_q5_1(const uint8_t *q, int b, int nt, kiln_fp16 d, kiln_fp16 m, void *block) {
    block_q5_1 *x = block;
    unpack_q5_bits(q, b, nt, x->qh, x->qs);
    x->d = d;
    x->m = m;
}

static void unpack_q8_0(const uint8_t *q, int b, int nt, kiln_fp16 d, kiln_fp16 m, void *block) {
    block_q8_0 *x = block;
    (void)m;
    for (int j = 0; j < 16; j++) {
        x->qs[j] = (int8_t)(q[16 * b + j] - 128);
        x->qs[j + 16] = (int8_t)(q[16 * nt + 16 * b + j] - 128);
    }
    x->d = d;
}

/* F32, F16 and BF16 weights take float activations; Q8_1 is an activation format only. */
static const kiln_type_traits kiln_types[] = {
    {.name = "F32", .type = KILN_TYPE_F32, .block_size = 1, .type_size = 4,
     .is_weight = 1, .act_type = KILN_TYPE_F32,
     .quantize_row = quantize_f32, .dequantize_row = dequantize_f32},
    {.name = "F16", .type = KILN_TYPE_F16, .block_size = 1, .type_size = 2,
     .is_weight = 1, .act_type = KILN_TYPE_F32,
     .quantize_row = quantize_f16, .dequantize_row = dequantize_f16},
    {.name = "Q4_0", .type = KILN_TYPE_Q4_0, .block_size = QK, .type_size = sizeof(block_q4_0),
     .is_weight = 1, .act_type = KILN_TYPE_Q8_0,
     .packed_block_bytes = 16, .n_scale_sets = 1, .act_offset = 8,
     .pack_block = pack_q4_0, .unpack_block = unpack_q4_0,
     .quantize_row = quantize_q4_0, .dequantize_row = dequantize_q4_0},
    {.name = "Q4_1", .type = KILN_TYPE_Q4_1, .block_size = QK, .type_size = sizeof(block_q4_1),
     .is_weight = 1, .act_type = KILN_TYPE_Q8_1,
     .packed_block_bytes = 16, .n_scale_sets = 2, .act_offset = 0,
     .pack_block = pack_q4_1, .unpack_block = unpack_q4_1,
     .quantize_row = quantize_q4_1, .dequantize_row = dequantize_q4_1},
    {.name = "Q5_0", .type = KILN_TYPE_Q5_0, .block_size = QK, .type_size = sizeof(block_q5_0),
     .is_weight = 1, .act_type = KILN_TYPE_Q8_0,
     .packed_block_bytes = 20, .n_scale_sets = 1, .act_offset = 16,
     .pack_block = pack_q5_0, .unpack_block = unpack_q5_0,
     .quantize_row = quantize_q5_0, .dequantize_row = dequantize_q5_0},
    {.name = "Q5_1", .type = KILN_TYPE_Q5_1, .block_size = QK, .type_size = sizeof(block_q5_1),
     .is_weight = 1, .act_type = KILN_TYPE_Q8_1,
     .packed_block_bytes = 20, .n_scale_sets = 2, .act_offset = 0,
     .pack_block = pack_q5_1, .unpack_block = unpack_q5_1,
     .quantize_row = quantize_q5_1, .dequantize_row = dequantize_q5_1},
    {.name = "Q8_0", .type = KILN_TYPE_Q8_0, .block_size = QK, .type_size = sizeof(block_q8_0),
     .is_weight = 1, .act_type = KILN_TYPE_Q8_0,
     .packed_block_bytes = 32, .n_scale_sets = 1, .act_offset = 128,
     .pack_block = pack_q8_0, .unpack_block = unpack_q8_0,
     .quantize_row = quantize_q8_0, .dequantize_row = dequantize_q8_0},
    {.name = "Q8_1", .type = KILN_TYPE_Q8_1, .block_size = QK, .type_size = sizeof(block_q8_1),
     .is_weight = 0, .act_type = -1,
     .quantize_row = quantize_q8_1, .dequantize_row = dequantize_q8_1},
    /* the super-block types: weights read in GGUF layout (not repacked) by isa/kgemm.c,
     * with Q8_K activations (Q8_K: an activation format only) */
    {.name = "Q2_K", .type = KILN_TYPE_Q2_K, .block_size = QK_K, .type_size = sizeof(block_q2_K),
     .is_weight = 1, .act_type = KILN_TYPE_Q8_K,
     .quantize_row = quantize_q2_K, .dequantize_row = dequantize_q2_K},
    {.name = "Q3_K", .type = KILN_TYPE_Q3_K, .block_size = QK_K, .type_size = sizeof(block_q3_K),
     .is_weight = 1, .act_type = KILN_TYPE_Q8_K,
     .quantize_row = quantize_q3_K, .dequantize_row = dequantize_q3_K},
    {.name = "Q4_K", .type = KILN_TYPE_Q4_K, .block_size = QK_K, .type_size = sizeof(block_q4_K),
     .is_weight = 1, .act_type = KILN_TYPE_Q8_K,
     .quantize_row = quantize_q4_K, .dequantize_row = dequantize_q4_K},
    {.name = "Q5_K", .type = KILN_TYPE_Q5_K, .block_size = QK_K, .type_size = sizeof(block_q5_K),
     .is_weight = 1, .act_type = KILN_TYPE_Q8_K,
     .quantize_row = quantize_q5_K, .dequantize_row = dequantize_q5_K},
    {.name = "Q6_K", .type = KILN_TYPE_Q6_K, .block_size = QK_K, .type_size = sizeof(block_q6_K),
     .is_weight = 1, .act_type = KILN_TYPE_Q8_K,
     .quantize_row = quantize_q6_K, .dequantize_row = dequantize_q6_K},
    {.name = "Q8_K", .type = KILN_TYPE_Q8_K, .block_size = QK_K, .type_size = sizeof(block_q8_K),
     .is_weight = 0, .act_type = -1,
     .quantize_row = quantize_q8_K, .dequantize_row = dequantize_q8_K},
    /* the kernels look the indices up as kvalues_iq4nl + 128 (unsigned, as Q8_0's) */
    {.name = "IQ4_NL", .type = KILN_TYPE_IQ4_NL, .block_size = QK, .type_size = sizeof(block_iq4_nl),
     .is_weight = 1, .act_type = KILN_TYPE_Q8_0,
     .packed_block_bytes = 16, .n_scale_sets = 1, .act_offset = 128,
     .pack_block = pack_q4_0, .unpack_block = unpack_q4_0,
     .quantize_row = quantize_iq4_nl, .dequantize_row = dequantize_iq4_nl},
    /* IQ4_XS: a super-block type for the kernels (isa/kgemm.c), Q8_K activations */
    {.name = "IQ4_XS", .type = KILN_TYPE_IQ4_XS, .block_size = QK_K, .type_size = sizeof(block_iq4_xs),
     .is_weight = 1, .act_type = KILN_TYPE_Q8_K,
     .quantize_row = quantize_iq4_xs, .dequantize_row = dequantize_iq4_xs},
    {.name = "BF16", .type = KILN_TYPE_BF16, .block_size = 1, .type_size = 2,
     .is_weight = 1, .act_type = KILN_TYPE_F32,
     .quantize_row = quantize_bf16, .dequantize_row = dequantize_bf16},
};
#define KILN_N_TYPES ((int)(sizeof kiln_types / sizeof kiln_types[0]))

const kiln_type_traits *kiln_type_traits_of(int type) {
    for (int i = 0; i < KILN_N_TYPES; i++)
        if (kiln_types[i].type == type) return &kiln_types[i];
    return NULL;
}

const kiln_type_traits *kiln_type_traits_at(int i) {
    return i >= 0 && i < KILN_N_TYPES ? &kiln_types[i] : NULL;
}
