/* The forward pass of tiny random-weight Llama models (forward.c), per variant: the
 * logits of every token, from a batched prompt and token by token, with 1 and 2
 * threads, long enough a context (> 256 keys) that generation with 2 threads takes the
 * split-attention path. For quantized weights they must be scalar's bits; for float
 * weights within float rounding (fgemm sums in each variant's own order). Run in every
 * build, this also puts forward.c, the attention code and the pool under ASan+UBSan,
 * and the NEON variant end to end under qemu. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codecs.h"
#include "forward.h"
#include "harness.h"
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}

#define MAX_LAYERS 2

/* A model's shape and weight types; types[] is dealt round-robin over its matrices
 * (so each layer's Q/K/V and gate/up mix types, as kiln_matmul_multi allows). */
typedef struct {
    const char *name;
    kiln_model_config c;
    int embd_type;
    int types[3];
    int quantized; /* every matrix repacked: logits bit for bit */
    int qkv_extras; /* Q/K/V biases and per-head Q/K norms (the qwen2 / qwen3 variations) */
} model_spec;

typedef struct {
    kiln_model_weights w;
    kiln_layer_weights layers[MAX_LAYERS];
    void *bufs[64]; /* everything allocated, to free */
    int n_bufs;
} tiny_model;

static void *keep(tiny_model *m, void *p) {
    m->bufs[m->n_bufs++] = p;
    return p;
}

/* A (rows, cols) matrix of random floats about gain / sqrt(cols), written in `type`
 * with the type table's codec. */
static kiln_weight random_matrix(tiny_model *m, int type, int rows, int cols, float gain) {
    float *x = malloc(sizeof(float) * (size_t)rows * cols);
    rnd_floats(x, (size_t)rows * cols, gain * 1.7f / sqrtf((float)cols));
    void *data = keep(m, malloc((size_t)kiln_row_size(type, cols) * rows));
    kiln_type_traits_of(type)->quantize_row(x, data, (int64_t)rows * cols);
    free(x);
    kiln_weight w = {type, data};
    return w;
}

/* Biases of about +-0.5. */
static const float *random_bias(tiny_model *m, int n) {
    float *b = keep(m, malloc(sizeof(float) * n));
    rnd_floats(b, n, 0.5f);
    return b;
}

/* RMSNorm weights near 1. */
static const float *random_norm(tiny_model *m, int n) {
    float *w = keep(m, malloc(sizeof(float) * n));
    for (int i = 0; i < n; i++) w[i] = 1.0f + 0.2f * rnd_unit();
    return w;
}

static void build_model(tiny_model *m, const model_spec *s) {
    const kiln_model_config *c = &s->c;
    int q_dim = c->n_head * c->head_dim, kv_dim = c->n_head_kv * c->head_dim, k = 0;
    memset(m, 0, sizeof *m);
#define NEXT_TYPE s->types[k++ % 3]
    m->w.token_embd = random_matrix(m, s->embd_type, c->n_vocab, c->n_embd, 3.0f);
    for (int l = 0; l < c->n_layer; l++) {
        kiln_layer_weights *L = &m->layers[l];
        L->attn_norm = random_norm(m, c->n_embd);
        L->attn_q = random_matrix(m, NEXT_TYPE, q_dim, c->n_embd, 3.0f); /* peaked enough softmaxes */
        L->attn_k = random_matrix(m, NEXT_TYPE, kv_dim, c->n_embd, 3.0f);
        L->attn_v = random_matrix(m, NEXT_TYPE, kv_dim, c->n_embd, 1.0f);
        L->attn_output = random_matrix(m, NEXT_TYPE, c->n_embd, q_dim, 1.0f);
        if (s->qkv_extras) {
            L->attn_q_bias = random_bias(m, q_dim);
            L->attn_k_bias = random_bias(m, kv_dim);
            L->attn_v_bias = random_bias(m, kv_dim);
            L->attn_q_norm = random_norm(m, c->head_dim);
            L->attn_k_norm = random_norm(m, c->head_dim);
        }
        L->ffn_norm = random_norm(m, c->n_embd);
        L->ffn_gate = random_matrix(m, NEXT_TYPE, c->n_ff, c->n_embd, 2.0f);
        L->ffn_up = random_matrix(m, NEXT_TYPE, c->n_ff, c->n_embd, 1.0f);
        L->ffn_down = random_matrix(m, NEXT_TYPE, c->n_embd, c->n_ff, 1.0f);
    }
    m->w.layers = m->layers;
    m->w.output_norm = random_norm(m, c->n_embd);
    m->w.output = random_matrix(m, NEXT_TYPE, c->n_vocab, c->n_embd, 1.0f);
#undef NEXT_TYPE
    double *inv_freq = keep(m, malloc(sizeof(double) * (c->rope_dim / 2 + 1)));
    for (int i = 0; i < c->rope_dim / 2; i++) inv_freq[i] = pow(10000.0, -2.0 * i / c->rope_dim);
    m->w.rope_inv_freq = inv_freq;
}

static void free_model(tiny_model *m) {
    for (int i = 0; i < m->n_bufs; i++) free(m->bufs[i]);
}

/* How a run feeds the tokens: the whole prompt in one call (the model chunks it by
 * n_batch), or one call per token, after a batched prompt of `prompt` tokens. */
typedef struct {
    const char *name;
    int n_threads, batched, prompt;
} run_config;

/* One by one with 2 threads goes past 256 keys (the split-attention path) after a
 * prompt that stops short of them, so the slow part (a pool wake-up per step) stays
 * short. */
#define N_CONFIGS 4
static const run_config configs[N_CONFIGS] = {
    {"batched, 1 thread", 1, 1, 0},
    {"batched, 2 threads", 2, 1, 0},
    {"one by one, 1 thread", 1, 0, 0},
    {"prompt of 240, then one by one, 2 threads", 2, 0, 240},
};

/* Logits (n_tokens, n_vocab) of every token under the active variant; NULL if the
 * model cannot be made or an eval fails. */
static float *run_model(const tiny_model *tm, const model_spec *s, const int32_t *tokens,
                        int n_tokens, const run_config *rc) {
    kiln_model *m = kiln_model_create(&s->c, &tm->w, rc->n_threads);
    if (!m) return NULL;
    int n_vocab = s->c.n_vocab, err = 0, t = 0;
    float *logits = malloc(sizeof(float) * (size_t)n_tokens * n_vocab);
    int prompt = rc->batched ? n_tokens : rc->prompt < n_tokens ? rc->prompt : 0;
    if (prompt) err = kiln_model_eval(m, tokens, prompt, 0, logits, 1);
    for (t = prompt; t < n_tokens && !err; t++)
        err = kiln_model_eval(m, tokens + t, 1, t, logits + (size_t)t * n_vocab, 0);
    kiln_model_free(m);
    if (err) free(logits);
    return err ? NULL : logits;
}

/* Float weights: within 2e-3 of the largest |logit|. fgemm's sums differ in their
 * last bits between variants, and the fp16 KV cache turns some of those into a
 * different rounding of a key or value, a step of 2^-11 relative, which carries
 * through to the logits (measured: 4e-4 on the float model below). */
static void check_close(const char *what, const char *isa, const float *got, const float *want,
                        size_t n, const char *where) {
    double max = 0;
    for (size_t i = 0; i < n; i++) max = fmax(max, fabs(want[i]));
    n_checked++;
    for (size_t i = 0; i < n; i++)
        if (!(fabs((double)got[i] - want[i]) <= 2e-3 * max)) {
            fail(what, isa, "%s: logit %zu = %.9g, scalar %.9g (largest %.3g)", where, i, got[i],
                 want[i], max);
            return;
        }
}

/* Every variant under every config against scalar under the same config; and each
 * variant's configs against its own first one: forward.c computes every output the
 * same way whatever the batching and thread count, so those agree bit for bit. */
static void check_model(const char *const *isas, int n_isas, const model_spec *s, int n_tokens) {
    tiny_model tm;
    build_model(&tm, s);
    int32_t *tokens = malloc(sizeof(int32_t) * n_tokens);
    for (int t = 0; t < n_tokens; t++) tokens[t] = rnd_int(0, s->c.n_vocab - 1);
    size_t n = (size_t)n_tokens * s->c.n_vocab;
    float *first[8] = {NULL}; /* per variant, its logits under configs[0] */
    for (int k = 0; k < N_CONFIGS; k++) {
        char where[160];
        snprintf(where, sizeof where, "%s, %d tokens, %s", s->name, n_tokens, configs[k].name);
        float *want = NULL;
        for (int v = 0; v < n_isas && v < 8; v++) {
            use_isa(isas[v]);
            float *got = run_model(&tm, s, tokens, n_tokens, &configs[k]);
            CHECK(got, "forward", isas[v], "%s: kiln_model_create or kiln_model_eval failed", where);
            if (!got) continue;
            if (v == 0) want = got;
            else if (want && s->quantized) check_bits("forward logits", isas[v], got, want, n, 4, where);
            else if (want) check_close("forward logits", isas[v], got, want, n, where);
            if (first[v]) check_bits("forward logits vs batched, 1 thread", isas[v], got, first[v], n, 4, where);
            else first[v] = got;
            if (got != first[v] && got != want) free(got);
        }
        if (want != first[0]) free(want);
    }
    for (int v = 0; v < 8; v++) free(first[v]);
    free(tokens);
    free_model(&tm);
}

/* Shapes with tails everywhere: head_dim 36 and 48 (past the 8-dimension steps of
 * the AVX2 values kernel), rope over part of the head, GQA groups of 4 and 3 (4 or 3
 * query rows per attention pass in generation), n_ff and n_vocab not multiples of
 * KILN_RG or KILN_KG blocks, n_batch 7 (prompt chunks of 7 and a tail), n_ctx not a
 * multiple of KILN_ATT_BLOCK. */
static const model_spec models[] = {
    {"Q4_0/Q4_1/Q8_0 head_dim 36",
     {.n_vocab = 67, .n_embd = 64, .n_layer = 2, .n_head = 8, .n_head_kv = 2, .head_dim = 36,
      .n_ff = 160, .rope_dim = 32, .n_ctx = 300, .n_seq = 1, .n_batch = 7, .rms_eps = 1e-5f},
     KILN_TYPE_Q8_0, {KILN_TYPE_Q4_0, KILN_TYPE_Q4_1, KILN_TYPE_Q8_0}, 1},
    {"Q8_0/Q4_1/Q4_0 head_dim 48",
     {.n_vocab = 50, .n_embd = 96, .n_layer = 1, .n_head = 6, .n_head_kv = 2, .head_dim = 48,
      .n_ff = 128, .rope_dim = 48, .n_ctx = 270, .n_seq = 1, .n_batch = 16, .rms_eps = 1e-6f},
     KILN_TYPE_F16, {KILN_TYPE_Q8_0, KILN_TYPE_Q4_1, KILN_TYPE_Q4_0}, 1},
    {"F16/BF16/F32 head_dim 36",
     {.n_vocab = 67, .n_embd = 64, .n_layer = 2, .n_head = 8, .n_head_kv = 2, .head_dim = 36,
      .n_ff = 100, .rope_dim = 36, .n_ctx = 300, .n_seq = 1, .n_batch = 7, .rms_eps = 1e-5f},
     KILN_TYPE_F32, {KILN_TYPE_F16, KILN_TYPE_BF16, KILN_TYPE_F32}, 0},
    {"Q8_0/Q4_0/Q4_1 NEOX RoPE, Q/K/V biases, Q/K norms, head_dim 40",
     {.n_vocab = 61, .n_embd = 64, .n_layer = 2, .n_head = 4, .n_head_kv = 2, .head_dim = 40,
      .n_ff = 96, .rope_dim = 40, .rope_type = KILN_ROPE_NEOX, .n_ctx = 280, .n_seq = 1, .n_batch = 9,
      .rms_eps = 1e-6f},
     KILN_TYPE_Q8_0, {KILN_TYPE_Q8_0, KILN_TYPE_Q4_0, KILN_TYPE_Q4_1}, 1, 1},
};

/* isas[0] is scalar. */
void test_forward(const char *const *isas, int n_isas) {
    for (int i = 0; i < (int)(sizeof models / sizeof models[0]); i++) {
        /* to n_ctx: past 256 keys in generation, the split-attention path (2 threads) */
        int n_tokens = models[i].c.n_ctx;
        if (small_sizes && i > 0) n_tokens = 20;
        check_model(isas, n_isas, &models[i], n_tokens);
    }
}
