/* What the harness's test files share: failure reporting, a reproducible random
 * source, the per-variant function tables and the test groups (test_kernels.c holds
 * main and the matrix tests, test_isa_ops.c the other kernels of the table,
 * test_codecs.c the reference codecs,
 * test_forward.c the forward pass of a tiny model). */
#ifndef KILN_TEST_HARNESS_H
#define KILN_TEST_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"
#include "kernels_impl.h"

extern int n_failed, n_checked;

/* One line per failure: FAIL <what> [<variant>] <details>. */
void fail(const char *what, const char *isa, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Counts a check; a false cond is a failure of `what` on variant isa. */
#define CHECK(cond, what, isa, ...)                          \
    do {                                                     \
        n_checked++;                                         \
        if (!(cond)) fail(what, isa, __VA_ARGS__);           \
    } while (0)

/* got and want, n elements of elem_size bytes (4: printed as floats, 8: doubles), must
 * be the same bits; otherwise one failure naming the first differing element and the
 * count. where: the size, in words. Returns 1 when equal. */
int check_bits(const char *what, const char *isa, const void *got, const void *want, size_t n,
               size_t elem_size, const char *where);

/* Reproducible random numbers (xorshift), independent of libc's rand. */
uint64_t rnd(void);
int rnd_int(int lo, int hi);
float rnd_unit(void); /* uniform in [-1, 1) */
void rnd_floats(float *x, size_t n, float scale);

/* The function table of a variant this CPU runs, and the one the kernels dispatch to
 * from now on (kiln_set_isa); aborts if the CPU or build lacks it. */
const kiln_isa_ops *use_isa(const char *isa);

/* KILN_TEST_SMALL=1 (the qemu run): fewer and smaller sizes. */
extern int small_sizes;

/* The test groups: variant isa against scalar; the forward pass of every variant in
 * isas (isas[0] = scalar) at once, so scalar's logits are computed once. */
void test_isa_ops(const char *isa);
void test_codecs(void); /* the table's reference codecs (test_codecs.c) */
/* The super-block kernels and the Q8_K quantizer (test_kgemm.c); is_k_type: a weight
 * type with Q8_K activations, which the other matrix tests leave to it. */
void test_kgemm(const char *isa);
int is_k_type(int type);
void test_forward(const char *const *isas, int n_isas);

#endif
