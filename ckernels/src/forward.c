/* The forward pass of the Llama-like families (what engine/reference.py computes, in C).
 *
 * Mirrors the reference line by line: embed (times a scale, gemma3), then per layer
 * RMSNorm -> Q/K/V (+ bias, qwen2) -> per-head RMSNorm of Q and K (qwen3, gemma3) -> RoPE
 * (interleaved or NEOX pairs; the local layers' own angles) -> KV cache -> causal GQA
 * attention (a sliding window on local layers) -> output projection (-> RMSNorm,
 * gemma3) -> residual -> RMSNorm -> SwiGLU or GeGLU FFN (-> RMSNorm, gemma3) ->
 * residual; final RMSNorm and logits. Matrix products go
 * through kiln_matmul (which splits rows over the pool; Q/K/V and gate/up each share
 * one activation quantization and one pass of the pool through kiln_matmul_multi);
 * the softmax, SwiGLU and the loops over the KV cache are kernels too, dispatched per
 * ISA. Everything else here is split over the pool by rows or (token tile, key/value
 * head) pairs. Every output is computed by one thread in a fixed order, so results do
 * not depend on the thread count.
 *
 * The KV cache is fp16, as llama.cpp's default cache type is: keys and values are
 * rounded to the nearest half (round to nearest even, like ggml's fp32 -> fp16 copy)
 * when stored (engine/reference.py rounds k and v the same way). Half the bytes also
 * halves the attention's memory traffic. Keys are stored transposed (dimension-major)
 * so that scoring a query against many keys is a run of vector multiply-adds across
 * keys, with no horizontal sums.
 *
 * A sliding-window layer keeps a ring of R = n_swa - 1 + n_batch positions per sequence
 * instead of n_ctx, when its 2R slots take no more room than n_ctx: position p lives in
 * slot p % R, and is written twice, at that slot and R slots later (a mirrored ring), so
 * that any run of up to R consecutive positions is one contiguous run of slots, read in
 * position order as the full cache is (so the sums, and the results, are the same). R
 * covers a chunk: its first query's window starts n_swa - 1 before it and its last key
 * lies n_batch - 1 after it.
 *
 * Every value that is later quantized to 8 bits (the inputs of the quantized matrix
 * products) is the correctly rounded float of a well-defined real computation, not of
 * one particular order of float operations: matrix products, RoPE, the attention
 * (scores, softmax, weighted values) and SwiGLU are computed in double and rounded to
 * float once; RMSNorm is a fixed sequence of float operations after a double sum. The
 * 8-bit rounding is a step function, so a last-bit difference in its input can flip a
 * quantized value, and on a 30-layer model such flips compound into different logits.
 * Computed this way, the result does not depend on the ISA, the thread count or the
 * batch size, and engine/reference.py (float64 NumPy) reproduces it bit for bit. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "codecs.h"
#include "forward.h"
#include "kernels.h"

#define ATT_BLOCK KILN_ATT_BLOCK
#define ATT_TILE KILN_ATT_TILE
/* from this many keys on, one token's attention is split over the threads by keys */
#define ATT_SPLIT_MIN_KEYS 256

typedef struct {
    kiln_matrix wq, wk, wv, wo;   /* see kiln_layer_weights for shapes */
    kiln_matrix w_gate, w_up, w_down;
    const float *attn_norm, *ffn_norm;
    const float *q_bias, *k_bias, *v_bias; /* NULL: none */
    const float *q_norm, *k_norm;          /* NULL: none */
    const float *attn_post_norm, *ffn_post_norm; /* NULL: none */
    int swa;                               /* a sliding-window (local) layer */
} Layer;

typedef struct {
    kiln_weight token_embd;       /* (n_vocab, n_embd), rows dequantized on lookup */
    int embd_in_output;           /* tied and repacked: rows are looked up in output's copy */
    int64_t token_embd_row_size;  /* bytes per row */
    Layer *layers;                /* (n_layer) */
    const float *output_norm;     /* (n_embd) */
    kiln_matrix output;           /* (n_vocab, n_embd) */
    double *rope_inv_freq;        /* (rope_dim / 2) */
    double *rope_inv_freq_swa;    /* (rope_dim / 2) of the local layers */
    int has_swa;                  /* some layer is local: its angles are needed too */
    double rope_attn_factor;      /* cos and sin are scaled by it (1: plain RoPE) */
} Weights;

typedef struct {
    /* activations of the current chunk of up to n_batch tokens */
    float *x;        /* (n_batch, n_embd) residual stream */
    float *xb;       /* (n_batch, n_embd) normed input of a sublayer */
    float *xb2;      /* (n_batch, n_embd) sublayer output */
    float *q;        /* (n_batch, n_head * head_dim) */
    float *att_out;  /* (n_batch, n_head * head_dim) attention output, heads concatenated */
    float *hb;       /* (n_batch, n_ff) gate, then silu(gate) * up */
    float *hb2;      /* (n_batch, n_ff) up */
    double *rope_cos; /* (n_batch, rope_dim / 2) */
    double *rope_sin; /* (n_batch, rope_dim / 2) */
    double *rope_cos_swa, *rope_sin_swa; /* the same with the local layers' angles */
    float *k;        /* (n_batch, n_head_kv * head_dim) new keys, before the transposed store */
    float *v;        /* (n_batch, n_head_kv * head_dim) new values, before the store */
    double *att;     /* (n_threads, ATT_TILE, att_stride) scores of a tile of queries */
    double *att_part; /* (n_head, n_threads, head_dim + 2) split attention: the unnormalized
                       * value sum, max score and exp sum of each head over a key segment */
    int *row_seq, *row_pos; /* (n_batch) each row's sequence and position */
    int *tiles;       /* (n_batch, 2) the attention's token tiles: first row, row count */
    int n_tiles;
    int *out_rows;    /* (n_batch) the rows that get logits */
    /* the KV cache, fp16, one region per sequence, in it one per layer: the keys of a
     * layer are (n_head_kv, head_dim, key_stride) halves, transposed, its values
     * (value_rows, n_head_kv * head_dim) */
    kiln_fp16 *key_cache;
    kiln_fp16 *value_cache;
    size_t seq_keys, seq_values;  /* halves of a sequence's region */
    size_t *key_off, *value_off;  /* (n_layer) a layer's offset in its sequence's region */
    int *ring;        /* (n_layer) ring positions R of a local layer; 0: the full n_ctx */
    int *key_stride;  /* (n_layer) slots per key row, a multiple of ATT_BLOCK: whole
                       * blocks read from any run of slots stay in bounds */
    int att_stride;   /* the largest key_stride: score rows of any layer fit */
} RunState;

struct kiln_model {
    kiln_model_config c;
    Weights w;
    RunState s;
    kiln_pool *pool;
};

/* ---- building and freeing ---- */

static int init_matrix(kiln_matrix *m, kiln_weight w, int64_t rows, int64_t cols) {
    memset(m, 0, sizeof *m);
    return kiln_matrix_init(m, w.type, rows, cols, w.data);
}

static void free_weights(Weights *w, int n_layer) {
    if (w->layers) {
        for (int l = 0; l < n_layer; l++) {
            Layer *L = &w->layers[l];
            kiln_matrix *ms[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
            for (size_t i = 0; i < sizeof ms / sizeof ms[0]; i++) kiln_matrix_free(ms[i]);
        }
        free(w->layers);
    }
    kiln_matrix_free(&w->output);
    free(w->rope_inv_freq);
    free(w->rope_inv_freq_swa);
}

static int build_weights(Weights *w, const kiln_model_config *c, const kiln_model_weights *src) {
    int64_t q_dim = (int64_t)c->n_head * c->head_dim, kv_dim = (int64_t)c->n_head_kv * c->head_dim;
    memset(w, 0, sizeof *w);
    w->token_embd = src->token_embd;
    w->token_embd_row_size = kiln_row_size(src->token_embd.type, c->n_embd);
    w->output_norm = src->output_norm;
    w->layers = calloc(c->n_layer, sizeof(Layer));
    w->rope_inv_freq = malloc(sizeof(double) * (c->rope_dim / 2 + 1));
    w->rope_inv_freq_swa = malloc(sizeof(double) * (c->rope_dim / 2 + 1));
    if (!w->layers || !w->rope_inv_freq || !w->rope_inv_freq_swa || w->token_embd_row_size <= 0)
        return -1;
    for (int i = 0; i < c->rope_dim / 2; i++) {
        w->rope_inv_freq[i] = src->rope_inv_freq[i];
        w->rope_inv_freq_swa[i] = src->rope_inv_freq_swa ? src->rope_inv_freq_swa[i]
                                                         : src->rope_inv_freq[i];
    }
    w->rope_attn_factor = c->rope_attn_factor > 0 ? c->rope_attn_factor : 1.0;
    for (int l = 0; l < c->n_layer; l++) {
        const kiln_layer_weights *s = &src->layers[l];
        Layer *L = &w->layers[l];
        L->attn_norm = s->attn_norm;
        L->ffn_norm = s->ffn_norm;
        L->q_bias = s->attn_q_bias;
        L->k_bias = s->attn_k_bias;
        L->v_bias = s->attn_v_bias;
        L->q_norm = s->attn_q_norm;
        L->k_norm = s->attn_k_norm;
        L->attn_post_norm = s->attn_post_norm;
        L->ffn_post_norm = s->ffn_post_norm;
        L->swa = c->n_swa > 0 && c->swa_layers && c->swa_layers[l];
        w->has_swa |= L->swa;
        if (init_matrix(&L->wq, s->attn_q, q_dim, c->n_embd) ||
            init_matrix(&L->wk, s->attn_k, kv_dim, c->n_embd) ||
            init_matrix(&L->wv, s->attn_v, kv_dim, c->n_embd) ||
            init_matrix(&L->wo, s->attn_output, c->n_embd, q_dim) ||
            init_matrix(&L->w_gate, s->ffn_gate, c->n_ff, c->n_embd) ||
            init_matrix(&L->w_up, s->ffn_up, c->n_ff, c->n_embd) ||
            init_matrix(&L->w_down, s->ffn_down, c->n_embd, c->n_ff))
            return -1;
    }
    if (init_matrix(&w->output, src->output, c->n_vocab, c->n_embd)) return -1;
    /* a tied embedding's rows from the packed output: the file's pages of the table are
     * then read once, at load (engine/model.py releases them), not again per new token */
    w->embd_in_output = w->output.packed && src->output.data == src->token_embd.data &&
                        src->output.type == src->token_embd.type;
    return 0;
}

static void free_run_state(RunState *s) {
    void *bufs[] = {s->x, s->xb, s->xb2, s->q, s->att_out, s->hb, s->hb2, s->rope_cos,
                    s->rope_sin, s->rope_cos_swa, s->rope_sin_swa, s->k, s->v, s->att,
                    s->att_part, s->row_seq, s->row_pos, s->tiles, s->out_rows,
                    s->key_cache, s->value_cache, s->key_off, s->value_off, s->ring,
                    s->key_stride};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
}

static float *alloc_floats(size_t n) { return malloc(sizeof(float) * (n ? n : 1)); }

static int round_up_block(int n) { return (n + ATT_BLOCK - 1) / ATT_BLOCK * ATT_BLOCK; }

/* Each layer's share of a sequence's cache: the full n_ctx, or for a local layer a
 * mirrored ring of R = n_swa - 1 + n_batch positions (2R slots) when that takes at most
 * the full cache. A local layer's runs of keys start at any slot, and the scores kernel
 * reads whole blocks: its key rows have a block of slack. */
static int plan_cache(RunState *s, const kiln_model_config *c, const Layer *layers) {
    size_t kv_dim = (size_t)c->n_head_kv * c->head_dim;
    s->key_off = malloc(sizeof(size_t) * (c->n_layer + 1));
    s->value_off = malloc(sizeof(size_t) * (c->n_layer + 1));
    s->ring = calloc(c->n_layer + 1, sizeof(int));
    s->key_stride = malloc(sizeof(int) * (c->n_layer + 1));
    if (!s->key_off || !s->value_off || !s->ring || !s->key_stride) return -1;
    s->seq_keys = s->seq_values = 0;
    s->att_stride = ATT_BLOCK;
    for (int l = 0; l < c->n_layer; l++) {
        int64_t R = (int64_t)c->n_swa - 1 + c->n_batch, rows = c->n_ctx;
        if (layers[l].swa && 2 * R <= c->n_ctx) {
            s->ring[l] = (int)R;
            rows = 2 * R;
        }
        s->key_stride[l] = round_up_block((int)rows + (layers[l].swa ? ATT_BLOCK : 0));
        s->att_stride = s->key_stride[l] > s->att_stride ? s->key_stride[l] : s->att_stride;
        s->key_off[l] = s->seq_keys;
        s->value_off[l] = s->seq_values;
        s->seq_keys += kv_dim * s->key_stride[l];
        s->seq_values += kv_dim * (size_t)rows;
    }
    return 0;
}

static int build_run_state(RunState *s, const kiln_model_config *c, const Layer *layers,
                           int n_threads) {
    size_t B = c->n_batch, q_dim = (size_t)c->n_head * c->head_dim;
    memset(s, 0, sizeof *s);
    if (plan_cache(s, c, layers)) return -1;
    s->x = alloc_floats(B * c->n_embd);
    s->xb = alloc_floats(B * c->n_embd);
    s->xb2 = alloc_floats(B * c->n_embd);
    s->q = alloc_floats(B * q_dim);
    s->att_out = alloc_floats(B * q_dim);
    s->hb = alloc_floats(B * c->n_ff);
    s->hb2 = alloc_floats(B * c->n_ff);
    s->rope_cos = malloc(sizeof(double) * (B * (c->rope_dim / 2) + 1));
    s->rope_sin = malloc(sizeof(double) * (B * (c->rope_dim / 2) + 1));
    s->rope_cos_swa = malloc(sizeof(double) * (B * (c->rope_dim / 2) + 1));
    s->rope_sin_swa = malloc(sizeof(double) * (B * (c->rope_dim / 2) + 1));
    size_t kv_dim = (size_t)c->n_head_kv * c->head_dim;
    s->k = alloc_floats(B * kv_dim);
    s->v = alloc_floats(B * kv_dim);
    s->att = malloc(sizeof(double) * (size_t)n_threads * ATT_TILE * s->att_stride);
    s->att_part = malloc(sizeof(double) * (size_t)c->n_head * n_threads * (c->head_dim + 2));
    s->row_seq = malloc(sizeof(int) * B);
    s->row_pos = malloc(sizeof(int) * B);
    s->tiles = malloc(sizeof(int) * 2 * B);
    s->out_rows = malloc(sizeof(int) * B);
    /* calloc: pages of the cache are touched only as positions fill */
    size_t n_keys = s->seq_keys * c->n_seq, n_values = s->seq_values * c->n_seq;
    s->key_cache = calloc(n_keys ? n_keys : 1, sizeof(kiln_fp16));
    s->value_cache = calloc(n_values ? n_values : 1, sizeof(kiln_fp16));
    return s->x && s->xb && s->xb2 && s->q && s->att_out && s->hb && s->hb2 && s->rope_cos &&
                   s->rope_sin && s->rope_cos_swa && s->rope_sin_swa && s->k && s->v &&
                   s->att && s->att_part && s->row_seq &&
                   s->row_pos && s->tiles && s->out_rows && s->key_cache &&
                   s->value_cache ? 0 : -1;
}

kiln_model *kiln_model_create(const kiln_model_config *cfg, const kiln_model_weights *w,
                              int n_threads) {
    if (n_threads < 1 || cfg->n_batch < 1 || cfg->n_ctx < 1 || cfg->n_seq < 1 || cfg->n_head_kv < 1 ||
        cfg->n_head % cfg->n_head_kv || cfg->rope_dim > cfg->head_dim || cfg->rope_dim % 2 ||
        cfg->head_dim < 1 || cfg->head_dim > KILN_ATT_MAX_HEAD_DIM ||
        (cfg->rope_type != KILN_ROPE_NORM && cfg->rope_type != KILN_ROPE_NEOX) ||
        (cfg->ffn_act != KILN_FFN_SILU && cfg->ffn_act != KILN_FFN_GELU) || cfg->n_swa < 0)
        return NULL;
    kiln_model *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->c = *cfg;
    m->c.swa_layers = NULL;  /* not owned: the layers keep their flags */
    if (!(m->c.embd_scale > 0)) m->c.embd_scale = 1.0f;
    if (!(m->c.attn_scale > 0)) m->c.attn_scale = 1.0 / sqrt((double)cfg->head_dim);
    m->pool = kiln_pool_create(n_threads);
    if (!m->pool || build_weights(&m->w, cfg, w) ||
        build_run_state(&m->s, cfg, m->w.layers, n_threads)) {
        kiln_model_free(m);
        return NULL;
    }
    return m;
}

void kiln_model_free(kiln_model *m) {
    if (!m) return;
    free_weights(&m->w, m->c.n_layer);
    free_run_state(&m->s);
    if (m->pool) kiln_pool_free(m->pool);
    free(m);
}

int kiln_model_n_threads(const kiln_model *m) { return kiln_pool_size(m->pool); }

size_t kiln_model_kv_cache_bytes(const kiln_model *m) {
    return (m->s.seq_keys + m->s.seq_values) * m->c.n_seq * sizeof(kiln_fp16);
}

int kiln_model_cache_positions(const kiln_model *m, int layer) {
    if (layer < 0 || layer >= m->c.n_layer) return -1;
    return m->s.ring[layer] ? m->s.ring[layer] : m->c.n_ctx;
}

/* ---- the pieces of a layer, each split over the pool ---- */

/* A single row is not worth waking the workers for. */
static void run_rows(kiln_pool *pool, kiln_task_fn fn, void *ctx, int n_rows) {
    if (n_rows == 1) fn(ctx, 0, 1);
    else kiln_pool_run(pool, fn, ctx);
}

/* Keys of sequence seq's layer's key/value head g: (head_dim, key_stride) halves, the
 * key in slot i of dimension d at d * key_stride + i (so the next head's keys follow at
 * + head_dim * key_stride). */
static kiln_fp16 *key_cache_at(const kiln_model *m, int seq, int layer, int g) {
    return m->s.key_cache + (size_t)seq * m->s.seq_keys + m->s.key_off[layer] +
           (size_t)g * m->c.head_dim * m->s.key_stride[layer];
}

/* Values of sequence seq's layer in slot i: (n_head_kv * head_dim) halves, the next
 * slot's right after. */
static kiln_fp16 *value_cache_at(const kiln_model *m, int seq, int layer, int i) {
    size_t kv_dim = (size_t)m->c.n_head_kv * m->c.head_dim;
    return m->s.value_cache + (size_t)seq * m->s.seq_values + m->s.value_off[layer] +
           (size_t)i * kv_dim;
}

/* The slot of position p in a layer's cache (the first of its two in a ring) */
static int cache_slot(const kiln_model *m, int layer, int p) {
    return m->s.ring[layer] ? p % m->s.ring[layer] : p;
}

/* The first position a query at p attends to in a layer */
static int window_start(const kiln_model *m, int layer, int p) {
    int lo = m->w.layers[layer].swa ? p - m->c.n_swa + 1 : 0;
    return lo > 0 ? lo : 0;
}

typedef struct {
    float *out;          /* (n, dim) */
    const float *x;      /* (n, dim) */
    const float *weight; /* (dim) */
    int n, dim;
    float eps;
} RmsnormRows;

/* out = rmsnorm(x) * weight over dim floats (out may be x) */
static void rmsnorm_row(float *out, const float *x, const float *weight, int dim, float eps) {
    double ss = 0.0;
    for (int i = 0; i < dim; i++) ss += (double)x[i] * x[i];
    float scale = (float)(1.0 / sqrt(ss / dim + eps));
    for (int i = 0; i < dim; i++) out[i] = x[i] * scale * weight[i];
}

static void task_rmsnorm(void *ctx, int ith, int nth) {
    const RmsnormRows *a = ctx;
    int64_t lo, hi;
    kiln_share(a->n, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++)
        rmsnorm_row(a->out + (size_t)t * a->dim, a->x + (size_t)t * a->dim, a->weight, a->dim,
                    a->eps);
}

/* out[t] = rmsnorm(x[t]) * weight for the n rows of dim floats */
static void rmsnorm_rows(kiln_pool *pool, float *out, const float *x, const float *weight, int n,
                         int dim, float eps) {
    RmsnormRows a = {out, x, weight, n, dim, eps};
    run_rows(pool, task_rmsnorm, &a, n);
}

typedef struct {
    float *x;       /* (n, dim) */
    const float *r; /* (n, dim) */
    int n, dim;
} AddRows;

static void task_add(void *ctx, int ith, int nth) {
    const AddRows *a = ctx;
    int64_t lo, hi;
    kiln_share(a->n, ith, nth, &lo, &hi);
    for (size_t i = (size_t)lo * a->dim; i < (size_t)hi * a->dim; i++) a->x[i] += a->r[i];
}

/* x += r over n rows of dim floats: a sublayer's output joins the residual stream */
static void add_rows(kiln_pool *pool, float *x, const float *r, int n, int dim) {
    AddRows a = {x, r, n, dim};
    run_rows(pool, task_add, &a, n);
}

/* Rotates pair i of the first rope_dim dims of each head by angle pos * inv_freq[i], in
 * double: the pair is (v[2i], v[2i+1]) for KILN_ROPE_NORM (GGUF/Meta interleaved order),
 * (v[i], v[i + rope_dim/2]) for KILN_ROPE_NEOX (rotate-half). */
static void rope_heads(float *v, int n_heads, int head_dim, int rope_dim, int rope_type,
                       const double *cosv, const double *sinv) {
    int half = rope_dim / 2, neox = rope_type == KILN_ROPE_NEOX;
    for (int h = 0; h < n_heads; h++) {
        float *hv = v + (size_t)h * head_dim;
        for (int i = 0; i < half; i++) {
            int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
            double x0 = hv[i0], x1 = hv[i1];
            hv[i0] = (float)(x0 * cosv[i] - x1 * sinv[i]);
            hv[i1] = (float)(x0 * sinv[i] + x1 * cosv[i]);
        }
    }
}

static void add_bias(float *x, const float *bias, int n) {
    for (int i = 0; i < n; i++) x[i] += bias[i];
}

/* each of n_heads heads of head_dim floats = rmsnorm(head) * weight */
static void rmsnorm_heads(float *v, const float *weight, int n_heads, int head_dim, float eps) {
    for (int h = 0; h < n_heads; h++)
        rmsnorm_row(v + (size_t)h * head_dim, v + (size_t)h * head_dim, weight, head_dim, eps);
}

/* The attention steps of one layer for a chunk of n_tokens rows, row t at position
 * s.row_pos[t] of sequence s.row_seq[t] (queries in s.q, new keys and values in s.k and
 * s.v, output to s.att_out). */
typedef struct {
    kiln_model *m;
    int layer, n_tokens;
} AttentionStep;

/* The chunk's queries and new keys and values as the attention takes them: biases
 * added, Q and K heads normed, RoPE on Q and K (the local layers' angles on a local
 * layer); the keys (transposed) and values then go into the fp16 cache, twice in a ring */
static void task_rope_store(void *ctx, int ith, int nth) {
    const AttentionStep *k = ctx;
    const kiln_model_config *c = &k->m->c;
    const Layer *L = &k->m->w.layers[k->layer];
    RunState *s = &k->m->s;
    int q_dim = c->n_head * c->head_dim, kv_dim = c->n_head_kv * c->head_dim;
    int half = c->rope_dim / 2, ring = s->ring[k->layer], stride = s->key_stride[k->layer];
    const double *cos_all = L->swa ? s->rope_cos_swa : s->rope_cos;
    const double *sin_all = L->swa ? s->rope_sin_swa : s->rope_sin;
    int64_t lo, hi;
    kiln_share(k->n_tokens, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        int seq = s->row_seq[t], slot = cache_slot(k->m, k->layer, s->row_pos[t]);
        const double *cs = cos_all + (size_t)t * half, *sn = sin_all + (size_t)t * half;
        float *q = s->q + (size_t)t * q_dim, *key = s->k + (size_t)t * kv_dim;
        float *value = s->v + (size_t)t * kv_dim;
        if (L->q_bias) add_bias(q, L->q_bias, q_dim);
        if (L->k_bias) add_bias(key, L->k_bias, kv_dim);
        if (L->v_bias) add_bias(value, L->v_bias, kv_dim);
        if (L->q_norm) rmsnorm_heads(q, L->q_norm, c->n_head, c->head_dim, c->rms_eps);
        if (L->k_norm) rmsnorm_heads(key, L->k_norm, c->n_head_kv, c->head_dim, c->rms_eps);
        rope_heads(q, c->n_head, c->head_dim, c->rope_dim, c->rope_type, cs, sn);
        rope_heads(key, c->n_head_kv, c->head_dim, c->rope_dim, c->rope_type, cs, sn);
        for (int copy = 0; copy < (ring ? 2 : 1); copy++) {
            int at = slot + copy * ring;
            kiln_fp16 *keys = key_cache_at(k->m, seq, k->layer, 0) + at;
            for (int i = 0; i < kv_dim; i++)  /* i = kv_head * head_dim + d */
                keys[(size_t)i * stride] = kiln_fp32_to_fp16(key[i]);
            kiln_quantize_row_f16(value, value_cache_at(k->m, seq, k->layer, at), kv_dim);
        }
    }
}

/* Causal attention. Work items are (tile of up to ATT_TILE consecutive rows of one
 * sequence, key/value head g) pairs (the tiles: see make_tiles), dealt round-robin so the triangle of a prompt's work spreads evenly; each is
 * computed whole by one thread. An item's query rows, its tokens times the `group`
 * query heads that share head g (GQA), go through the kernels up to ATT_TILE rows at a
 * time, so each key and value block read from the cache is widened once for all of
 * them: in generation, the rows are the group's heads. The keys read are one run of
 * positions, from the earliest window start of the rows to their last position; each
 * row's softmax covers its own window of it, and its weights outside it are 0, so the
 * value sum adds exact zeros there. */
static void task_attention(void *ctx, int ith, int nth) {
    const AttentionStep *k = ctx;
    const kiln_model_config *c = &k->m->c;
    RunState *s = &k->m->s;
    int hd = c->head_dim, kv_dim = c->n_head_kv * hd, group = c->n_head / c->n_head_kv;
    int q_dim = c->n_head * hd, stride = s->key_stride[k->layer];
    double *att = s->att + (size_t)ith * ATT_TILE * s->att_stride;
    for (int item = ith; item < s->n_tiles * c->n_head_kv; item += nth) {
        int tile = item / c->n_head_kv, g = item % c->n_head_kv;
        int t0 = s->tiles[2 * tile], n_q = s->tiles[2 * tile + 1], seq = s->row_seq[t0];
        int first = s->row_pos[t0];
        for (int t = t0; t < t0 + n_q; t++)
            first = window_start(k->m, k->layer, s->row_pos[t]) < first
                        ? window_start(k->m, k->layer, s->row_pos[t]) : first;
        int slot0 = cache_slot(k->m, k->layer, first);
        const kiln_fp16 *keys_t = key_cache_at(k->m, seq, k->layer, g) + slot0;
        const kiln_fp16 *values = value_cache_at(k->m, seq, k->layer, slot0) + (size_t)g * hd;
        for (int row0 = 0; row0 < n_q * group; row0 += ATT_TILE) {
            int R = n_q * group - row0 < ATT_TILE ? n_q * group - row0 : ATT_TILE;
            const float *q[ATT_TILE];
            float *out[ATT_TILE];
            int n_keys[ATT_TILE], skip[ATT_TILE], n_keys_max = 0;
            for (int r = 0; r < R; r++) {  /* row = token-major, then head in the group */
                int t = t0 + (row0 + r) / group, h = g * group + (row0 + r) % group;
                q[r] = s->q + (size_t)t * q_dim + (size_t)h * hd;
                out[r] = s->att_out + (size_t)t * q_dim + (size_t)h * hd;
                n_keys[r] = s->row_pos[t] - first + 1;
                skip[r] = window_start(k->m, k->layer, s->row_pos[t]) - first;
                n_keys_max = n_keys[r] > n_keys_max ? n_keys[r] : n_keys_max;
            }
            kiln_attn_scores_f16(R, att, q, keys_t, n_keys_max, hd, stride, c->attn_scale);
            for (int r = 0; r < R; r++) {
                double *a = att + (size_t)r * stride;
                kiln_softmax_f64(a + skip[r], n_keys[r] - skip[r]);
                for (int p = 0; p < skip[r]; p++) a[p] = 0.0;
                for (int p = n_keys[r]; p < n_keys_max; p++) a[p] = 0.0;
            }
            kiln_attn_values_f16(R, out, NULL, att, values, n_keys_max, hd, kv_dim, stride);
        }
    }
}

/* One token deep in a context (generation) has only n_head_kv work items above, too few
 * to keep every thread busy. Instead each key/value head's keys (the token's window) are
 * split into one segment per thread (whole ATT_BLOCKs); a thread computes, for the
 * group's heads over its segment, the scores, their max m, the exps e^(score - m), their
 * sum l and the unnormalized value sum o (in double); attention_combine then joins the
 * segments: out = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M), M the largest m_s. In
 * exact arithmetic that is the softmax-weighted sum; in double it rounds to the same
 * float. */
static void task_attention_split(void *ctx, int ith, int nth) {
    const AttentionStep *k = ctx;
    const kiln_model_config *c = &k->m->c;
    RunState *s = &k->m->s;
    int hd = c->head_dim, kv_dim = c->n_head_kv * hd, group = c->n_head / c->n_head_kv;
    int stride = s->key_stride[k->layer], seq = s->row_seq[0];
    int first = window_start(k->m, k->layer, s->row_pos[0]);
    int slot0 = cache_slot(k->m, k->layer, first);
    int n_keys = s->row_pos[0] - first + 1, n_blocks = (n_keys + ATT_BLOCK - 1) / ATT_BLOCK;
    double *att = s->att + (size_t)ith * ATT_TILE * s->att_stride;
    for (int item = ith; item < c->n_head_kv * nth; item += nth) {
        int g = item / nth, seg = item % nth;
        int64_t b0, b1;
        kiln_share(n_blocks, seg, nth, &b0, &b1);
        int k0 = (int)b0 * ATT_BLOCK, k1 = (int)b1 * ATT_BLOCK < n_keys ? (int)b1 * ATT_BLOCK : n_keys;
        for (int row0 = 0; row0 < group; row0 += ATT_TILE) {
            int R = group - row0 < ATT_TILE ? group - row0 : ATT_TILE;
            const float *q[ATT_TILE];
            double *part[ATT_TILE];
            for (int r = 0; r < R; r++) {
                int h = g * group + row0 + r;
                q[r] = s->q + (size_t)h * hd;
                part[r] = s->att_part + ((size_t)h * nth + seg) * (hd + 2);
                part[r][hd] = -INFINITY;  /* an empty segment adds nothing */
                part[r][hd + 1] = 0.0;
            }
            if (k0 >= k1) {
                for (int r = 0; r < R; r++) memset(part[r], 0, sizeof(double) * hd);
                continue;
            }
            kiln_attn_scores_f16(R, att, q, key_cache_at(k->m, seq, k->layer, g) + slot0 + k0,
                                 k1 - k0, hd, stride, c->attn_scale);
            for (int r = 0; r < R; r++)
                part[r][hd + 1] = kiln_exp_shifted_f64(att + (size_t)r * stride, k1 - k0, &part[r][hd]);
            kiln_attn_values_f16(R, NULL, part, att,
                                 value_cache_at(k->m, seq, k->layer, slot0 + k0) + (size_t)g * hd,
                                 k1 - k0, hd, kv_dim, stride);
        }
    }
}

/* Joins task_attention_split's segments into the token's attention output. */
static void attention_combine(kiln_model *m, int n_seg) {
    const kiln_model_config *c = &m->c;
    RunState *s = &m->s;
    int hd = c->head_dim;
    for (int h = 0; h < c->n_head; h++) {
        const double *part = s->att_part + (size_t)h * n_seg * (hd + 2);
        double max = -INFINITY;
        for (int seg = 0; seg < n_seg; seg++)
            max = part[seg * (hd + 2) + hd] > max ? part[seg * (hd + 2) + hd] : max;
        double w[KILN_MAX_THREADS], l = 0.0; /* n_seg = the pool's size */
        for (int seg = 0; seg < n_seg; seg++) {
            const double *ps = part + (size_t)seg * (hd + 2);
            w[seg] = ps[hd] == -INFINITY ? 0.0 : exp(ps[hd] - max);
            l += ps[hd + 1] * w[seg];
        }
        for (int d = 0; d < hd; d++) {
            double o = 0.0;
            for (int seg = 0; seg < n_seg; seg++) o += part[(size_t)seg * (hd + 2) + d] * w[seg];
            s->att_out[(size_t)h * hd + d] = (float)(o / l);
        }
    }
}

typedef struct {
    float *gate;     /* (n, n_ff) */
    const float *up; /* (n, n_ff) */
    int n, n_ff;
} GluRows;

static void task_swiglu(void *ctx, int ith, int nth) {
    const GluRows *a = ctx;
    int64_t lo, hi;
    kiln_share(a->n, ith, nth, &lo, &hi);
    kiln_swiglu_f32(a->gate + (size_t)lo * a->n_ff, a->up + (size_t)lo * a->n_ff,
                    (size_t)(hi - lo) * a->n_ff);
}

/* GELU's tanh approximation times up, in double and rounded once, as engine/reference.py
 * computes it (the same operations in the same order; libm's tanh, which the reference
 * calls too): 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) up. Not an ISA kernel:
 * tanh has no vector form here, and one C loop gives the same bits on every variant. */
static void task_geglu(void *ctx, int ith, int nth) {
    const GluRows *a = ctx;
    int64_t lo, hi;
    kiln_share(a->n, ith, nth, &lo, &hi);
    for (size_t i = (size_t)lo * a->n_ff; i < (size_t)hi * a->n_ff; i++) {
        double g = a->gate[i];
        double u = 0.7978845608028654 * (g + 0.044715 * g * g * g);
        a->gate[i] = (float)(0.5 * g * (1.0 + tanh(u)) * a->up[i]);
    }
}

/* gate = act(gate) * up over n rows of n_ff floats: SwiGLU or GeGLU */
static void glu_rows(kiln_pool *pool, int act, float *gate, const float *up, int n, int n_ff) {
    GluRows a = {gate, up, n, n_ff};
    run_rows(pool, act == KILN_FFN_GELU ? task_geglu : task_swiglu, &a, n);
}

/* ---- forward ---- */

/* The attention's token tiles of a chunk of n rows: runs of up to ATT_TILE consecutive
 * rows of one sequence (their queries share each key read). */
static void make_tiles(RunState *s, int n) {
    s->n_tiles = 0;
    for (int t = 0; t < n; t++) {
        int *last = s->tiles + 2 * (s->n_tiles - 1);
        if (s->n_tiles && s->row_seq[last[0]] == s->row_seq[t] && last[1] < ATT_TILE) {
            last[1]++;
        } else {
            s->tiles[2 * s->n_tiles] = t;
            s->tiles[2 * s->n_tiles + 1] = 1;
            s->n_tiles++;
        }
    }
}

/* One chunk of n <= n_batch rows, row t at position s.row_pos[t] of sequence
 * s.row_seq[t]; logits for the n_out rows s.out_rows[0..n_out) go to logits. */
static void forward_chunk(kiln_model *m, const int32_t *tokens, int n, int n_out, float *logits,
                          float *trace, size_t trace_stride) {
    const kiln_model_config *c = &m->c;
    Weights *w = &m->w;
    RunState *s = &m->s;
    int half = c->rope_dim / 2, nth = kiln_pool_size(m->pool);
    size_t chunk = (size_t)n * c->n_embd; /* floats of the chunk's residual stream */

    make_tiles(s, n);
    for (int t = 0; t < n; t++) {
        float *x = s->x + (size_t)t * c->n_embd;
        if (w->embd_in_output)
            kiln_matrix_row(&w->output, tokens[t], x);
        else
            kiln_dequantize_row(w->token_embd.type,
                                (const char *)w->token_embd.data + tokens[t] * w->token_embd_row_size,
                                x, c->n_embd);
        if (c->embd_scale != 1.0f)
            for (int i = 0; i < c->n_embd; i++) x[i] *= c->embd_scale;
        for (int i = 0; i < half; i++) {
            double theta = (double)s->row_pos[t] * w->rope_inv_freq[i];
            s->rope_cos[(size_t)t * half + i] = cos(theta) * w->rope_attn_factor;
            s->rope_sin[(size_t)t * half + i] = sin(theta) * w->rope_attn_factor;
            if (!w->has_swa) continue;
            theta = (double)s->row_pos[t] * w->rope_inv_freq_swa[i];
            s->rope_cos_swa[(size_t)t * half + i] = cos(theta) * w->rope_attn_factor;
            s->rope_sin_swa[(size_t)t * half + i] = sin(theta) * w->rope_attn_factor;
        }
    }
    if (trace) memcpy(trace, s->x, sizeof(float) * chunk);

    for (int l = 0; l < c->n_layer; l++) {
        Layer *L = &w->layers[l];

        /* attention: x += [post-norm] wo(attention(rope(wq xb), rope(wk xb), wv xb)),
         * xb = rmsnorm(x) */
        rmsnorm_rows(m->pool, s->xb, s->x, L->attn_norm, n, c->n_embd, c->rms_eps);
        const kiln_matrix *qkv[3] = {&L->wq, &L->wk, &L->wv};
        float *qkv_out[3] = {s->q, s->k, s->v};
        kiln_matmul_multi(m->pool, 3, qkv, s->xb, n, qkv_out);
        AttentionStep step = {m, l, n};
        run_rows(m->pool, task_rope_store, &step, n);
        if (n == 1 && nth > 1 &&
            s->row_pos[0] - window_start(m, l, s->row_pos[0]) + 1 >= ATT_SPLIT_MIN_KEYS) {
            kiln_pool_run(m->pool, task_attention_split, &step);
            attention_combine(m, nth);
        } else {
            kiln_pool_run(m->pool, task_attention, &step);
        }
        kiln_matmul(m->pool, &L->wo, s->att_out, n, s->xb2);
        if (L->attn_post_norm)
            rmsnorm_rows(m->pool, s->xb2, s->xb2, L->attn_post_norm, n, c->n_embd, c->rms_eps);
        add_rows(m->pool, s->x, s->xb2, n, c->n_embd);

        /* feed-forward: x += [post-norm] w_down(act(w_gate xb) * w_up xb), xb = rmsnorm(x) */
        rmsnorm_rows(m->pool, s->xb, s->x, L->ffn_norm, n, c->n_embd, c->rms_eps);
        const kiln_matrix *gate_up[2] = {&L->w_gate, &L->w_up};
        float *gate_up_out[2] = {s->hb, s->hb2};
        kiln_matmul_multi(m->pool, 2, gate_up, s->xb, n, gate_up_out);
        glu_rows(m->pool, c->ffn_act, s->hb, s->hb2, n, c->n_ff);
        kiln_matmul(m->pool, &L->w_down, s->hb, n, s->xb2);
        if (L->ffn_post_norm)
            rmsnorm_rows(m->pool, s->xb2, s->xb2, L->ffn_post_norm, n, c->n_embd, c->rms_eps);
        add_rows(m->pool, s->x, s->xb2, n, c->n_embd);

        if (trace) memcpy(trace + (size_t)(l + 1) * trace_stride, s->x, sizeof(float) * chunk);
    }
    if (n_out == 0) return;

    /* final norm of the rows that need logits, then the output matrix */
    for (int i = 0; i < n_out; i++)  /* gathered in order (rows out_rows[i] >= i) */
        if (s->out_rows[i] != i)
            memcpy(s->x + (size_t)i * c->n_embd, s->x + (size_t)s->out_rows[i] * c->n_embd,
                   sizeof(float) * c->n_embd);
    rmsnorm_rows(m->pool, s->xb, s->x, w->output_norm, n_out, c->n_embd, c->rms_eps);
    kiln_matmul(m->pool, &w->output, s->xb, n_out, logits);
}

int kiln_model_eval(kiln_model *m, const int32_t *tokens, int n_tokens, int n_past,
                    float *logits, int logits_all) {
    return kiln_model_eval_trace(m, tokens, n_tokens, n_past, logits, logits_all, NULL);
}

int kiln_model_eval_trace(kiln_model *m, const int32_t *tokens, int n_tokens, int n_past,
                          float *logits, int logits_all, float *trace) {
    const kiln_model_config *c = &m->c;
    if (n_tokens < 1 || n_past < 0 || n_past > c->n_ctx - n_tokens) return -1;
    for (int t = 0; t < n_tokens; t++)
        if (tokens[t] < 0 || tokens[t] >= c->n_vocab) return -1;
    RunState *s = &m->s;
    for (int done = 0; done < n_tokens; done += c->n_batch) {
        int n = n_tokens - done < c->n_batch ? n_tokens - done : c->n_batch;
        int last_chunk = done + n == n_tokens;
        int first_logit = logits_all ? 0 : last_chunk ? n - 1 : n;
        for (int t = 0; t < n; t++) {
            s->row_seq[t] = 0;
            s->row_pos[t] = n_past + done + t;
        }
        for (int t = first_logit; t < n; t++) s->out_rows[t - first_logit] = t;
        forward_chunk(m, tokens + done, n, n - first_logit,
                      logits_all ? logits + (size_t)done * c->n_vocab : logits,
                      trace ? trace + (size_t)done * c->n_embd : NULL, (size_t)n_tokens * c->n_embd);
    }
    return 0;
}

static int has_ring(const kiln_model *m) {
    for (int l = 0; l < m->c.n_layer; l++)
        if (m->s.ring[l]) return 1;
    return 0;
}

int kiln_model_eval_batch(kiln_model *m, const int32_t *tokens, const int32_t *seq_ids,
                          const int32_t *positions, int n_tokens, const uint8_t *logits_rows,
                          float *logits) {
    const kiln_model_config *c = &m->c;
    RunState *s = &m->s;
    if (n_tokens < 1) return -1;
    int ring = has_ring(m);
    for (int t = 0; t < n_tokens; t++) {
        if (tokens[t] < 0 || tokens[t] >= c->n_vocab || seq_ids[t] < 0 || seq_ids[t] >= c->n_seq ||
            positions[t] < 0 || positions[t] >= c->n_ctx)
            return -1;
        for (int u = 0; u < t; u++) { /* two rows writing one cache cell: which one wins? */
            if (seq_ids[u] != seq_ids[t]) continue;
            if (positions[u] == positions[t]) return -1;
            /* a ring holds a chunk's keys only if they span fewer than n_batch positions */
            int d = positions[u] - positions[t];
            if (ring && u / c->n_batch == t / c->n_batch && (d >= c->n_batch || -d >= c->n_batch))
                return -1;
        }
    }
    for (int done = 0; done < n_tokens; done += c->n_batch) {
        int n = n_tokens - done < c->n_batch ? n_tokens - done : c->n_batch, n_out = 0;
        for (int t = 0; t < n; t++) {
            s->row_seq[t] = seq_ids[done + t];
            s->row_pos[t] = positions[done + t];
            if (logits_rows[done + t]) s->out_rows[n_out++] = t;
        }
        forward_chunk(m, tokens + done, n, n_out, logits, NULL, 0);
        logits += (size_t)n_out * c->n_vocab;
    }
    return 0;
}

int kiln_model_get_kv(const kiln_model *m, int layer, int n, float *keys, float *values) {
    const kiln_model_config *c = &m->c;
    if (layer < 0 || layer >= c->n_layer || n < 0 || n > c->n_ctx) return -1;
    size_t kv_dim = (size_t)c->n_head_kv * c->head_dim, stride = m->s.key_stride[layer];
    const kiln_fp16 *key_cache = key_cache_at(m, 0, layer, 0);
    for (int p = 0; p < n; p++) {
        int slot = cache_slot(m, layer, p);
        for (size_t i = 0; i < kv_dim; i++)
            keys[p * kv_dim + i] = kiln_fp16_to_fp32(key_cache[i * stride + slot]);
        kiln_dequantize_row_f16(value_cache_at(m, 0, layer, slot), values + p * kv_dim, kv_dim);
    }
    return 0;
}
