/* The block types the C code knows, with every per-type fact in one table (the way
 * ggml-cpu's type_traits_cpu[] does it): sizes, the activation format a weight type
 * pairs with, its packed layout and its codecs. Adding a type means one row here, its
 * codec in codecs.c, its packing and its kernel. A type id the table lacks is refused
 * wherever it comes in (kiln_matrix_init, the codec entry points). */
#ifndef KILN_TYPE_TRAITS_H
#define KILN_TYPE_TRAITS_H

#include <stdint.h>
#include "ggml_types.h"

typedef struct {
    const char *name;  /* ggml's name, e.g. "Q4_1" */
    int type;          /* ggml type id (enum kiln_ggml_type) */
    int block_size;    /* elements per block (1 for F32, F16, BF16) */
    int type_size;     /* bytes per block */
    /* as a weight of kiln_matmul (is_weight = 0: a codec only, e.g. an activation format) */
    int is_weight;
    int act_type;      /* what the activations are quantized to: Q8_0, Q8_1 or Q8_K, F32 for
                        * float weights (activations stay float), -1 when not a weight */
    /* the repacked layout (kernels_impl.h); packed_block_bytes = 0: not repacked, the
     * kernels read the GGUF rows */
    int packed_block_bytes; /* quant bytes per block per row */
    int n_scale_sets;       /* fp16 arrays per block group: d (1), d and m (2: Q4_1, Q5_1) */
    int act_offset;         /* zero point of the unsigned packed quants, folded into the
                             * activation side: sum((w - offset) * a) */
    /* one GGUF block -> the packed layout: block b of a block group of nt blocks, q
     * the row's quants of that group (nt * packed_block_bytes bytes, kernels_impl.h
     * says where each part goes), its scales at *d and *m */
    void (*pack_block)(const void *block, uint8_t *q, int b, int nt, kiln_fp16 *d, kiln_fp16 *m);
    /* its inverse: the GGUF block back from the packed quants and scales, byte for byte */
    void (*unpack_block)(const uint8_t *q, int b, int nt, kiln_fp16 d, kiln_fp16 m, void *block);
    /* the scalar reference codecs (codecs.c); n a multiple of block_size */
    void (*quantize_row)(const float *x, void *y, int64_t n);
    void (*dequantize_row)(const void *x, float *y, int64_t n);
} kiln_type_traits;

/* The row for a ggml type id, or NULL if the C code does not know it. */
const kiln_type_traits *kiln_type_traits_of(int type);
/* The rows in id order: index 0 .. n - 1, NULL past the end (for the binding). */
const kiln_type_traits *kiln_type_traits_at(int i);

#endif
