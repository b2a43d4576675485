"""Importance-weighted quantizers: what ggml_quantize_chunk runs when llama.cpp's quantizer
is given an importance matrix (its quantize_row_*_impl paths), in NumPy, bit-exact.

The importance of a matrix's input column j (the mean square of the activations that
multiply column j, from an imatrix file) weights the rounding error of every element in
column j. ggml mixes it with the row's own magnitudes: per element
w = importance[j] * sqrt(sigma2 + x^2), sigma2 the row's mean square (Q4_0, Q4_1, Q5_0,
Q5_1: over the whole row) or twice a super-block's (Q2_K: once; IQ4_NL: over its block of
32), and then searches scales by weighted least squares: make_qx_quants (Q4_0, Q5_0, Q3_K,
Q6_K with the raw importance), make_qkx3_quants (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K), and the
super-block's scales of scales by make_qp_quants (Q2_K, Q4_K, Q5_K) or make_qx_quants
(Q3_K), weighted by each sub-block's total weight. IQ4_NL and IQ4_XS use their own search
with these weights. Q8_0 takes no weights.

Everything is float32 in ggml's order, vectorized across blocks as in kquants.py: the
element index first, blocks across, every running sum an explicit loop.
"""
from __future__ import annotations

import numpy as np

from . import _blocks as _b
from . import iquants, kquants
from .constants import GGML_QUANT_SIZES, QK, GGMLType

F32 = np.float32
QK_K = kquants.QK_K
_CHUNK_ROWS_ELEMS = 1 << 18  # elements per step: bounds the (elements, blocks) temporaries

_seq_sum = kquants._seq_sum
_nearest_int = _b.nearest_int


def sum_squares(x: np.ndarray) -> np.ndarray:
    """sum(x^2) over the last axis, summed element by element from 0 as ggml's
    `sum += x[j]*x[j]` loop: x (m, n) -> (m,)."""
    acc = np.zeros(x.shape[0], F32)
    xt = np.ascontiguousarray(x.T)
    for col in xt:
        acc += col * col
    return acc


def _sigma_weights(x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """ggml's weight[j] = qw[j] * sqrtf(sigma2 + x[j]*x[j]) (x, qw (m, n); sigma2 (m,))."""
    return qw * np.sqrt(sigma2[:, None] + x * x)


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray):
    """ggml's make_qp_quants on the columns of x (n, m) (non-negative sub-block scales or
    mins), weights qw (n, m): the scale of the scales and their quants L (n, m) as uint8
    (ggml stores them in a uint8_t array, so a negative quant wraps)."""
    n = x.shape[0]
    mx = np.zeros(x.shape[1], F32)
    for xi in x:
        mx = np.where(mx > xi, mx, xi)  # MAX(max, x[i])
    zero = mx < _b.GROUP_MAX_EPS
    nmax_f = F32(nmax)
    safe = np.where(zero, F32(1), mx)

    def mse_of(iscale, clamp):
        scale = F32(1) / iscale
        l = _nearest_int(iscale * x)
        # the first pass reads its quants back from the uint8 array, the trials do not
        l = np.minimum(nmax, l) if clamp else l & 0xFF
        diff = x - scale * l.astype(F32)
        return _seq_sum(qw * diff * diff)

    iscale = nmax_f / safe
    best = mse_of(iscale, False)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F32(0.1) * F32(step) + nmax_f) / safe
        mse = mse_of(iscale_is, True)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, iscale_is, iscale)
    L = np.minimum(nmax, _nearest_int(iscale * x)) & 0xFF  # the uint8 store
    Lf = L.astype(F32)
    wx = qw * x
    sumlx = _seq_sum(wx * Lf)
    suml2 = _seq_sum(qw * Lf * Lf)
    # a sweep that changes nothing leaves the state as it was: 5 sweeps = ggml's early exit
    for _ in range(5):
        for i in range(n):
            li = L[i].astype(F32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - qw[i] * li * li
            ok = (slx > 0) & (sl2 > 0)
            with np.errstate(all="ignore"):
                new_l = np.minimum(nmax, _nearest_int(x[i] * sl2 / np.where(ok, slx, F32(1))))
            nf = new_l.astype(F32)
            slx2 = slx + wx[i] * nf
            sl2b = sl2 + qw[i] * nf * nf
            take = ok & (new_l != L[i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl2b)
            L[i] = np.where(take, new_l & 0xFF, L[i])
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl2b, suml2)
    with np.errstate(all="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, L).astype(np.uint8)


# ---- the 32-element types: per-row sigma2 ----------------------------------------------


def _row_blocks(x: np.ndarray, qw: np.ndarray):
    """x (rows, n) -> transposed blocks (32, rows * n / 32) and their weights."""
    rows, n = x.shape
    sigma2 = sum_squares(x) / F32(n)
    w = _sigma_weights(x, np.broadcast_to(qw, x.shape), sigma2)
    return kquants._subs(x, QK), kquants._subs(w, QK)


def _q4_0(x, qw, out):
    xt, wt = _row_blocks(x, qw)
    d, L = kquants.make_qx_quants(xt, 8, wt)
    b = out.reshape(-1, 18)
    b[:, 0:2] = _b.fp16_bytes(d)
    b[:, 2:] = _b.pack_nibbles(L.T.astype(np.uint8))


def _q5_pack(b, L):
    from .quants import _q5_bits
    _q5_bits(L, b)


def _q5_0(x, qw, out):
    xt, wt = _row_blocks(x, qw)
    d, L = kquants.make_qx_quants(xt, 16, wt)
    b = out.reshape(-1, 22)
    b[:, 0:2] = _b.fp16_bytes(d)
    _q5_pack(b[:, 2:], L.T.astype(np.uint8))


def _affine(x, qw, nmax):
    xt, wt = _row_blocks(x, qw)
    d, mn, L = kquants.make_qkx2_quants(xt, wt, nmax, -0.9, 0.05, 36, False, qkx3=True)
    return d, mn, L.T


def _q4_1(x, qw, out):
    d, mn, L = _affine(x, qw, 15)
    b = out.reshape(-1, 20)
    b[:, 0:2] = _b.fp16_bytes(d)
    b[:, 2:4] = _b.fp16_bytes(-mn)
    b[:, 4:] = _b.pack_nibbles(L)


def _q5_1(x, qw, out):
    d, mn, L = _affine(x, qw, 31)
    b = out.reshape(-1, 24)
    b[:, 0:2] = _b.fp16_bytes(d)
    b[:, 2:4] = _b.fp16_bytes(-mn)
    _q5_pack(b[:, 4:], L)


# ---- the K types: per-super-block sigma2 -------------------------------------------------


def _super_blocks(x, qw, sub: int, factor: float):
    """x (rows, n) -> super-blocks (nb, 256), their weights qw * sqrt(sigma2 + x^2) with
    sigma2 = factor * sum(x^2) / 256, and both transposed into sub-blocks of `sub`."""
    blocks = x.reshape(-1, QK_K)
    q = np.broadcast_to(qw, x.shape).reshape(-1, QK_K)
    sigma2 = (F32(factor) * sum_squares(blocks)) / F32(QK_K)
    w = _sigma_weights(blocks, q, sigma2)
    return blocks, kquants._subs(blocks, sub), kquants._subs(w, sub)


def _q2_k(x, qw, out):
    blocks, xs, ws = _super_blocks(x, qw, 16, 1.0)
    nb = blocks.shape[0]
    sw = _seq_sum(ws).reshape(nb, 16).T  # (16 sub-blocks, nb)
    scales, mins, L = kquants.make_qkx2_quants(xs, ws, 3, -0.9, 0.05, 36, False, qkx3=True)
    dm, Ls = make_qp_quants(scales.reshape(nb, 16).T.copy(), 15, sw)
    mm, Lm = make_qp_quants(mins.reshape(nb, 16).T.copy(), 15, sw)
    sc = Ls.T | (Lm.T << np.uint8(4))
    kquants.finish_q2_k(blocks, out.reshape(nb, -1), L.T.reshape(nb, QK_K), sc, dm, mm)


def _q3_k(x, qw, out):
    blocks, xs, ws = _super_blocks(x, qw, 16, 2.0)
    nb = blocks.shape[0]
    sw = _seq_sum(ws).reshape(nb, 16).T
    scales, L = kquants.make_qx_quants(xs, 4, ws)
    d, Ls = kquants.make_qx_quants(scales.reshape(nb, 16).T.copy(), 32, sw)
    kquants.finish_q3_k(blocks, out.reshape(nb, -1), L.T.reshape(nb, QK_K),
                        Ls.T.astype(np.uint8), d)


def _q45_k(x, qw, out, nmax):
    blocks, xs, ws = _super_blocks(x, qw, 32, 2.0)
    nb = blocks.shape[0]
    sw = _seq_sum(ws).reshape(nb, 8).T
    scales, mins, L = kquants.make_qkx2_quants(xs, ws, nmax, -0.9, 0.05, 36, False, qkx3=True)
    d, Ls = make_qp_quants(scales.reshape(nb, 8).T.copy(), 63, sw)
    m, Lm = make_qp_quants(mins.reshape(nb, 8).T.copy(), 63, sw)
    ls, lm = Ls.T, Lm.T
    if nmax == 31:  # Q5_K clamps the 6-bit scales, Q4_K stores them as they come
        ls, lm = np.minimum(ls, np.uint8(63)), np.minimum(lm, np.uint8(63))
    b = out.reshape(nb, -1)
    return b, kquants.finish_q45_k(blocks, b, L.T.reshape(nb, QK_K), ls, lm, d, m, nmax)


def _q4_k(x, qw, out):
    b, L = _q45_k(x, qw, out, 15)
    b[:, 16:144] = kquants._pack_4bit_k(L)


def _q5_k(x, qw, out):
    b, L = _q45_k(x, qw, out, 31)
    b[:, 16:48] = kquants._bit_planes(L > 15)
    b[:, 48:176] = kquants._pack_4bit_k(L & 15)


def _q6_k(x, qw, out):
    blocks = x.reshape(-1, QK_K)
    nb = blocks.shape[0]
    q = np.ascontiguousarray(np.broadcast_to(qw, x.shape)).reshape(-1, QK_K)
    scales, L = kquants.make_qx_quants(kquants._subs(blocks, 16), 32, kquants._subs(q, 16))
    kquants.finish_q6_k(blocks, out.reshape(nb, -1), scales.reshape(nb, 16), L.T.reshape(nb, QK_K))


# ---- IQ4_NL, IQ4_XS: sigma2 = 2 * mean square of the (super-)block ----------------------


def _iq4(x, qw, out, block: int, fn):
    blocks = x.reshape(-1, block)
    q = np.broadcast_to(qw, x.shape).reshape(-1, block)
    sigma2 = sum_squares(blocks) * (F32(2.0) / F32(block))
    fn(blocks, out.reshape(blocks.shape[0], -1), _sigma_weights(blocks, q, sigma2))


def _iq4_nl(x, qw, out):
    _iq4(x, qw, out, QK, iquants.BLOCK_QUANTIZERS[GGMLType.IQ4_NL])


def _iq4_xs(x, qw, out):
    _iq4(x, qw, out, QK_K, iquants.BLOCK_QUANTIZERS[GGMLType.IQ4_XS])


WEIGHTED_QUANTIZERS = {
    GGMLType.Q4_0: _q4_0, GGMLType.Q4_1: _q4_1, GGMLType.Q5_0: _q5_0, GGMLType.Q5_1: _q5_1,
    GGMLType.Q2_K: _q2_k, GGMLType.Q3_K: _q3_k, GGMLType.Q4_K: _q4_k, GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k, GGMLType.IQ4_NL: _iq4_nl, GGMLType.IQ4_XS: _iq4_xs,
}
# the types whose quantizer reads importance weights (Q8_0 and the float types ignore them)
WEIGHTED_TYPES = tuple(WEIGHTED_QUANTIZERS)


def quantize_weighted(x, type_: GGMLType, quant_weights) -> np.ndarray:
    """Encode float32 rows (..., n) as `type_` with per-column importance weights
    quant_weights (n,), as ggml_quantize_chunk(type_, x, ..., quant_weights) does; returns
    uint8 (..., row bytes). For a type that takes no weights, plain quantize()."""
    from .quants import quantize
    type_ = GGMLType(type_)
    fn = WEIGHTED_QUANTIZERS.get(type_)
    if fn is None:
        return quantize(x, type_)
    x = np.ascontiguousarray(x, dtype=F32)
    qw = np.ascontiguousarray(quant_weights, dtype=F32).reshape(-1)
    n = x.shape[-1]
    if qw.shape[0] != n:
        raise ValueError(f"importance weights have {qw.shape[0]} values for rows of {n}")
    block, size = GGML_QUANT_SIZES[type_]
    if n % block:
        raise ValueError(f"row length {n} is not a multiple of {type_.name}'s block size {block}")
    lead = x.shape[:-1]
    rows = x.reshape(-1, n)
    out = np.empty((rows.shape[0], n // block * size), np.uint8)
    step = max(1, _CHUNK_ROWS_ELEMS // n)
    with np.errstate(all="ignore"):  # ggml divides unguarded and masks after, as here
        for i in range(0, rows.shape[0], step):
            fn(rows[i : i + step], qw, out[i : i + step])
    return out.reshape(*lead, n // block * size)
