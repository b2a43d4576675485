"""The K-quant super-block codecs (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and their activation
format Q8_K, in NumPy, bit-exact with ggml.

A super-block is 256 elements in sub-blocks of 16 or 32, each with a small integer scale
(and min) times the super-block's fp16 d (and dmin). Quantizing reproduces ggml's
quantize_row_*_ref (what ggml_quantize_chunk runs without an importance matrix, i.e. what
llama.cpp's quantizer writes), scale searches included: make_qkx2_quants (Q2_K, Q4_K,
Q5_K: scale and min by weighted least squares over trial scales), make_q3_quants (Q3_K:
coordinate descent on the quants), make_qx_quants (Q6_K: 18 trial scales). Everything is
float32 in ggml's operation order: elementwise steps run on (elements, sub-blocks) arrays,
and every sum ggml accumulates element by element is an explicit loop over the element
index with one vector add across all sub-blocks (NumPy's own sum is pairwise, which
rounds differently). Rounding is ggml's nearest_int (halves to even).

Block functions follow quants.py's convention: fn(blocks, out) with float32 blocks
(nblocks, 256) writing uint8 (nblocks, type_size); dequantizers fn(b, out) write out in
its dtype (float32: ggml's arithmetic; float64: the same formula, exact). They are
registered in quants.py's codec tables through BLOCK_QUANTIZERS / BLOCK_DEQUANTIZERS.
"""
from __future__ import annotations

import numpy as np

from . import _blocks as _b
from .constants import GGMLType

F32 = np.float32
QK_K = 256
_CHUNK = 1024  # super-blocks per step: the (elements, sub-blocks) temporaries stay small

_nearest_int = _b.nearest_int


def _fp16_round(v: np.ndarray) -> np.ndarray:
    """ggml's GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)): the value an fp16 field holds."""
    return v.astype(np.float16).astype(F32)


def _put_fp16(out: np.ndarray, at: int, v: np.ndarray) -> None:
    out[:, at : at + 2] = v.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _seq_sum(terms: np.ndarray, first: bool = False) -> np.ndarray:
    """sum over axis 0 in element order, as ggml's `s += t[i]` loops: from 0, or
    (first=True) starting at the first term, as in `s = t[0]; for i >= 1: s += t[i]`."""
    acc = terms[0].copy() if first else np.zeros(terms.shape[1:], F32) + terms[0]
    for t in terms[1:]:
        acc += t
    return acc


def _seq_max(v: np.ndarray) -> np.ndarray:
    """ggml's `if (v[j] > m) m = v[j]` from m = 0, over axis 1 (NaNs never win)."""
    m = np.zeros(v.shape[0], F32)
    for j in range(v.shape[1]):
        m = np.where(v[:, j] > m, v[:, j], m)
    return m


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """Over axis 0: the first value of largest magnitude, with its sign (ggml's
    `if (ax > amax) { amax = ax; max = x[i]; }` from 0), and that magnitude."""
    amax = np.zeros(x.shape[1:], F32)
    mx = np.zeros(x.shape[1:], F32)
    for xi in x:
        ax = np.abs(xi)
        hit = ax > amax
        amax = np.where(hit, ax, amax)
        mx = np.where(hit, xi, mx)
    return mx, amax


def _chunked(fn):
    """Run a block quantizer over at most _CHUNK super-blocks at a time. Division by
    zero, overflow and NaN are ggml's too (its searches divide unguarded and mask after),
    so NumPy's warnings are silenced."""
    def run(blocks: np.ndarray, out: np.ndarray) -> None:
        with np.errstate(all="ignore"):
            for i in range(0, blocks.shape[0], _CHUNK):
                fn(blocks[i : i + _CHUNK], out[i : i + _CHUNK])
    run.__doc__ = fn.__doc__
    return run


def _subs(blocks: np.ndarray, n: int) -> np.ndarray:
    """(nblocks, 256) -> (n, nblocks * 256 / n): element index first, sub-blocks across,
    so each step of an element loop is one contiguous vector over all sub-blocks."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


# ---- the scale searches --------------------------------------------------------------


def make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool,
                     qkx3: bool = False):
    """ggml's make_qkx2_quants on sub-blocks x, weights w (both (n, m)): the scale, the
    min (as a non-negative offset: x ~ scale * L - min) and the quants L (n, m) uint8.

    qkx3=True is make_qkx3_quants (the importance-weighted paths): the same search, but a
    trial quant is 0 unless iscale * (x - min) > 0, else nearest_int of it capped at nmax
    (inf and NaN give 0 or nmax, never the bit trick's garbage)."""
    nmax_f = F32(nmax)
    mn = x[0].copy()
    mx = x[0].copy()
    for xi in x[1:]:
        mn = np.where(xi < mn, xi, mn)
        mx = np.where(xi > mx, xi, mx)
    sum_w = _seq_sum(w, first=True)
    sum_x = w[0] * x[0]
    for wi, xi in zip(w[1:], x[1:]):
        sum_x += wi * xi
    mn = np.where(mn > 0, F32(0), mn)
    flat = (mx <= mn) if qkx3 else mx == mn

    def err(scale, lf, mn_):
        diff = scale * lf + mn_ - x
        diff = np.abs(diff) if use_mad else diff * diff
        return _seq_sum(w * diff)

    iscale = nmax_f / (mx - mn)
    scale = F32(1) / iscale
    L = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
    best = err(scale, L.astype(F32), mn)
    for step in range(nstep + 1):
        # min moves with each accepted trial: the next one scales from the new min
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + nmax_f) / (mx - mn)
        if qkx3:
            v = iscale * (x - mn)
            l = np.where(v > 0, _nearest_int(np.where(v < nmax_f, v, nmax_f)), 0)
        else:
            l = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
        lf = l.astype(F32)
        wl = w * lf
        sum_l = _seq_sum(wl)
        sum_l2 = _seq_sum(wl * lf)
        sum_xl = _seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = np.where(pos, F32(0), this_min)
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        cur = err(this_scale, lf, this_min)
        take = (D > 0) & (cur < best) & ~flat
        L = np.where(take, l, L)
        best = np.where(take, cur, best)
        scale = np.where(take, this_scale, scale)
        mn = np.where(take, this_min, mn)
    L = np.where(flat, 0, L)
    scale = np.where(flat, F32(0), scale)
    return scale, -mn, L.astype(np.uint8)


def make_q3_quants(x, nmax: int):
    """ggml's make_q3_quants with do_rmse on sub-blocks x (n, m): weights x^2, then up
    to 5 sweeps of coordinate descent on each quant; the scale and L (n, m) in 0..2nmax-1
    (all 0 for an all-zero sub-block)."""
    mx, amax = _signed_absmax(x)
    zero = amax < _b.GROUP_MAX_EPS
    iscale = F32(-nmax) / mx
    L = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    Lf = L.astype(F32)
    sumlx = _seq_sum(wx * Lf)
    suml2 = _seq_sum(w * Lf * Lf)
    # a sweep that changes nothing leaves the state as it was, so sweeping all blocks
    # 5 times equals ggml's early exit
    for _ in range(5):
        for i in range(x.shape[0]):
            li = L[i].astype(F32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = np.clip(_nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1)
            nf = new_l.astype(F32)
            slx2 = slx + wx[i] * nf
            sl2b = sl2 + w[i] * nf * nf
            take = ((slx > 0) & (new_l != L[i]) & (sl2b > 0)
                    & (slx2 * slx2 * suml2 > sumlx * sumlx * sl2b))
            L[i] = np.where(take, new_l, L[i])
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl2b, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, L + nmax)


def make_qx_quants(x, nmax: int, w=None):
    """ggml's make_qx_quants with rmse_type 1 on sub-blocks x (n, m): weights w (n, m),
    x^2 when None (no importance weights), the best of 19 trial scales by weighted least
    squares; the scale and L (n, m) in 0..2nmax-1 (all 0 for an all-zero sub-block)."""
    mx, amax = _signed_absmax(x)
    zero = amax < _b.GROUP_MAX_EPS
    w = x * x if w is None else w
    wx = w * x

    def trial(iscale):
        l = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
        lf = l.astype(F32)
        return l, _seq_sum(wx * lf), _seq_sum(w * lf * lf)

    l, sumlx, suml2 = trial(F32(-nmax) / mx)
    L = l + nmax
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(take, l + nmax, L)
        scale = np.where(take, sumlx / suml2, scale)
        best = np.where(take, scale * sumlx, best)
    return np.where(zero, F32(0), scale), np.where(zero, 0, L)


# ---- bit layouts ---------------------------------------------------------------------


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """Quants 0..3 (nb, 256) -> 64 bytes: per 128 elements, byte l holds elements l,
    l + 32, l + 64, l + 96 at bits 0, 2, 4, 6."""
    g = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    out = g[:, :, 0] | (g[:, :, 1] << 2) | (g[:, :, 2] << 4) | (g[:, :, 3] << 6)
    return out.reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    g = qs.reshape(-1, 2, 1, 32) >> (np.arange(4, dtype=np.uint8) * 2)[None, None, :, None]
    return (g & np.uint8(3)).reshape(-1, 256)


def _bit_planes(h: np.ndarray) -> np.ndarray:
    """Bits (nb, 256) -> 32 bytes: element e is bit e // 32 of byte e % 32 (Q3_K's
    hmask, Q5_K's qh)."""
    g = h.reshape(-1, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]
    return np.bitwise_or.reduce(g, axis=1)


def _unbit_planes(b: np.ndarray) -> np.ndarray:
    g = b[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]
    return (g & np.uint8(1)).reshape(-1, 256)


def _pack_4bit_k(L: np.ndarray) -> np.ndarray:
    """Quants 0..15 (nb, 256) -> 128 bytes: per 64 elements, byte l holds element l in
    its low nibble and l + 32 in its high nibble (Q4_K, Q5_K)."""
    g = L.reshape(-1, 4, 2, 32).astype(np.uint8)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_4bit_k(qs: np.ndarray) -> np.ndarray:
    g = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([g & np.uint8(15), g >> np.uint8(4)], axis=2).reshape(-1, 256)


def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins (nb, 8) -> 12 bytes (Q4_K, Q5_K): sub-blocks 0-3 in
    the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7 as nibbles in bytes 8-11
    (scale low, min high) with their top 2 bits in bits 6-7 of bytes 0-7."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    return out


def unpack_scale_min_k4(s: np.ndarray):
    """ggml's get_scale_min_k4 for all eight sub-blocks: 12 bytes -> (scales, mins)."""
    lo = s[:, 0:4] & np.uint8(63), s[:, 4:8] & np.uint8(63)
    hi = ((s[:, 8:12] & np.uint8(15)) | ((s[:, 0:4] >> 6) << 4),
          (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4))
    return np.concatenate([lo[0], hi[0]], axis=1), np.concatenate([lo[1], hi[1]], axis=1)


def pack_scales_q3(l: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit scales (nb, 16) -> 12 bytes (Q3_K): low nibbles of 0-7 in the low
    nibbles of bytes 0-7, of 8-15 in their high nibbles; the top 2 bits of scale j at
    bits 2 * (j // 4) of byte 8 + j % 4."""
    l = l.astype(np.uint8)
    out = np.empty((l.shape[0], 12), np.uint8)
    out[:, 0:8] = (l[:, :8] & 15) | ((l[:, 8:] & 15) << 4)
    hi = (l >> 4).reshape(-1, 4, 4) << (2 * np.arange(4, dtype=np.uint8))[None, :, None]
    out[:, 8:12] = np.bitwise_or.reduce(hi, axis=1)
    return out


def unpack_scales_q3(s: np.ndarray) -> np.ndarray:
    """12 bytes -> the sixteen 6-bit scales (nb, 16) as stored (0..63)."""
    low = np.concatenate([s[:, 0:8] & np.uint8(15), s[:, 0:8] >> 4], axis=1)
    hi = (s[:, None, 8:12] >> (2 * np.arange(4, dtype=np.uint8))[None, :, None]) & np.uint8(3)
    return low | (hi.reshape(-1, 16) << 4)


# ---- quantizers ----------------------------------------------------------------------


def _requantize(x, L, d, dm, lo: int, hi: int, n: int):
    """ggml's final pass: with the stored scales, each sub-block with d != 0 is quantized
    again as nearest_int((x + dm) / d) (dm None: x / d); sub-blocks with d == 0 keep the
    search's quants. x, L (nb, 256); d, dm (nb, 256 / n)."""
    xs = x.reshape(d.shape[0], d.shape[1], n)
    dd = d[:, :, None]
    v = xs if dm is None else xs + dm[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.clip(_nearest_int(v / np.where(dd == 0, F32(1), dd)), lo, hi)
    return np.where(dd != 0, l, L.reshape(xs.shape)).reshape(x.shape)


@_chunked
def quantize_q2_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """ggml's quantize_row_q2_K_ref: 16 sub-blocks of 16, 2-bit quants, 4-bit scale and
    min per sub-block; layout scales[16] qs[64] d dmin."""
    nb = blocks.shape[0]
    x = _subs(blocks, 16)
    scales, mins, L = make_qkx2_quants(x, np.abs(x), 3, -0.5, 0.1, 15, True)
    scales = scales.reshape(nb, 16)
    mins = mins.reshape(nb, 16)
    L = L.T.reshape(nb, 256)
    max_scale, max_min = _seq_max(scales), _seq_max(mins)
    q4 = F32(15)
    has_s = (max_scale > 0)[:, None]
    has_m = (max_min > 0)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where(has_s, _nearest_int((q4 / max_scale)[:, None] * scales), 0)
        lm = np.where(has_m, _nearest_int((q4 / max_min)[:, None] * mins), 0)
    # ggml stores the int in a byte, then ORs the min's int shifted by 4 (both truncated)
    sc = (ls.astype(np.uint8) | (lm << 4).astype(np.uint8))
    d = np.where(has_s[:, 0], max_scale / q4, F32(0))
    dmin = np.where(has_m[:, 0], max_min / q4, F32(0))
    finish_q2_k(blocks, out, L, sc, d, dmin)


def finish_q2_k(blocks, out, L, sc, d, dmin) -> None:
    """Q2_K after the scale search: requantize with the stored scales (sc: scale in the
    low nibble, min in the high one) and lay out scales[16] qs[64] d dmin."""
    dq = _fp16_round(d)[:, None] * (sc & np.uint8(15)).astype(F32)
    mq = _fp16_round(dmin)[:, None] * (sc >> 4).astype(F32)
    L = _requantize(blocks, L, dq, mq, 0, 3, 16)
    out[:, 0:16] = sc
    out[:, 16:80] = _pack_2bit(L)
    _put_fp16(out, 80, d)
    _put_fp16(out, 82, dmin)


@_chunked
def quantize_q3_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """ggml's quantize_row_q3_K_ref: 16 sub-blocks of 16, 3-bit quants (2 low bits in qs,
    the third in hmask), signed 6-bit scales; layout hmask[32] qs[64] scales[12] d."""
    nb = blocks.shape[0]
    scales, L = make_q3_quants(_subs(blocks, 16), 4)
    scales = scales.reshape(nb, 16)
    L = L.T.reshape(nb, 256)
    max_scale, _ = _signed_absmax(scales.T)
    has = (max_scale != 0)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-32) / max_scale
        # ggml: int8_t l = nearest_int(..) (a truncating store), then clamped and offset
        l = _nearest_int(iscale[:, None] * scales).astype(np.int8)
        l = np.where(has, np.clip(l, -32, 31) + 32, 0).astype(np.uint8)
        d = np.where(has[:, 0], F32(1) / iscale, F32(0))
    finish_q3_k(blocks, out, L, l, d)


def finish_q3_k(blocks, out, L, l, d) -> None:
    """Q3_K after the scale search: l the sixteen 6-bit scales as stored (0..63, 32 is
    zero), L the search's quants 0..7; requantize and lay out hmask qs scales d."""
    dq = _fp16_round(d)[:, None] * (l.astype(np.int8) - np.int8(32)).astype(F32)
    L = _requantize(blocks, L, dq, None, -4, 3, 16) + 4 * (dq != 0).repeat(16, axis=1)
    high = L > 3
    out[:, 0:32] = _bit_planes(high)
    out[:, 32:96] = _pack_2bit(np.where(high, L - 4, L))
    out[:, 96:108] = pack_scales_q3(l)
    _put_fp16(out, 108, d)


def _quantize_q45_k(blocks, out, nmax: int, rmin: float, nstep: int):
    """Q4_K and Q5_K: 8 sub-blocks of 32, weights av_x + |x| with av_x the sub-block's
    rms, 6-bit scales and mins; returns the final quants (nb, 256) 0..nmax."""
    nb = blocks.shape[0]
    x = _subs(blocks, 32)
    av_x = np.sqrt(_seq_sum(x * x) / F32(32))
    scales, mins, L = make_qkx2_quants(x, av_x + np.abs(x), nmax, rmin, 0.1, nstep, False)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    L = L.T.reshape(nb, 256)
    max_scale, max_min = _seq_max(scales), _seq_max(mins)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    # ggml: uint8_t ls = nearest_int(..) (a truncating store), then MIN(63, ls)
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales).astype(np.uint8), np.uint8(63))
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins).astype(np.uint8), np.uint8(63))
    return finish_q45_k(blocks, out, L, ls, lm, max_scale / F32(63), max_min / F32(63), nmax)


def finish_q45_k(blocks, out, L, ls, lm, d, dmin, nmax: int):
    """Q4_K / Q5_K after the scale search: store d, dmin and the scales and mins (uint8
    (nb, 8)), requantize with them; returns the final quants (nb, 256) 0..nmax."""
    _put_fp16(out, 0, d)
    _put_fp16(out, 2, dmin)
    out[:, 4:16] = pack_scale_min_k4(ls, lm)
    dq = _fp16_round(d)[:, None] * ls.astype(F32)
    mq = _fp16_round(dmin)[:, None] * lm.astype(F32)
    return _requantize(blocks, L, dq, mq, 0, nmax, 32)


@_chunked
def quantize_q4_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """ggml's quantize_row_q4_K_ref: layout d dmin scales[12] qs[128]."""
    L = _quantize_q45_k(blocks, out, 15, -1.0, 20)
    out[:, 16:144] = _pack_4bit_k(L)


@_chunked
def quantize_q5_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """ggml's quantize_row_q5_K_ref: as Q4_K with a fifth bit per quant in qh; layout
    d dmin scales[12] qh[32] qs[128]."""
    L = _quantize_q45_k(blocks, out, 31, -0.5, 15)
    out[:, 16:48] = _bit_planes(L > 15)
    out[:, 48:176] = _pack_4bit_k(L & 15)


@_chunked
def quantize_q6_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """ggml's quantize_row_q6_K_ref: 16 sub-blocks of 16, 6-bit quants (4 low bits in ql,
    2 high in qh), int8 scales; layout ql[128] qh[64] scales[16] d."""
    nb = blocks.shape[0]
    scales, L = make_qx_quants(_subs(blocks, 16), 32)
    finish_q6_k(blocks, out, scales.reshape(nb, 16), L.T.reshape(nb, 256))


def finish_q6_k(blocks, out, scales, L) -> None:
    """Q6_K after the sub-block search (scales (nb, 16), quants L (nb, 256)): the int8
    scales, requantize, lay out ql qh scales d."""
    nb = blocks.shape[0]
    max_scale, max_abs = _signed_absmax(scales.T)
    zero = max_abs < _b.GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / max_scale
        d = np.where(zero, F32(0), F32(1) / iscale)
        sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    sc[zero] = 0
    dq = _fp16_round(d)[:, None] * sc.astype(F32)
    L = _requantize(blocks, L, dq, None, -32, 31, 16) + 32 * (dq != 0).repeat(16, axis=1)
    L[zero] = 0  # ggml zeroes the whole block
    g = L.reshape(nb, 2, 4, 32).astype(np.uint8)
    lo = g & np.uint8(15)
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    h = g >> 4
    qh = h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)
    out[:, 0:128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = sc.view(np.uint8)
    _put_fp16(out, 208, d)


@_chunked
def quantize_q8_k(blocks: np.ndarray, out: np.ndarray) -> None:
    """ggml's quantize_row_q8_K_ref: q = nearest_int(-127 / max * x) with max the first
    value of largest magnitude (so max itself maps to -127), d = 1 / iscale in float32,
    bsums the sums of q per 16. Layout d (float32) qs[256] bsums[16] (int16).

    ggml leaves bsums unwritten for an all-zero block; kiln writes zeros."""
    nb = blocks.shape[0]
    amax = np.fmax.reduce(np.abs(blocks), axis=1)
    amax = np.where(np.isnan(amax), F32(0), amax)
    idx = np.argmax(np.abs(blocks) == amax[:, None], axis=1)  # the first of equal magnitude
    mx = blocks[np.arange(nb), idx]
    zero = amax == 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-127) / np.where(zero, F32(1), mx)
        q = np.minimum(127, _nearest_int(iscale[:, None] * blocks)).astype(np.int8)
        d = np.where(zero, F32(0), F32(1) / iscale)
    q[zero] = 0
    out[:, 0:4] = d.astype(F32).view(np.uint8).reshape(nb, 4)
    out[:, 4:260] = q.view(np.uint8)
    bsums = q.reshape(nb, 16, 16).sum(axis=2, dtype=np.int32).astype(np.int16)
    out[:, 260:292] = bsums.view(np.uint8).reshape(nb, 32)


# ---- dequantizers --------------------------------------------------------------------


def _per_sub(v: np.ndarray, n: int) -> np.ndarray:
    """Per-sub-block values (nb, 256 / n) repeated over their n elements."""
    return np.repeat(v, n, axis=1)


def dequantize_q2_k(b: np.ndarray, out: np.ndarray) -> None:
    """ggml's dequantize_row_q2_K: x = (d * (sc & 15)) * q - dmin * (sc >> 4)."""
    ft = out.dtype
    d = _b.fp16_field(b, 80, ft)
    dmin = _b.fp16_field(b, 82, ft)
    sc = b[:, 0:16]
    dl = d * (sc & np.uint8(15)).astype(ft)
    ml = dmin * (sc >> 4).astype(ft)
    out[:] = _unpack_2bit(b[:, 16:80])
    out *= _per_sub(dl, 16)
    out -= _per_sub(ml, 16)


def dequantize_q3_k(b: np.ndarray, out: np.ndarray) -> None:
    """ggml's dequantize_row_q3_K: x = (d * (s - 32)) * (q - 4 * !hbit)."""
    ft = out.dtype
    d = _b.fp16_field(b, 108, ft)
    dl = d * (unpack_scales_q3(b[:, 96:108]).astype(np.int8) - np.int8(32)).astype(ft)
    q = _unpack_2bit(b[:, 32:96]).astype(np.int8) - np.int8(4) * (np.int8(1) - _unbit_planes(b[:, 0:32]).astype(np.int8))
    out[:] = q
    out *= _per_sub(dl, 16)


def _dequantize_q45_k(b: np.ndarray, out: np.ndarray, q: np.ndarray) -> None:
    ft = out.dtype
    d = _b.fp16_field(b, 0, ft)
    dmin = _b.fp16_field(b, 2, ft)
    sc, m = unpack_scale_min_k4(b[:, 4:16])
    out[:] = q
    out *= _per_sub(d * sc.astype(ft), 32)
    out -= _per_sub(dmin * m.astype(ft), 32)


def dequantize_q4_k(b: np.ndarray, out: np.ndarray) -> None:
    """ggml's dequantize_row_q4_K: x = (d * sc) * q - dmin * m."""
    _dequantize_q45_k(b, out, _unpack_4bit_k(b[:, 16:144]))


def dequantize_q5_k(b: np.ndarray, out: np.ndarray) -> None:
    """ggml's dequantize_row_q5_K: as Q4_K with q += 16 * hbit."""
    q = _unpack_4bit_k(b[:, 48:176]) | (_unbit_planes(b[:, 16:48]) << 4)
    _dequantize_q45_k(b, out, q)


def dequantize_q6_k(b: np.ndarray, out: np.ndarray) -> None:
    """ggml's dequantize_row_q6_K: x = (d * scale) * (q - 32)."""
    ft = out.dtype
    nb = b.shape[0]
    d = _b.fp16_field(b, 208, ft)
    ql = b[:, 0:128].reshape(nb, 2, 2, 32)  # per half: bytes 0-31, 32-63
    qh = b[:, 128:192].reshape(nb, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    lo = np.concatenate([ql & np.uint8(15), ql >> 4], axis=2)  # elements 0, 32, 64, 96 (+l)
    q = (lo | ((qh & np.uint8(3)) << 4)).reshape(nb, 256).astype(np.int8) - np.int8(32)
    dl = d * b[:, 192:208].view(np.int8).astype(ft)
    out[:] = q
    out *= _per_sub(dl, 16)


def dequantize_q8_k(b: np.ndarray, out: np.ndarray) -> None:
    """ggml's dequantize_row_q8_K: x = d * q (d float32)."""
    d = b[:, 0:4].copy().view(F32).astype(out.dtype)
    out[:] = b[:, 4:260].view(np.int8)
    out *= d


BLOCK_QUANTIZERS = {
    GGMLType.Q2_K: quantize_q2_k,
    GGMLType.Q3_K: quantize_q3_k,
    GGMLType.Q4_K: quantize_q4_k,
    GGMLType.Q5_K: quantize_q5_k,
    GGMLType.Q6_K: quantize_q6_k,
    GGMLType.Q8_K: quantize_q8_k,
}
BLOCK_DEQUANTIZERS = {
    GGMLType.Q2_K: dequantize_q2_k,
    GGMLType.Q3_K: dequantize_q3_k,
    GGMLType.Q4_K: dequantize_q4_k,
    GGMLType.Q5_K: dequantize_q5_k,
    GGMLType.Q6_K: dequantize_q6_k,
    GGMLType.Q8_K: dequantize_q8_k,
}
