/* INTERIM, until the kcodecs branch's codecs_k.c is merged (delete this file then):
 * the scalar Q8_K quantizer, ggml's quantize_row_q8_K_ref, so the kernels build and
 * are tested on their own. */
#include <math.h>
#include <string.h>

#include "ggml_types.h"

void kiln_quantize_row_q8_K(const float *x, block_q8_K *y, int64_t n);

void kiln_quantize_row_q8_K(const float *x, block_q8_K *y, int64_t n) {
    for (int64_t i = 0; i < n / QK_K; i++, x += QK_K) {
        float max = 0.0f, amax = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        memset(&y[i], 0, sizeof y[i]);
        if (!amax) continue;
        const float iscale = -127.f / max;
        for (int j = 0; j < QK_K; j++) {
            int v = (int)nearbyintf(iscale * x[j]);
            y[i].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int c = 0; c < QK_K / 16; c++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) sum += y[i].qs[16 * c + j];
            y[i].bsums[c] = (int16_t)sum;
        }
        y[i].d = 1 / iscale;
    }
}
