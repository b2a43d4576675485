/* Scalar reference codecs of the K types, step for step ggml's quantize_row_*_ref and
 * dequantize_row_* (their scale searches included), so results are bit-exact with ggml
 * and with formats/kquants.py, which documents the searches. */
#include <math.h>
#include <string.h>
#include "codecs_k.h"
#include "codecs_impl.h"

/* The first value of largest magnitude, with its sign; *amax its magnitude (0 if none). */
static float signed_absmax(int n, const float *x, float *amax_out) {
    float amax = 0, max = 0;
    for (int i = 0; i < n; i++) {
        const float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    *amax_out = amax;
    return max;
}

/* Scale and min of an affine sub-block (x ~ scale * L - min, L in 0..nmax) by weighted
 * least squares over nstep + 1 trial scales (ggml's make_qkx2_quants). */
static float make_qkx2_quants(int n, int nmax, const float *x, const float *w, uint8_t *L,
                              float *the_min, uint8_t *Laux, float rmin, float rdelta,
                              int nstep, int use_mad) {
    float min = x[0], max = x[0];
    float sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        memset(L, 0, (size_t)n);
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; i++) {
        const int l = kiln_nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)MAX(0, MIN(nmax, l));
        float diff = scale * L[i] + min - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best_error += w[i] * diff;
    }
    for (int is = 0; is <= nstep; is++) {
        /* min moves with each accepted trial: the next one scales from the new min */
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = kiln_nearest_int(iscale * (x[i] - min));
            l = MAX(0, MIN(nmax, l));
            Laux[i] = (uint8_t)l;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = use_mad ? fabsf(diff) : diff * diff;
                cur_error += w[i] * diff;
            }
            if (cur_error < best_error) {
                memcpy(L, Laux, (size_t)n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* Symmetric scale of a sub-block, L in 0..2nmax-1, by coordinate descent on the quants
 * with weights x^2 (ggml's make_q3_quants with do_rmse). */
static float make_q3_quants(int n, int nmax, const float *x, int8_t *L) {
    float amax;
    const float max = signed_absmax(n, x, &amax);
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    const float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = kiln_nearest_int(iscale * x[i]);
        l = MAX(-nmax, MIN(nmax - 1, l));
        L[i] = (int8_t)l;
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; itry++) {
        int n_changed = 0;
        for (int i = 0; i < n; i++) {
            const float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * L[i] * L[i];
                int new_l = kiln_nearest_int(x[i] * sl2 / slx);
                new_l = MAX(-nmax, MIN(nmax - 1, new_l));
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed++;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < n; i++) L[i] = (int8_t)(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* Symmetric scale of a sub-block, L in 0..2nmax-1: the best of 19 trial scales by least
 * squares with weights x^2 (ggml's make_qx_quants, rmse_type 1, no importance). */
static float make_qx_quants(int n, int nmax, const float *x, int8_t *L) {
    float amax;
    const float max = signed_absmax(n, x, &amax);
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = kiln_nearest_int(iscale * x[i]);
        l = MAX(-nmax, MIN(nmax - 1, l));
        L[i] = (int8_t)(l + nmax);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            int l = kiln_nearest_int(iscale * x[i]);
            l = MAX(-nmax, MIN(nmax - 1, l));
            const float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++) {
                const int l = kiln_nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + MAX(-nmax, MIN(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Quants 0..3 of 256 elements into 64 bytes: per 128 elements, byte l holds elements l,
 * l + 32, l + 64, l + 96 at bits 0, 2, 4, 6 (Q2_K, Q3_K). */
static void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < QK_K; j += 128)
        for (int l = 0; l < 32; l++)
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

void kiln_quantize_row_q2_K(const float *x, block_q2_K *y, int64_t n) {
    const int64_t nb = n / QK_K;
    uint8_t L[QK_K], Laux[16];
    float w[16], mins[QK_K / 16], scales[QK_K / 16];
    const float q4scale = 15.f;
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < QK_K / 16; j++) {
            for (int l = 0; l < 16; l++) w[l] = fabsf(x[16 * j + l]);
            scales[j] = make_qkx2_quants(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], Laux, -0.5f, 0.1f, 15, 1);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        /* each 4-bit scale and min is stored through a byte, as ggml's truncating stores */
        if (max_scale > 0) {
            const float iscale = q4scale / max_scale;
            for (int j = 0; j < QK_K / 16; j++) y[i].scales[j] = (uint8_t)kiln_nearest_int(iscale * scales[j]);
            y[i].d = kiln_fp32_to_fp16(max_scale / q4scale);
        } else {
            memset(y[i].scales, 0, sizeof y[i].scales);
            y[i].d = kiln_fp32_to_fp16(0.f);
        }
        if (max_min > 0) {
            const float iscale = q4scale / max_min;
            for (int j = 0; j < QK_K / 16; j++)
                y[i].scales[j] |= (uint8_t)((unsigned)kiln_nearest_int(iscale * mins[j]) << 4);
            y[i].dmin = kiln_fp32_to_fp16(max_min / q4scale);
        } else {
            y[i].dmin = kiln_fp32_to_fp16(0.f);
        }
        /* requantize with the stored scales; a sub-block of scale 0 keeps the search's */
        for (int j = 0; j < QK_K / 16; j++) {
            const float d = kiln_fp16_to_fp32(y[i].d) * (y[i].scales[j] & 0xF);
            if (!d) continue;
            const float dm = kiln_fp16_to_fp32(y[i].dmin) * (y[i].scales[j] >> 4);
            for (int ii = 0; ii < 16; ii++) {
                const int l = kiln_nearest_int((x[16 * j + ii] + dm) / d);
                L[16 * j + ii] = (uint8_t)MAX(0, MIN(3, l));
            }
        }
        pack_2bit(L, y[i].qs);
    }
}

void kiln_quantize_row_q3_K(const float *x, block_q3_K *y, int64_t n) {
    const int64_t nb = n / QK_K;
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        for (int j = 0; j < QK_K / 16; j++) scales[j] = make_q3_quants(16, 4, x + 16 * j, L + 16 * j);
        float amax;
        const float max_scale = signed_absmax(QK_K / 16, scales, &amax);
        memset(y[i].scales, 0, sizeof y[i].scales);
        if (max_scale) {
            const float iscale = -32.f / max_scale;
            for (int j = 0; j < QK_K / 16; j++) {
                int8_t l = (int8_t)kiln_nearest_int(iscale * scales[j]);
                l = (int8_t)(MAX(-32, MIN(31, l)) + 32);
                if (j < 8)
                    y[i].scales[j] = l & 0xF;
                else
                    y[i].scales[j - 8] |= (uint8_t)((l & 0xF) << 4);
                y[i].scales[j % 4 + 8] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
            }
            y[i].d = kiln_fp32_to_fp16(1 / iscale);
        } else {
            y[i].d = kiln_fp32_to_fp16(0.f);
        }
        for (int j = 0; j < QK_K / 16; j++) {
            const float d = kiln_fp16_to_fp32(y[i].d) * (kiln_scale_q3(j, y[i].scales) - 32);
            if (!d) continue;
            for (int ii = 0; ii < 16; ii++) {
                const int l = kiln_nearest_int(x[16 * j + ii] / d);
                L[16 * j + ii] = (int8_t)(MAX(-4, MIN(3, l)) + 4);
            }
        }
        /* the third bit of element j goes to bit j / 32 of hmask[j % 32] */
        memset(y[i].hmask, 0, sizeof y[i].hmask);
        uint8_t low[QK_K];
        for (int j = 0; j < QK_K; j++) {
            low[j] = (uint8_t)L[j];
            if (L[j] > 3) {
                y[i].hmask[j % 32] |= (uint8_t)(1u << (j / 32));
                low[j] = (uint8_t)(L[j] - 4);
            }
        }
        pack_2bit(low, y[i].qs);
    }
}

/* Q4_K and Q5_K: 8 sub-blocks of 32, weights rms + |x|, 6-bit scales and mins packed as
 * kiln_scale_min_k4 reads them; the final quants (0..nmax) in L. */
static void quantize_q45_K(const float *x, kiln_fp16 *d_out, kiln_fp16 *dmin_out, uint8_t *sc12,
                           uint8_t *L, int nmax, float rmin, int nstep) {
    uint8_t Laux[32];
    float w[32], mins[QK_K / 32], scales[QK_K / 32];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < QK_K / 32; j++) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; l++) sum_x2 += x[32 * j + l] * x[32 * j + l];
        const float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; l++) w[l] = av_x + fabsf(x[32 * j + l]);
        scales[j] = make_qkx2_quants(32, nmax, x + 32 * j, w, L + 32 * j, &mins[j], Laux, rmin, 0.1f, nstep, 0);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < QK_K / 32; j++) {
        /* stored through a byte (truncating, as ggml's), then clamped */
        uint8_t ls = (uint8_t)kiln_nearest_int(inv_scale * scales[j]);
        uint8_t lm = (uint8_t)kiln_nearest_int(inv_min * mins[j]);
        ls = MIN(63, ls);
        lm = MIN(63, lm);
        if (j < 4) {
            sc12[j] = ls;
            sc12[j + 4] = lm;
        } else {
            sc12[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
            sc12[j - 4] |= (uint8_t)((ls >> 4) << 6);
            sc12[j] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    *d_out = kiln_fp32_to_fp16(max_scale / 63.f);
    *dmin_out = kiln_fp32_to_fp16(max_min / 63.f);
    for (int j = 0; j < QK_K / 32; j++) {
        uint8_t sc, m;
        kiln_scale_min_k4(j, sc12, &sc, &m);
        const float d = kiln_fp16_to_fp32(*d_out) * sc;
        if (!d) continue;
        const float dm = kiln_fp16_to_fp32(*dmin_out) * m;
        for (int ii = 0; ii < 32; ii++) {
            const int l = kiln_nearest_int((x[32 * j + ii] + dm) / d);
            L[32 * j + ii] = (uint8_t)MAX(0, MIN(nmax, l));
        }
    }
}

void kiln_quantize_row_q4_K(const float *x, block_q4_K *y, int64_t n) {
    const int64_t nb = n / QK_K;
    uint8_t L[QK_K];
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        quantize_q45_K(x, &y[i].d, &y[i].dmin, y[i].scales, L, 15, -1.f, 20);
        /* per 64 elements: element l in the low nibble of byte l, l + 32 in the high */
        for (int j = 0; j < QK_K; j += 64)
            for (int l = 0; l < 32; l++) y[i].qs[j / 2 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
    }
}

void kiln_quantize_row_q5_K(const float *x, block_q5_K *y, int64_t n) {
    const int64_t nb = n / QK_K;
    uint8_t L[QK_K];
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        quantize_q45_K(x, &y[i].d, &y[i].dmin, y[i].scales, L, 31, -0.5f, 15);
        /* as Q4_K's nibbles, the fifth bit of element e at bit e / 32 of qh[e % 32] */
        memset(y[i].qh, 0, sizeof y[i].qh);
        for (int j = 0; j < QK_K; j++) {
            if (L[j] > 15) y[i].qh[j % 32] |= (uint8_t)(1u << (j / 32));
        }
        for (int j = 0; j < QK_K; j += 64)
            for (int l = 0; l < 32; l++)
                y[i].qs[j / 2 + l] = (uint8_t)((L[j + l] & 15) | ((L[j + l + 32] & 15) << 4));
    }
}

void kiln_quantize_row_q6_K(const float *x, block_q6_K *y, int64_t n) {
    const int64_t nb = n / QK_K;
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        for (int ib = 0; ib < QK_K / 16; ib++) scales[ib] = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
        float max_abs_scale;
        const float max_scale = signed_absmax(QK_K / 16, scales, &max_abs_scale);
        if (max_abs_scale < GROUP_MAX_EPS) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -128.f / max_scale;
        y[i].d = kiln_fp32_to_fp16(1 / iscale);
        for (int ib = 0; ib < QK_K / 16; ib++) y[i].scales[ib] = (int8_t)MIN(127, kiln_nearest_int(iscale * scales[ib]));
        for (int j = 0; j < QK_K / 16; j++) {
            const float d = kiln_fp16_to_fp32(y[i].d) * y[i].scales[j];
            if (!d) continue;
            for (int ii = 0; ii < 16; ii++) {
                const int l = kiln_nearest_int(x[16 * j + ii] / d);
                L[16 * j + ii] = (int8_t)(MAX(-32, MIN(31, l)) + 32);
            }
        }
        /* per 128 elements: low nibbles of l and l + 64 in ql[l], of l + 32 and l + 96 in
         * ql[l + 32]; the top 2 bits of l, l + 32, l + 64, l + 96 in qh[l] */
        uint8_t *ql = y[i].ql, *qh = y[i].qh;
        for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; l++) {
                const uint8_t q1 = (uint8_t)L[j + l], q2 = (uint8_t)L[j + l + 32];
                const uint8_t q3 = (uint8_t)L[j + l + 64], q4 = (uint8_t)L[j + l + 96];
                ql[l] = (uint8_t)((q1 & 0xF) | ((q3 & 0xF) << 4));
                ql[l + 32] = (uint8_t)((q2 & 0xF) | ((q4 & 0xF) << 4));
                qh[l] = (uint8_t)((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
            }
        }
    }
}

void kiln_quantize_row_q8_K(const float *x, block_q8_K *y, int64_t n) {
    const int64_t nb = n / QK_K;
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        float amax;
        const float max = signed_absmax(QK_K, x, &amax);
        if (!amax) {  /* ggml leaves bsums unwritten here; kiln writes zeros */
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < QK_K; j++) y[i].qs[j] = (int8_t)MIN(127, kiln_nearest_int(iscale * x[j]));
        for (int j = 0; j < QK_K / 16; j++) {
            int sum = 0;
            for (int ii = 0; ii < 16; ii++) sum += y[i].qs[j * 16 + ii];
            y[i].bsums[j] = (int16_t)sum;
        }
        y[i].d = 1 / iscale;
    }
}

void kiln_dequantize_row_q2_K(const block_q2_K *x, float *y, int64_t n) {
    const int64_t nb = n / QK_K;
    for (int64_t i = 0; i < nb; i++) {
        const float d = kiln_fp16_to_fp32(x[i].d), min = kiln_fp16_to_fp32(x[i].dmin);
        for (int e = 0; e < QK_K; e++) {
            const uint8_t sc = x[i].scales[e / 16];
            const int q = (x[i].qs[e / 128 * 32 + e % 32] >> (2 * (e % 128 / 32))) & 3;
            const float dl = d * (sc & 0xF), ml = min * (sc >> 4);
            y[i * QK_K + e] = dl * q - ml;
        }
    }
}

void kiln_dequantize_row_q3_K(const block_q3_K *x, float *y, int64_t n) {
    const int64_t nb = n / QK_K;
    for (int64_t i = 0; i < nb; i++) {
        const float d_all = kiln_fp16_to_fp32(x[i].d);
        for (int e = 0; e < QK_K; e++) {
            const float dl = d_all * (kiln_scale_q3(e / 16, x[i].scales) - 32);
            const int low = (x[i].qs[e / 128 * 32 + e % 32] >> (2 * (e % 128 / 32))) & 3;
            const int high = (x[i].hmask[e % 32] >> (e / 32)) & 1;
            y[i * QK_K + e] = dl * (low - (high ? 0 : 4));
        }
    }
}

void kiln_dequantize_row_q4_K(const block_q4_K *x, float *y, int64_t n) {
    const int64_t nb = n / QK_K;
    for (int64_t i = 0; i < nb; i++) {
        const float d = kiln_fp16_to_fp32(x[i].d), min = kiln_fp16_to_fp32(x[i].dmin);
        for (int e = 0; e < QK_K; e++) {
            uint8_t sc, m;
            kiln_scale_min_k4(e / 32, x[i].scales, &sc, &m);
            const uint8_t b = x[i].qs[e / 64 * 32 + e % 32];
            const int q = (e / 32) % 2 ? b >> 4 : b & 0xF;
            const float dl = d * sc, ml = min * m;
            y[i * QK_K + e] = dl * q - ml;
        }
    }
}

void kiln_dequantize_row_q5_K(const block_q5_K *x, float *y, int64_t n) {
    const int64_t nb = n / QK_K;
    for (int64_t i = 0; i < nb; i++) {
        const float d = kiln_fp16_to_fp32(x[i].d), min = kiln_fp16_to_fp32(x[i].dmin);
        for (int e = 0; e < QK_K; e++) {
            uint8_t sc, m;
            kiln_scale_min_k4(e / 32, x[i].scales, &sc, &m);
            const uint8_t b = x[i].qs[e / 64 * 32 + e % 32];
            const int q = ((e / 32) % 2 ? b >> 4 : b & 0xF) + (((x[i].qh[e % 32] >> (e / 32)) & 1) << 4);
            const float dl = d * sc, ml = min * m;
            y[i * QK_K + e] = dl * q - ml;
        }
    }
}

void kiln_dequantize_row_q6_K(const block_q6_K *x, float *y, int64_t n) {
    const int64_t nb = n / QK_K;
    for (int64_t i = 0; i < nb; i++) {
        const float d = kiln_fp16_to_fp32(x[i].d);
        for (int e = 0; e < QK_K; e++) {
            const int half = e / 128, k = e % 128 / 32, l = e % 32;  /* element 128 half + 32 k + l */
            const uint8_t b = x[i].ql[64 * half + 32 * (k % 2) + l];
            const int lo = k < 2 ? b & 0xF : b >> 4;
            const int hi = (x[i].qh[32 * half + l] >> (2 * k)) & 3;
            y[i * QK_K + e] = d * x[i].scales[e / 16] * ((lo | (hi << 4)) - 32);
        }
    }
}

void kiln_dequantize_row_q8_K(const block_q8_K *x, float *y, int64_t n) {
    const int64_t nb = n / QK_K;
    for (int64_t i = 0; i < nb; i++)
        for (int j = 0; j < QK_K; j++) y[i * QK_K + j] = x[i].d * x[i].qs[j];
}
