/* Softmax and SwiGLU, in double: float-only code, compiled per ISA like the rest so the
 * wider vector units run it (and KILN_ISA=scalar makes it scalar). With
 * -ffp-contract=off and reductions left in source order, every variant computes the
 * same operations in the same order, so the results are the same bits. */
#include <math.h>
#include <string.h>

#include "isa.h"
#include "kernels_impl.h"

/* e^x in double, within a few ulp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2,
 * then the degree-12 Taylor polynomial of e^r (its remainder is below 2e-16). Written
 * without libm calls or branches so that the loops using it vectorize. Inputs are
 * clamped to [-708, 709], where 2^n is a normal double: e^-708 stands in for anything
 * smaller, which is 0 for every use here once rounded to float. */
static inline __attribute__((always_inline)) double exp_f64(double x) {
    x = x < -708.0 ? -708.0 : x > 709.0 ? 709.0 : x;
    const double round = 0x1.8p52; /* adding it rounds to an integer */
    double n = (x * 1.4426950408889634 + round) - round;
    double r = (x - n * 0x1.62e42fee00000p-1) - n * 0x1.a39ef35793c76p-33;
    double p = 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    /* 2^n: n + 1023 sits in the low mantissa bits of n + 2^52 + 1023 */
    double biased = n + (0x1p52 + 1023.0);
    uint64_t bits;
    memcpy(&bits, &biased, sizeof bits);
    bits <<= 52;
    double scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The largest of a[0 .. n) that is not NaN (-inf if none). Any order gives the same
 * value (a zero's sign aside, which no use of the maximum can tell), so it runs in
 * KILN_MAX_LANES independent lanes that vectorize: a single chain of compares was
 * latency-bound, 40% of kiln_exp_shifted_f64's time. */
#define KILN_MAX_LANES 16
static inline double max_f64(const double *a, int n) {
    double lane[KILN_MAX_LANES];
    for (int j = 0; j < KILN_MAX_LANES; j++) lane[j] = -INFINITY;
    int p = 0;
    for (; p + KILN_MAX_LANES <= n; p += KILN_MAX_LANES)
        for (int j = 0; j < KILN_MAX_LANES; j++) lane[j] = a[p + j] > lane[j] ? a[p + j] : lane[j];
    double max = -INFINITY;
    for (int j = 0; j < KILN_MAX_LANES; j++) max = lane[j] > max ? lane[j] : max;
    for (; p < n; p++) max = a[p] > max ? a[p] : max;
    return max;
}

/* The sum of a[0 .. n) in a fixed order that does not depend on the ISA: lane j of
 * KILN_MAX_LANES sums a[j], a[j + LANES], ... in turn, the lanes are added 0, 1, ...,
 * then the tail in order. Independent lanes, where one chain of adds was latency-bound
 * (4 cycles an element); every variant runs this same code, so the same bits. */
static inline double sum_f64(const double *a, int n) {
    double lane[KILN_MAX_LANES];
    for (int j = 0; j < KILN_MAX_LANES; j++) lane[j] = 0.0;
    int p = 0;
    for (; p + KILN_MAX_LANES <= n; p += KILN_MAX_LANES)
        for (int j = 0; j < KILN_MAX_LANES; j++) lane[j] += a[p + j];
    double sum = 0.0;
    for (int j = 0; j < KILN_MAX_LANES; j++) sum += lane[j];
    for (; p < n; p++) sum += a[p];
    return sum;
}

double KILN_FN(kiln_exp_shifted_f64)(double *a, int n, double *max_out) {
    double max = max_f64(a, n);
    for (int p = 0; p < n; p++) a[p] = exp_f64(a[p] - max);
    *max_out = max;
    return sum_f64(a, n);
}

void KILN_FN(kiln_softmax_f64)(double *a, int n) {
    double max, inv_sum = 1.0 / KILN_FN(kiln_exp_shifted_f64)(a, n, &max);
    for (int p = 0; p < n; p++) a[p] *= inv_sum;
}

void KILN_FN(kiln_swiglu_f32)(float *gate, const float *up, size_t n) {
    for (size_t i = 0; i < n; i++) {
        double g = gate[i];
        gate[i] = (float)(g / (1.0 + exp_f64(-g)) * up[i]);
    }
}
