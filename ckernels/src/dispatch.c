/* Run-time choice of the ISA variant: the best one this CPU (and OS) supports among
 * those built in, or the one KILN_ISA names. Chosen once, on first use. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "kernels_impl.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define KILN_X86 1
#elif defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#define KILN_ARM64_LINUX 1
#endif

/* Every variant's table, in isa/ops.c compiled once per variant. */
extern const kiln_isa_ops kiln_ops_scalar;
#ifdef KILN_HAVE_AVX2
extern const kiln_isa_ops kiln_ops_avx2;
#endif
#ifdef KILN_HAVE_AVXVNNI
extern const kiln_isa_ops kiln_ops_avxvnni;
#endif
#ifdef KILN_HAVE_AVX512VNNI
extern const kiln_isa_ops kiln_ops_avx512vnni;
#endif
#ifdef KILN_HAVE_AMX
extern const kiln_isa_ops kiln_ops_amx;
#endif
#ifdef KILN_HAVE_NEON
extern const kiln_isa_ops kiln_ops_neon;
#endif

/* Built variants, worst first, each with its CPU check. */
typedef struct {
    const kiln_isa_ops *ops;
    int (*cpu_has)(void);
} kiln_variant;

static int kiln_cpu_any(void) { return 1; }

#ifdef KILN_X86
static unsigned long long kiln_xgetbv0(void) {
    unsigned lo, hi;
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

/* AVX state enabled by the OS (XCR0 bits 1, 2), and the AVX-512 state (bits 5-7). */
static int kiln_os_avx(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    if (!(c & (1u << 27))) return 0; /* OSXSAVE */
    return (kiln_xgetbv0() & 0x6) == 0x6;
}
static int kiln_os_avx512(void) { return kiln_os_avx() && (kiln_xgetbv0() & 0xe6) == 0xe6; }

static int kiln_cpu_avx2(void) {
    unsigned a, b, c, d;
    if (!kiln_os_avx()) return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int fma_f16c_avx = (c & (1u << 12)) && (c & (1u << 29)) && (c & (1u << 28));
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return fma_f16c_avx && (b & (1u << 5));
}
static int kiln_cpu_avx512vnni(void);
static int kiln_cpu_avxvnni(void) {
#ifdef KILN_AVXVNNI_VIA_EVEX /* tests/c: that variant built with EVEX encodings */
    return kiln_cpu_avx512vnni();
#endif
    unsigned a, b, c, d;
    if (!kiln_cpu_avx2()) return 0;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return 0;
    return (a >> 4) & 1;
}
static int kiln_cpu_avx512vnni(void) {
    unsigned a, b, c, d;
    if (!kiln_cpu_avx2() || !kiln_os_avx512()) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    unsigned need_b = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31); /* F DQ BW VL */
    return (b & need_b) == need_b && (c & (1u << 11));                   /* VNNI */
}
/* AVX512-VNNI plus AMX-TILE and AMX-INT8, their tile state enabled by the OS (XCR0 bits
 * 17, 18), and Linux's permission to use it: the tile data state is granted per
 * process on request (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); without
 * it the first tile instruction faults. Idempotent, so asking on every check is safe. */
static int kiln_cpu_amx(void) {
    unsigned a, b, c, d;
    if (!kiln_cpu_avx512vnni()) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!((d >> 24) & 1) || !((d >> 25) & 1)) return 0; /* AMX-TILE, AMX-INT8 */
    if ((kiln_xgetbv0() & (3ull << 17)) != (3ull << 17)) return 0;
#if defined(__linux__) && defined(SYS_arch_prctl)
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
    return 0;
#endif
}
#endif

#ifdef KILN_ARM64_LINUX
static int kiln_cpu_neon(void) {
    unsigned long hw = getauxval(AT_HWCAP);
    /* HWCAP_ASIMDHP (bit 10) for the fp16 conversions, HWCAP_ASIMDDP (bit 20) for sdot */
    return (hw & (1ul << 10)) && (hw & (1ul << 20));
}
#endif

static const kiln_variant kiln_variants[] = {
    {&kiln_ops_scalar, kiln_cpu_any},
#if defined(KILN_HAVE_AVX2) && defined(KILN_X86)
    {&kiln_ops_avx2, kiln_cpu_avx2},
#endif
#if defined(KILN_HAVE_AVXVNNI) && defined(KILN_X86)
    {&kiln_ops_avxvnni, kiln_cpu_avxvnni},
#endif
#if defined(KILN_HAVE_AVX512VNNI) && defined(KILN_X86)
    {&kiln_ops_avx512vnni, kiln_cpu_avx512vnni},
#endif
#if defined(KILN_HAVE_AMX) && defined(KILN_X86)
    {&kiln_ops_amx, kiln_cpu_amx},
#endif
#if defined(KILN_HAVE_NEON) && defined(KILN_ARM64_LINUX)
    {&kiln_ops_neon, kiln_cpu_neon},
#endif
};
#define KILN_N_VARIANTS ((int)(sizeof kiln_variants / sizeof kiln_variants[0]))

static _Atomic(const kiln_isa_ops *) kiln_active;
static pthread_once_t kiln_once = PTHREAD_ONCE_INIT;

static const kiln_isa_ops *kiln_find(const char *name) {
    for (int i = 0; i < KILN_N_VARIANTS; i++)
        if (strcmp(kiln_variants[i].ops->name, name) == 0 && kiln_variants[i].cpu_has())
            return kiln_variants[i].ops;
    return NULL;
}

static void kiln_choose(void) {
    const char *env = getenv("KILN_ISA");
    if (env && *env) {
        const kiln_isa_ops *ops = kiln_find(env);
        if (!ops) {
            /* the Python package checks this first and raises; C users get this */
            fprintf(stderr, "kiln: KILN_ISA=%s is not supported by this CPU or build; "
                            "supported:", env);
            for (int i = 0; i < KILN_N_VARIANTS; i++)
                if (kiln_variants[i].cpu_has()) fprintf(stderr, " %s", kiln_variants[i].ops->name);
            fprintf(stderr, "\n");
            abort();
        }
        atomic_store(&kiln_active, ops);
        return;
    }
    const kiln_isa_ops *best = &kiln_ops_scalar;
    for (int i = 0; i < KILN_N_VARIANTS; i++)
        if (kiln_variants[i].cpu_has()) best = kiln_variants[i].ops;
    atomic_store(&kiln_active, best);
}

const kiln_isa_ops *kiln_ops(void) {
    const kiln_isa_ops *ops = atomic_load_explicit(&kiln_active, memory_order_acquire);
    if (ops) return ops;
    pthread_once(&kiln_once, kiln_choose);
    return atomic_load(&kiln_active);
}

const char *kiln_active_isa(void) { return kiln_ops()->name; }

void kiln_attn_scores_f16(int R, double *scores, const float *const *q, const kiln_fp16 *keys_t,
                          int n_keys, int head_dim, int n_ctx_pad, double scale) {
    kiln_ops()->attn_scores_f16(R, scores, q, keys_t, n_keys, head_dim, n_ctx_pad, scale);
}

void kiln_attn_values_f16(int R, float *const *out, double *const *dout, const double *weights,
                          const kiln_fp16 *values, int n_keys, int head_dim, int stride,
                          int n_ctx_pad) {
    kiln_ops()->attn_values_f16(R, out, dout, weights, values, n_keys, head_dim, stride, n_ctx_pad);
}

double kiln_exp_shifted_f64(double *a, int n, double *max_out) {
    return kiln_ops()->exp_shifted_f64(a, n, max_out);
}

void kiln_softmax_f64(double *a, int n) { kiln_ops()->softmax_f64(a, n); }

void kiln_swiglu_f32(float *gate, const float *up, size_t n) { kiln_ops()->swiglu_f32(gate, up, n); }

/* Every variant of every architecture in isa_variants.h, in its order (a name listed
 * for several architectures, like scalar, once). */
static const char *const kiln_variant_names[] = {
#define KILN_VARIANT(arch, name, flags) #name,
#include "isa_variants.h"
#undef KILN_VARIANT
};

int kiln_known_isas(const char **names, int max_names) {
    int n = 0;
    for (size_t i = 0; i < sizeof kiln_variant_names / sizeof kiln_variant_names[0]; i++) {
        int seen = 0;
        for (size_t j = 0; j < i; j++) seen |= strcmp(kiln_variant_names[i], kiln_variant_names[j]) == 0;
        if (seen) continue;
        if (n < max_names) names[n] = kiln_variant_names[i];
        n++;
    }
    return n;
}

int kiln_supported_isas(const char **names, int max_names) {
    int n = 0;
    for (int i = 0; i < KILN_N_VARIANTS; i++)
        if (kiln_variants[i].cpu_has()) {
            if (n < max_names) names[n] = kiln_variants[i].ops->name;
            n++;
        }
    return n;
}

int kiln_set_isa(const char *name) {
    const kiln_isa_ops *ops = kiln_find(name);
    if (!ops) return -1;
    pthread_once(&kiln_once, kiln_choose); /* so a later first use does not override */
    atomic_store(&kiln_active, ops);
    return 0;
}
