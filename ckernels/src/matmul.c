/* Weight matrices and kiln_matmul: repacking at load time, activation quantization,
 * and the split of work over the pool. The arithmetic is in the isa/ sources. */
#include <assert.h>
#include <pthread.h>
#include <sys/mman.h>
#include <stdlib.h>
#include <string.h>

#include "codecs.h"
#include "kernels.h"
#include "kernels_impl.h"

/* The type's row of the table; NULL (refused by kiln_matrix_init) for unknown types. */
static const kiln_type_traits *kiln_weight_traits(int type) {
    const kiln_type_traits *tt = kiln_type_traits_of(type);
    return tt && tt->is_weight ? tt : NULL;
}

kiln_packed_view kiln_packed_view_of(int type, int64_t rows, int64_t cols, const void *packed) {
    const kiln_type_traits *tt = kiln_weight_traits(type);
    assert(tt && tt->packed_block_bytes);
    kiln_packed_view v;
    v.type = type;
    v.rows = rows;
    v.nb = cols / QK;
    v.ng = (v.nb + KILN_KG - 1) / KILN_KG;
    v.qs_bytes = (size_t)tt->packed_block_bytes * KILN_KG;
    size_t size = (size_t)KILN_RG * (size_t)v.nb * (size_t)tt->packed_block_bytes +
                  (size_t)tt->n_scale_sets * (size_t)v.ng * KILN_RG * KILN_KG * sizeof(kiln_fp16);
    v.rg_size = (size + 63) & ~(size_t)63;
    v.data = packed;
    return v;
}

size_t kiln_packed_size(int type, int64_t rows, int64_t cols) {
    kiln_packed_view v = kiln_packed_view_of(type, rows, cols, NULL);
    return (size_t)((rows + KILN_RG - 1) / KILN_RG) * v.rg_size;
}

/* Copies GGUF blocks into the packed layout (see kernels_impl.h). */
void kiln_pack_rows(kiln_packed_view *v, uint8_t *dst, int type, int64_t rows, int64_t cols,
                    const void *src) {
    const kiln_type_traits *tt = kiln_weight_traits(type);
    *v = kiln_packed_view_of(type, rows, cols, dst);
    int64_t nrg = (rows + KILN_RG - 1) / KILN_RG;
    size_t bb = (size_t)tt->packed_block_bytes;
    memset(dst, 0, (size_t)nrg * v->rg_size);
    for (int64_t rg = 0; rg < nrg; rg++) {
        for (int64_t g = 0; g < v->ng; g++) {
            int64_t b0 = g * KILN_KG;
            int nt = (int)(v->nb - b0 < KILN_KG ? v->nb - b0 : KILN_KG);
            uint8_t *qs = (uint8_t *)kiln_rg_qs(v, rg, g);
            kiln_fp16 *d = (kiln_fp16 *)kiln_rg_d(v, rg, g);
            kiln_fp16 *m = tt->n_scale_sets > 1 ? (kiln_fp16 *)kiln_rg_m(v, rg, g) : NULL;
            for (int r = 0; r < KILN_RG; r++) {
                int64_t row = rg * KILN_RG + r;
                if (row >= rows) break; /* padding rows stay zero */
                uint8_t *rq = qs + (size_t)r * nt * bb;
                for (int b = 0; b < nt; b++) {
                    const uint8_t *blk = (const uint8_t *)src +
                                         (size_t)(row * v->nb + b0 + b) * (size_t)tt->type_size;
                    tt->pack_block(blk, rq, b, nt, &d[b * KILN_RG + r], m ? &m[b * KILN_RG + r] : NULL);
                }
            }
        }
    }
}

void kiln_matrix_row(const kiln_matrix *m, int64_t row, float *y) {
    const kiln_type_traits *tt = kiln_weight_traits(m->type);
    if (!m->packed) {
        tt->dequantize_row((const uint8_t *)m->data + (size_t)row * (size_t)kiln_row_size(m->type, m->cols), y,
                           m->cols);
        return;
    }
    kiln_packed_view v = kiln_packed_view_of(m->type, m->rows, m->cols, m->packed);
    int64_t rg = row / KILN_RG;
    int r = (int)(row % KILN_RG);
    size_t bb = (size_t)tt->packed_block_bytes;
    uint8_t block[64]; /* one GGUF block: at most Q8_0's 34 bytes */
    for (int64_t g = 0; g < v.ng; g++) {
        int64_t b0 = g * KILN_KG;
        int nt = (int)(v.nb - b0 < KILN_KG ? v.nb - b0 : KILN_KG);
        const uint8_t *rq = kiln_rg_qs(&v, rg, g) + (size_t)r * nt * bb;
        const kiln_fp16 *d = kiln_rg_d(&v, rg, g);
        const kiln_fp16 *mn = tt->n_scale_sets > 1 ? kiln_rg_m(&v, rg, g) : NULL;
        for (int b = 0; b < nt; b++) {
            tt->unpack_block(rq, b, nt, d[b * KILN_RG + r], mn ? mn[b * KILN_RG + r] : 0, block);
            tt->dequantize_row(block, y + (b0 + b) * QK, QK);
        }
    }
}

/* Packed copies are carved one after another from large chunks on transparent huge
 * pages: the kernels stream them, the hardware prefetchers stop at every 4 KiB page,
 * and a model's many small matrices (a few hundred KiB each) would otherwise each sit
 * on 4 KiB pages. Consecutive matrices (one layer's) end up adjacent, too. A chunk is
 * unmapped when its last matrix is freed; only touched pages take memory. */
#define KILN_HUGE ((size_t)2 << 20)
#define KILN_CHUNK ((size_t)64 << 20)

typedef struct kiln_chunk {
    struct kiln_chunk *next;
    uint8_t *base;
    size_t size, used;
    int live; /* allocations not yet freed */
} kiln_chunk;

static pthread_mutex_t kiln_arena_lock = PTHREAD_MUTEX_INITIALIZER;
static kiln_chunk *kiln_chunks;   /* every mapped chunk */
static kiln_chunk *kiln_carving;  /* the chunk new allocations come from */

static kiln_chunk *kiln_chunk_new(size_t size) {
    size = (size + KILN_HUGE - 1) & ~(KILN_HUGE - 1);
    /* over-map by one huge page to align the start */
    uint8_t *raw = mmap(NULL, size + KILN_HUGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    uint8_t *base = (uint8_t *)(((uintptr_t)raw + KILN_HUGE - 1) & ~(uintptr_t)(KILN_HUGE - 1));
    if (base > raw) munmap(raw, (size_t)(base - raw));
    if (base + size < raw + size + KILN_HUGE) munmap(base + size, (size_t)(raw + size + KILN_HUGE - (base + size)));
#ifdef MADV_HUGEPAGE
    madvise(base, size, MADV_HUGEPAGE); /* a hint: failure is fine */
#endif
    kiln_chunk *c = calloc(1, sizeof *c);
    if (!c) {
        munmap(base, size);
        return NULL;
    }
    c->base = base;
    c->size = size;
    c->next = kiln_chunks;
    kiln_chunks = c;
    return c;
}

static void *kiln_alloc_packed(size_t size) {
    size = (size + 63) & ~(size_t)63;
    pthread_mutex_lock(&kiln_arena_lock);
    kiln_chunk *c = kiln_carving;
    if (!c || c->size - c->used < size) {
        c = kiln_chunk_new(size > KILN_CHUNK / 2 ? size : KILN_CHUNK);
        /* a big matrix gets a chunk of its own; small ones keep carving the last chunk */
        if (c && size <= KILN_CHUNK / 2) kiln_carving = c;
    }
    void *p = NULL;
    if (c) {
        p = c->base + c->used;
        c->used += size;
        c->live++;
    }
    pthread_mutex_unlock(&kiln_arena_lock);
    return p;
}

static void kiln_free_packed(void *p) {
    if (!p) return;
    pthread_mutex_lock(&kiln_arena_lock);
    for (kiln_chunk **pc = &kiln_chunks; *pc; pc = &(*pc)->next) {
        kiln_chunk *c = *pc;
        if ((uint8_t *)p < c->base || (uint8_t *)p >= c->base + c->size) continue;
        if (--c->live == 0) {
            *pc = c->next;
            if (kiln_carving == c) kiln_carving = NULL;
            munmap(c->base, c->size);
            free(c);
        }
        break;
    }
    pthread_mutex_unlock(&kiln_arena_lock);
}

int kiln_matrix_init(kiln_matrix *m, int type, int64_t rows, int64_t cols, const void *data) {
    memset(m, 0, sizeof *m);
    const kiln_type_traits *tt = kiln_weight_traits(type);
    if (!tt || rows < 1 || cols < 1 || !data || cols % tt->block_size) return -1;
    m->type = type;
    m->rows = rows;
    m->cols = cols;
    m->data = data;
    if (tt->packed_block_bytes) {
        size_t size = kiln_packed_size(type, rows, cols);
        void *packed = kiln_alloc_packed(size);
        if (!packed) return -1;
        kiln_packed_view v;
        kiln_pack_rows(&v, packed, type, rows, cols, data);
        m->packed = packed;
        m->packed_size = size;
    }
    return 0;
}

void kiln_matrix_free(kiln_matrix *m) {
    if (!m) return;
    kiln_free_packed(m->packed);
    m->packed = NULL;
    m->packed_size = 0;
}

void kiln_quantize_act(const kiln_isa_ops *ops, int wtype, const float *x, int64_t cols,
                       const kiln_act_layout *l, uint8_t *dst, void *scratch) {
    const kiln_type_traits *tt = kiln_weight_traits(wtype);
    assert(tt && (tt->act_type == KILN_TYPE_Q8_0 || tt->act_type == KILN_TYPE_Q8_1));
    const int q8_1 = tt->act_type == KILN_TYPE_Q8_1, offset = tt->act_offset;
    int64_t nb = cols / QK;
    memset(dst, 0, l->size);
    int8_t *qs = (int8_t *)(dst + l->off_qs);
    double *dx = (double *)(dst + l->off_dx);
    int32_t *off = (int32_t *)(dst + l->off_off);
    float *sx = (float *)(dst + l->off_sx);
    if (q8_1) ops->quantize_row_q8_1(x, (block_q8_1 *)scratch, cols);
    else ops->quantize_row_q8_0(x, (block_q8_0 *)scratch, cols);
    for (int64_t ib = 0; ib < nb; ib++) {
        const int8_t *q;
        float d, s = 0.0f;
        if (q8_1) {
            const block_q8_1 *b = (const block_q8_1 *)scratch + ib;
            q = b->qs;
            d = kiln_fp16_to_fp32(b->d);
            s = kiln_fp16_to_fp32(b->s);
        } else {
            const block_q8_0 *b = (const block_q8_0 *)scratch + ib;
            q = b->qs;
            d = kiln_fp16_to_fp32(b->d);
        }
        int64_t g = ib / KILN_KG, b = ib % KILN_KG;
        int8_t *gq = qs + g * KILN_KG * QK;
        memcpy(gq + 16 * b, q, 16);
        memcpy(gq + KILN_KG * 16 + 16 * b, q + 16, 16);
        int32_t sum = 0;
        for (int j = 0; j < QK; j++) sum += q[j];
        size_t lane = (size_t)(g * KILN_KG + b) * 4;
        for (int j = 0; j < 4; j++) {
            dx[lane + j] = d;
            off[lane + j] = -offset * sum;
            sx[lane + j] = s;
        }
    }
}

/* ---- the split over threads ---- */

#define KILN_MULTI_MAX 8

typedef struct {
    const kiln_isa_ops *ops;
    int n;
    const kiln_matrix *const *ws;
    float *const *ys;
    const float *x;
    int64_t cols;
    int n_tokens;
    int64_t units[KILN_MULTI_MAX + 1]; /* prefix sums of row groups over the matrices */
    /* quantized activations: one per distinct layout (activation type and zero point)
     * among the matrices; act_wtype[k] is a weight type that reads layout k */
    int n_acts;
    int act_wtype[KILN_MULTI_MAX];
    uint8_t *act[KILN_MULTI_MAX];
    int act_of[KILN_MULTI_MAX]; /* the layout matrix i reads (quantized weights) */
    kiln_act_layout al;
    block_q8_K *act_k; /* Q8_K activations (n_tokens x cols / QK_K), if a matrix reads them */
    uint8_t *qscratch; /* per thread: cols / QK Q8_1 blocks */
    size_t qscratch_stride;
} kiln_matmul_ctx;

static void kiln_task_quantize(void *p, int ith, int nth) {
    kiln_matmul_ctx *c = p;
    if (c->act_k)
        for (int t = ith; t < c->n_tokens; t += nth)
            c->ops->quantize_row_q8_K(c->x + (size_t)t * c->cols, c->act_k + (size_t)t * (c->cols / QK_K), c->cols);
    for (int k = 0; k < c->n_acts; k++)
        for (int t = ith; t < c->n_tokens; t += nth)
            kiln_quantize_act(c->ops, c->act_wtype[k], c->x + (size_t)t * c->cols, c->cols, &c->al,
                              c->act[k] + (size_t)t * c->al.size,
                              c->qscratch + (size_t)ith * c->qscratch_stride);
}

/* Row groups [rg0, rg1) of matrix i. */
static void kiln_gemm_part(const kiln_matmul_ctx *c, int i, int64_t rg0, int64_t rg1) {
    const kiln_matrix *w = c->ws[i];
    if (w->packed) {
        kiln_qgemm_args q;
        q.w = kiln_packed_view_of(w->type, w->rows, w->cols, w->packed);
        q.act = c->act[c->act_of[i]];
        q.act_stride = c->al.size;
        q.al = c->al;
        q.n_tokens = c->n_tokens;
        q.y = c->ys[i];
        c->ops->qgemm(&q, rg0, rg1);
        return;
    }
    int64_t r0 = rg0 * KILN_RG, r1 = rg1 * KILN_RG < w->rows ? rg1 * KILN_RG : w->rows;
    if (kiln_weight_traits(w->type)->act_type == KILN_TYPE_Q8_K) {
        kiln_kgemm_args k = {w->type, w->rows, w->cols / QK_K, (size_t)kiln_row_size(w->type, w->cols),
                             w->data, c->act_k, c->n_tokens, c->ys[i]};
        c->ops->kgemm(&k, r0, r1);
    } else {
        kiln_fgemm_args f = {w->type, w->rows, w->cols, w->data, c->x, c->n_tokens, c->ys[i]};
        c->ops->fgemm(&f, r0, r1);
    }
}

/* Each thread takes a contiguous share of all the matrices' row groups, in order. */
static void kiln_task_gemm(void *p, int ith, int nth) {
    kiln_matmul_ctx *c = p;
    int64_t u0, u1;
    kiln_share(c->units[c->n], ith, nth, &u0, &u1);
    for (int i = 0; i < c->n && u0 < u1; i++) {
        int64_t lo = c->units[i], hi = c->units[i + 1];
        if (u0 >= hi) continue;
        int64_t end = u1 < hi ? u1 : hi;
        kiln_gemm_part(c, i, u0 - lo, end - lo);
        u0 = end;
    }
}

/* The activation layout matrix type wtype reads, added to c's list if new. */
static int kiln_act_for(kiln_matmul_ctx *c, int wtype) {
    const kiln_type_traits *tt = kiln_weight_traits(wtype);
    for (int k = 0; k < c->n_acts; k++) {
        const kiln_type_traits *tk = kiln_weight_traits(c->act_wtype[k]);
        if (tk->act_type == tt->act_type && tk->act_offset == tt->act_offset) return k;
    }
    c->act_wtype[c->n_acts] = wtype;
    return c->n_acts++;
}

void kiln_matmul_multi(kiln_pool *pool, int n, const kiln_matrix *const *ws, const float *x,
                       int n_tokens, float *const *ys) {
    if (n_tokens < 1 || n < 1) return;
    if (n > KILN_MULTI_MAX) { /* rare: do them in batches */
        kiln_matmul_multi(pool, KILN_MULTI_MAX, ws, x, n_tokens, ys);
        kiln_matmul_multi(pool, n - KILN_MULTI_MAX, ws + KILN_MULTI_MAX, x, n_tokens, ys + KILN_MULTI_MAX);
        return;
    }
    kiln_matmul_ctx c;
    memset(&c, 0, sizeof c);
    c.ops = kiln_ops();
    c.n = n;
    c.ws = ws;
    c.ys = ys;
    c.x = x;
    c.cols = ws[0]->cols;
    c.n_tokens = n_tokens;
    int need_k = 0; /* a matrix reads Q8_K activations */
    for (int i = 0; i < n; i++) {
        assert(ws[i]->cols == c.cols);
        c.units[i + 1] = c.units[i] + (ws[i]->rows + KILN_RG - 1) / KILN_RG;
        if (ws[i]->packed) c.act_of[i] = kiln_act_for(&c, ws[i]->type);
        else if (kiln_weight_traits(ws[i]->type)->act_type == KILN_TYPE_Q8_K) need_k = 1;
    }
    void *buf = NULL;
    if (c.n_acts || need_k) {
        int nth = kiln_pool_size(pool);
        c.al = kiln_act_layout_for(c.cols);
        c.qscratch_stride = ((size_t)(c.cols / QK) * sizeof(block_q8_1) + 63) & ~(size_t)63;
        size_t act_bytes = (size_t)n_tokens * c.al.size;
        size_t k_bytes = need_k ? ((size_t)n_tokens * (size_t)(c.cols / QK_K) * sizeof(block_q8_K) + 63) & ~(size_t)63 : 0;
        size_t need = (size_t)c.n_acts * act_bytes + (size_t)nth * c.qscratch_stride + k_bytes;
        buf = pool ? kiln_pool_scratch(pool, need) : aligned_alloc(64, (need + 63) & ~(size_t)63);
        if (!buf) abort(); /* a few KB to MB: out of memory here leaves nothing sane to do */
        uint8_t *at = buf;
        for (int k = 0; k < c.n_acts; k++, at += act_bytes) c.act[k] = at;
        c.qscratch = at;
        if (need_k) c.act_k = (block_q8_K *)(at + (size_t)nth * c.qscratch_stride);
        if (n_tokens == 1 || nth == 1) kiln_task_quantize(&c, 0, 1); /* not worth a wake-up */
        else kiln_pool_run(pool, kiln_task_quantize, &c);
    }
    kiln_pool_run(pool, kiln_task_gemm, &c);
    if (!pool) free(buf);
}

void kiln_matmul(kiln_pool *pool, const kiln_matrix *w, const float *x, int n_tokens, float *y) {
    kiln_matmul_multi(pool, 1, &w, x, n_tokens, &y);
}

typedef struct {
    const kiln_isa_ops *ops;
    const uint8_t *p;
    size_t n;
    uint64_t sums[KILN_MAX_THREADS];
} kiln_stream_ctx;

static void kiln_task_stream(void *p, int ith, int nth) {
    kiln_stream_ctx *c = p;
    int64_t i0, i1;
    kiln_share((int64_t)(c->n / 64), ith, nth, &i0, &i1);
    c->sums[ith] = c->ops->stream_sum(c->p + i0 * 64, (size_t)(i1 - i0) * 64);
}

uint64_t kiln_stream_read(kiln_pool *pool, const void *p, size_t n) {
    kiln_stream_ctx c;
    memset(&c, 0, sizeof c);
    c.ops = kiln_ops();
    c.p = p;
    c.n = n;
    kiln_pool_run(pool, kiln_task_stream, &c);
    uint64_t s = 0;
    for (int i = 0; i < KILN_MAX_THREADS; i++) s += c.sums[i];
    return s;
}
