/* Persistent worker threads. A forward pass issues hundreds of small matmuls per
 * token, so waking the workers must cost far less than a condition-variable round
 * trip: workers spin on a generation counter for a while after each task (the next
 * task usually follows within microseconds) and only then sleep on a condvar. The
 * caller's thread is worker 0 and spins until the others report done. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "kernels.h"
#include "kernels_impl.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define kiln_cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define kiln_cpu_relax() __asm__ __volatile__("yield")
#else
#define kiln_cpu_relax() ((void)0)
#endif

/* Spin iterations before a worker sleeps (~ tens of microseconds) and before the
 * caller starts yielding its core while waiting. */
#define KILN_SPIN_WORKER 20000
#define KILN_SPIN_CALLER 2000

struct kiln_pool {
    int n_threads;
    pthread_t *threads;
    kiln_task_fn fn;
    void *ctx;
    /* generation: bumped once per task; workers run a task when it changes */
    _Atomic unsigned gen;
    _Atomic int n_done;   /* workers (not the caller) finished with the current task */
    _Atomic int n_asleep; /* workers blocked on wake */
    _Atomic int quit;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    /* scratch for the caller's kernels (activations quantized once per matmul) */
    void *scratch;
    size_t scratch_size;
};

typedef struct {
    kiln_pool *pool;
    int ith;
} kiln_worker_arg;

static void *kiln_worker_main(void *p) {
    kiln_worker_arg arg = *(kiln_worker_arg *)p;
    free(p);
    kiln_pool *pool = arg.pool;
    unsigned seen = 0;
    for (;;) {
        unsigned g;
        int spins = 0;
        while ((g = atomic_load_explicit(&pool->gen, memory_order_acquire)) == seen) {
            if (++spins < KILN_SPIN_WORKER) {
                kiln_cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool->lock);
            atomic_fetch_add(&pool->n_asleep, 1);
            /* re-check under the lock: kiln_pool_run bumps gen before taking it */
            while (atomic_load(&pool->gen) == seen)
                pthread_cond_wait(&pool->wake, &pool->lock);
            atomic_fetch_sub(&pool->n_asleep, 1);
            pthread_mutex_unlock(&pool->lock);
            spins = 0;
        }
        seen = g;
        if (atomic_load_explicit(&pool->quit, memory_order_acquire)) return NULL;
        pool->fn(pool->ctx, arg.ith, pool->n_threads);
        atomic_fetch_add_explicit(&pool->n_done, 1, memory_order_release);
    }
}

kiln_pool *kiln_pool_create(int n_threads) {
    if (n_threads < 1 || n_threads > KILN_MAX_THREADS) return NULL;
    kiln_pool *pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->n_threads = n_threads;
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pool->threads = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!pool->threads) {
        free(pool);
        return NULL;
    }
    for (int i = 1; i < n_threads; i++) {
        kiln_worker_arg *arg = malloc(sizeof *arg);
        if (arg) {
            arg->pool = pool;
            arg->ith = i;
        }
        if (!arg || pthread_create(&pool->threads[i], NULL, kiln_worker_main, arg) != 0) {
            free(arg);
            pool->n_threads = i; /* free() joins the ones that started */
            kiln_pool_free(pool);
            return NULL;
        }
    }
    return pool;
}

/* Wakes workers for a new generation (those asleep need the condvar). */
static void kiln_pool_publish(kiln_pool *pool) {
    atomic_fetch_add_explicit(&pool->gen, 1, memory_order_acq_rel);
    if (atomic_load(&pool->n_asleep) > 0) {
        pthread_mutex_lock(&pool->lock);
        pthread_cond_broadcast(&pool->wake);
        pthread_mutex_unlock(&pool->lock);
    }
}

void kiln_pool_free(kiln_pool *pool) {
    if (!pool) return;
    atomic_store(&pool->quit, 1);
    kiln_pool_publish(pool);
    for (int i = 1; i < pool->n_threads; i++) pthread_join(pool->threads[i], NULL);
    pthread_mutex_destroy(&pool->lock);
    pthread_cond_destroy(&pool->wake);
    free(pool->threads);
    free(pool->scratch);
    free(pool);
}

void *kiln_pool_scratch(kiln_pool *pool, size_t size) {
    if (size <= pool->scratch_size) return pool->scratch;
    free(pool->scratch);
    size = (size + 4095) & ~(size_t)4095;
    pool->scratch = aligned_alloc(64, size);
    pool->scratch_size = pool->scratch ? size : 0;
    return pool->scratch;
}

int kiln_pool_size(const kiln_pool *pool) { return pool ? pool->n_threads : 1; }

void kiln_pool_run(kiln_pool *pool, kiln_task_fn fn, void *ctx) {
    if (!pool || pool->n_threads == 1) {
        fn(ctx, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store_explicit(&pool->n_done, 0, memory_order_relaxed);
    kiln_pool_publish(pool); /* release: fn, ctx, n_done are visible to workers */
    fn(ctx, 0, pool->n_threads);
    int spins = 0;
    while (atomic_load_explicit(&pool->n_done, memory_order_acquire) < pool->n_threads - 1) {
        /* on an oversubscribed machine a descheduled worker needs our core */
        if (++spins < KILN_SPIN_CALLER) kiln_cpu_relax();
        else sched_yield();
    }
}
