/* The reference codecs of every type in the table, under the sanitizers: each row is
 * quantized into a buffer of exactly kiln_row_size bytes and decoded into exactly n
 * floats (ASan catches a codec that strays past its blocks, UBSan its undefined
 * arithmetic on zero, tiny and huge inputs). Bit-exactness is the Python tests' job
 * (tests/test_codecs*.py, against NumPy and ggml); here a decoded row in fp16's range
 * must only be near the input, and an n that is not whole blocks must be refused. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "codecs.h"
#include "harness.h"
#include "type_traits.h"

/* bounded: x is within fp16's normal range, so the decoded row must be near it; otherwise
 * (fp16 underflow or overflow of the scales) only the sanitizers judge */
static void check_row(const kiln_type_traits *tt, const float *x, int64_t n, const char *kind, int bounded) {
    const int64_t bytes = kiln_row_size(tt->type, n);
    uint8_t *q = malloc((size_t)bytes), *q2 = malloc((size_t)bytes);
    float *y = malloc((size_t)n * sizeof *y);
    CHECK(kiln_quantize_row(tt->type, x, q, n) == 0, "kiln_quantize_row", tt->name, "%s n=%lld", kind, (long long)n);
    CHECK(kiln_quantize_row(tt->type, x, q2, n) == 0 && memcmp(q, q2, (size_t)bytes) == 0,
          "kiln_quantize_row deterministic", tt->name, "%s n=%lld", kind, (long long)n);
    CHECK(kiln_dequantize_row(tt->type, q, y, n) == 0, "kiln_dequantize_row", tt->name, "%s", kind);
    float amax = 0.0f, err = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        amax = fmaxf(amax, fabsf(x[i]));
        err = fmaxf(err, fabsf(y[i] - x[i]));
    }
    /* loose enough for 2-bit quants, far below what a misplaced bit or block gives */
    CHECK(!bounded || err <= 0.5f * amax, "codec round trip", tt->name, "%s n=%lld: max error %g, max |x| %g",
          kind, (long long)n, (double)err, (double)amax);
    free(q), free(q2), free(y);
}

void test_codecs(void) {
    for (int k = 0; kiln_type_traits_at(k); k++) {
        const kiln_type_traits *tt = kiln_type_traits_at(k);
        const int64_t bs = tt->block_size;
        for (int64_t nb = 1; nb <= 3; nb++) {
            const int64_t n = nb * (bs > 1 ? bs : 37);
            float *x = malloc((size_t)n * sizeof *x);
            rnd_floats(x, (size_t)n, 1.0f);
            check_row(tt, x, n, "random", 1);
            rnd_floats(x, (size_t)n, 1e4f);
            check_row(tt, x, n, "large", 1);
            for (int64_t i = 0; i < n; i++) x[i] = 0.0f;
            check_row(tt, x, n, "zeros", 1);
            for (int64_t i = 0; i < n; i++) x[i] = (i % 3 ? 1e-30f : -1e-38f) * (float)(i % 7);
            check_row(tt, x, n, "tiny", 0);
            for (int64_t i = 0; i < n; i++) x[i] = (i % 2 ? 3e5f : -1e-20f) * (float)(i % 5);
            check_row(tt, x, n, "huge range", 0);
            free(x);
        }
        if (bs > 1) {
            float x[QK_K + 16] = {0};
            uint8_t q[4096];
            CHECK(kiln_quantize_row(tt->type, x, q, bs + 16) == -1, "kiln_quantize_row", tt->name,
                  "n = %lld, not whole blocks, refused", (long long)(bs + 16));
            CHECK(kiln_dequantize_row(tt->type, q, x, bs + 16) == -1, "kiln_dequantize_row", tt->name,
                  "n = %lld, not whole blocks, refused", (long long)(bs + 16));
        }
    }
}
