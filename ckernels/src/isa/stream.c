/* A plain streaming read (sum of 64-bit words with the variant's widest loads): the
 * memory-bandwidth yardstick tools/bench_kernels.py puts next to the matmul figures.
 * Every variant returns the same sum: the 64-bit words, then the trailing bytes. */
#include <string.h>

#include "isa.h"
#include "kernels_impl.h"

/* The words and bytes from i on, as the scalar variant sums them. */
static inline uint64_t stream_tail(const uint8_t *b, size_t i, size_t n) {
    uint64_t s = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, b + i, 8);
        s += w;
    }
    for (; i < n; i++) s += b[i];
    return s;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
uint64_t KILN_FN(kiln_stream_sum)(const void *p, size_t n) {
    const uint8_t *b = p;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 256 <= n; i += 256) {
        s0 = _mm512_add_epi64(s0, _mm512_loadu_si512(b + i));
        s1 = _mm512_add_epi64(s1, _mm512_loadu_si512(b + i + 64));
        s2 = _mm512_add_epi64(s2, _mm512_loadu_si512(b + i + 128));
        s3 = _mm512_add_epi64(s3, _mm512_loadu_si512(b + i + 192));
    }
    /* Summed as unsigned words: _mm512_reduce_add_epi64 adds signed 64-bit lanes, whose
     * wrap-around is undefined behaviour (UBSan stops on it). */
    uint64_t lanes[8], s = 0;
    _mm512_storeu_si512(lanes, _mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
    for (int l = 0; l < 8; l++) s += lanes[l];
    return s + stream_tail(b, i, n);
}
#elif defined(__AVX2__)
#include <immintrin.h>
uint64_t KILN_FN(kiln_stream_sum)(const void *p, size_t n) {
    const uint8_t *b = p;
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 128 <= n; i += 128) {
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i *)(b + i)));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256((const __m256i *)(b + i + 32)));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256((const __m256i *)(b + i + 64)));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256((const __m256i *)(b + i + 96)));
    }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
    return lanes[0] + lanes[1] + lanes[2] + lanes[3] + stream_tail(b, i, n);
}
#else
uint64_t KILN_FN(kiln_stream_sum)(const void *p, size_t n) { return stream_tail(p, 0, n); }
#endif
