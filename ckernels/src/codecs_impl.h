/* Private to the scalar codecs (codecs.c, codecs_k.c, codecs_iq.c): what they share so
 * that they round as ggml's reference quantizers and NumPy's formats/ do. */
#ifndef KILN_CODECS_IMPL_H
#define KILN_CODECS_IMPL_H

/* Every product and sum rounds on its own (e.g. x*id + 8.5f rounds twice), as in ggml
 * and NumPy: never fused into an FMA (arm64 has FMA in its baseline, and GCC contracts
 * by default in gnu11 mode); it applies to the functions defined after the include. */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* ggml's threshold: a group whose largest |x| is below it is quantized as all zero
 * (formats/_blocks.py's GROUP_MAX_EPS) */
#define GROUP_MAX_EPS 1e-15f

#endif
