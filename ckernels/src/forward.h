/* The forward pass of the Llama-like families: one call runs a batch of tokens through
 * every layer. The variations between families (engine/arch) are fields of the config
 * (rope_type, ffn_act, the scales, the sliding window) and optional weights (NULL when a
 * family lacks them), never another pass.
 *
 * Weights are read in place (GGUF blocks inside the caller's memory map, which must
 * outlive the model); the KV cache and activation buffers are allocated once, at
 * create time, for n_seq sequences of n_ctx positions and batches of up to n_batch
 * tokens. A sliding-window layer's cache holds only the last n_swa - 1 + n_batch
 * positions of each sequence (a ring, stored twice), when that takes at most n_ctx
 * positions' room: a sequence can
 * then be continued from position n_past only if the ring still holds the window before
 * it (engine/model.py's Model.can_resume). */
#ifndef KILN_FORWARD_H
#define KILN_FORWARD_H

#include <stddef.h>
#include <stdint.h>

/* RoPE pairing, numbered as ggml's rope modes */
enum kiln_rope_type {
    KILN_ROPE_NORM = 0, /* pairs (2i, 2i+1): Meta's interleaved order, as Llama GGUFs store Q/K */
    KILN_ROPE_NEOX = 2, /* pairs (i, i + rope_dim/2): rotate-half (Qwen, Gemma, Phi) */
};

/* The gated FFN's activation, as llama.cpp's llm_ffn_op_type names them */
enum kiln_ffn_act {
    KILN_FFN_SILU = 0, /* SwiGLU: silu(gate) * up */
    KILN_FFN_GELU = 1, /* GeGLU: gelu(gate) * up, GELU's tanh approximation (Gemma) */
};

typedef struct {
    int n_vocab, n_embd, n_layer;
    int n_head, n_head_kv, head_dim;  /* GQA: n_head % n_head_kv == 0 */
    int n_ff;
    int rope_dim;                     /* leading dims of each head that RoPE rotates */
    int rope_type;                    /* enum kiln_rope_type */
    float rope_attn_factor;           /* scales RoPE's cos and sin (ggml's attn_factor:
                                       * LongRoPE's rope.scaling.attn_factor); 0 means 1 */
    int n_ctx;                        /* KV cache positions of each sequence */
    int n_seq;                        /* sequences, each with its own KV cache (>= 1) */
    int n_batch;                      /* tokens per internal chunk of a prompt */
    float rms_eps;
    int ffn_act;                      /* enum kiln_ffn_act */
    float embd_scale;                 /* token embeddings are multiplied by it, in float
                                       * (Gemma's sqrtf(n_embd)); 0 means 1 */
    double attn_scale;                /* factor of the scores q.k; 0 means 1/sqrt(head_dim) */
    int n_swa;                        /* sliding window of the local layers: a query at p
                                       * attends to keys k with p - k < n_swa; 0: none */
    const uint8_t *swa_layers;        /* (n_layer): nonzero for a local layer; NULL: none */
} kiln_model_config;

typedef struct {
    int type;          /* enum kiln_ggml_type */
    const void *data;  /* GGUF row-major data, not owned */
} kiln_weight;

typedef struct {
    const float *attn_norm;  /* (n_embd) */
    kiln_weight attn_q;      /* (n_head * head_dim, n_embd) */
    kiln_weight attn_k;      /* (n_head_kv * head_dim, n_embd) */
    kiln_weight attn_v;      /* (n_head_kv * head_dim, n_embd) */
    const float *attn_q_bias, *attn_k_bias, *attn_v_bias; /* (n_head * head_dim),
                              * (n_head_kv * head_dim) x 2: added to Q, K, V; NULL: none */
    const float *attn_q_norm, *attn_k_norm; /* (head_dim): RMSNorm of each head of Q, K
                              * before RoPE; NULL: none */
    kiln_weight attn_output; /* (n_embd, n_head * head_dim) */
    const float *attn_post_norm; /* (n_embd): RMSNorm of the attention's output before
                              * the residual add; NULL: none */
    const float *ffn_norm;   /* (n_embd) */
    kiln_weight ffn_gate;    /* (n_ff, n_embd) */
    kiln_weight ffn_up;      /* (n_ff, n_embd) */
    kiln_weight ffn_down;    /* (n_embd, n_ff) */
    const float *ffn_post_norm; /* (n_embd): RMSNorm of the FFN's output before the
                              * residual add; NULL: none */
} kiln_layer_weights;

typedef struct {
    kiln_weight token_embd;            /* (n_vocab, n_embd) */
    const kiln_layer_weights *layers;  /* (n_layer) */
    const float *output_norm;          /* (n_embd) */
    kiln_weight output;                /* (n_vocab, n_embd); token_embd when tied */
    const double *rope_inv_freq;       /* (rope_dim / 2): angle per position of pair i */
    const double *rope_inv_freq_swa;   /* (rope_dim / 2): the same for the local layers;
                                        * NULL: rope_inv_freq */
} kiln_model_weights;

typedef struct kiln_model kiln_model;

/* NULL on failure (out of memory, a weight type the kernels lack). Copies what it
 * needs from cfg and w (not the weight data). */
kiln_model *kiln_model_create(const kiln_model_config *cfg, const kiln_model_weights *w,
                              int n_threads);
void kiln_model_free(kiln_model *m);
int kiln_model_n_threads(const kiln_model *m);

/* Positions of a layer's KV cache per sequence: n_ctx, or the ring of a sliding-window
 * layer (fewer than n_ctx); -1 for a bad layer. */
int kiln_model_cache_positions(const kiln_model *m, int layer);

/* Bytes allocated for the KV cache of all sequences and layers. */
size_t kiln_model_kv_cache_bytes(const kiln_model *m);

/* Runs tokens[0..n_tokens) of sequence 0 at positions n_past.., writing their keys and
 * values into its KV cache from n_past on. logits receives (n_tokens, n_vocab) floats when
 * logits_all, else (n_vocab) for the last token. Returns 0, or -1 when n_tokens < 1,
 * n_past < 0, n_past + n_tokens > n_ctx or a token id is outside the vocabulary
 * (nothing is computed then). */
int kiln_model_eval(kiln_model *m, const int32_t *tokens, int n_tokens, int n_past,
                    float *logits, int logits_all);

/* One batch of rows from up to n_seq sequences: row i is token tokens[i] of sequence
 * seq_ids[i] at position positions[i]; its key and value go into that sequence's cache at
 * that position, and it attends to that sequence's positions 0..positions[i] (the ones
 * earlier calls or earlier rows of this call wrote). The weights are read once for all
 * rows, and each row's result is what evaluating its sequence alone gives, bit for bit.
 * Rows with logits_rows[i] != 0 get logits, (n_vocab) floats each, in row order. Returns
 * 0, or -1 when n_tokens < 1, a sequence id is outside [0, n_seq), a position outside
 * [0, n_ctx), a token id outside the vocabulary, or two rows name the same (sequence,
 * position) or, with ring caches, the rows of one sequence within a chunk of n_batch rows
 * span n_batch positions or more (nothing is computed then). */
int kiln_model_eval_batch(kiln_model *m, const int32_t *tokens, const int32_t *seq_ids,
                          const int32_t *positions, int n_tokens, const uint8_t *logits_rows,
                          float *logits);

/* kiln_model_eval that also writes the residual stream into trace, (n_layer + 1,
 * n_tokens, n_embd) floats: the token embeddings, then the output of each layer.
 * For tests that check the engine layer by layer. */
int kiln_model_eval_trace(kiln_model *m, const int32_t *tokens, int n_tokens, int n_past,
                          float *logits, int logits_all, float *trace);

/* Keys and values of positions [0, n) of a layer of sequence 0, (n, n_head_kv * head_dim) floats
 * each (after RoPE, for keys; the fp16 cache widened), for tests; a ring holds the last of
 * its positions only (what it holds for an older one is a later position's). Returns 0,
 * or -1 for a bad layer / n. */
int kiln_model_get_kv(const kiln_model *m, int layer, int n, float *keys, float *values);

#endif
