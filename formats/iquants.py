"""IQ4_NL and IQ4_XS: 4-bit indices into a fixed non-uniform grid, scaled per 32 elements.

IQ4_NL is a 32-element block with one fp16 scale; IQ4_XS is a 256-element super-block of
eight such blocks whose scales are 6-bit integers times one fp16 super-scale. Quantizing
reproduces ggml's quantize_iq4_nl / quantize_iq4_xs without an importance matrix (what
ggml_quantize_chunk runs for llama.cpp's quantizer): each block's scale is searched by
weighted least squares, weights x^2, over 15 trial scales; all in float32, every sum
accumulated element by element in ggml's order. Functions follow quants.py's block
convention and are registered in its codec tables.
"""
from __future__ import annotations

import numpy as np

from . import _blocks as _b
from .constants import QK, GGMLType

F32 = np.float32

# ggml's kvalues_iq4nl: the 16 grid points a 4-bit index selects, ascending
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10,
                          1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_GRID = KVALUES_IQ4NL.astype(F32)
_NTRY = 7  # trial scales (itry - 127) / max for itry in [-7, 7]


# ggml's best_index_int8 bisects to the two grid points around x and takes the lower one
# when x - lo < hi - x (float32). Near the midpoint m = (lo + hi) / 2 both differences
# are exact (|x| >= 4.5 there and the points are integers), so that is x < m; the lower
# index is taken iff x < m. The doubled midpoints are integers, so x >= m exactly when
# floor(2x) >= 2m (2x is exact): one table over floor(2x), from twice the lowest point
# to twice the highest, gives the index of every x (x beyond an end clamps to it).
_LO2, _HI2 = 2 * int(KVALUES_IQ4NL[0]), 2 * int(KVALUES_IQ4NL[-1])
_INDEX_OF_2X = np.searchsorted(_GRID[1:] + _GRID[:-1], np.arange(_LO2, _HI2 + 1),
                               side="right").astype(np.uint8)
_GRID_OF_2X = _GRID[_INDEX_OF_2X]


def _table_rows(x: np.ndarray) -> np.ndarray:
    """Row of each x in the floor(2x) tables; NaN takes the last row (fmin skips NaN),
    as ggml's bisection, where every comparison with NaN is false, ends on the last."""
    v = np.floor(x * F32(2))
    np.fmin(v, F32(_HI2), out=v)
    np.fmax(v, F32(_LO2), out=v)
    rows = v.astype(np.intp)
    rows -= _LO2
    return rows


def best_index(x: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8 on the grid: the nearest grid point's index; exactly between
    two, the upper one; ends clamp (NaN takes the last)."""
    return _INDEX_OF_2X[_table_rows(np.asarray(x, F32))]


def _weighted_sums(xt: np.ndarray, wt: np.ndarray, scale_inv: np.ndarray):
    """sum(w*q*x) and sum(w*q*q) per block with q the grid value nearest scale_inv*x,
    accumulated sequentially over the element index as ggml does. xt, wt are transposed
    (32, nblocks) so each step is one contiguous vector op across blocks."""
    q = _GRID_OF_2X[_table_rows(scale_inv * xt)]  # _GRID[best_index(...)]
    wq = wt * q
    qx = wq * xt
    q2 = wq * q
    sumqx = np.zeros(xt.shape[1], F32)
    sumq2 = np.zeros(xt.shape[1], F32)
    for j in range(xt.shape[0]):
        sumqx += qx[j]
        sumq2 += q2[j]
    return sumqx, sumq2


def block_scales(x: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """The float32 scale ggml picks for each 32-element block of x (nblocks, 32): start
    from max/127 (max: the first element of largest magnitude), then keep the trial scale
    with the best weighted fit, compared as sumqx^2 / sumq2 without dividing. Weights w
    (nblocks, 32): x^2 when None (no importance matrix)."""
    mx = _b.signed_absmax(x)
    zero = np.abs(mx) < _b.GROUP_MAX_EPS
    xt = np.ascontiguousarray(x.T)
    wt = xt * xt if w is None else np.ascontiguousarray(w.T)
    d = -mx / _GRID[0]
    sumqx, sumq2 = _weighted_sums(xt, wt, _b.inverse(d))
    pos = sumq2 > 0
    d = np.where(pos, sumqx / np.where(pos, sumq2, F32(1)), F32(0))
    best = d * sumqx
    safe_max = np.where(zero, F32(1), mx)
    for itry in range(-_NTRY, _NTRY + 1):
        sumqx, sumq2 = _weighted_sums(xt, wt, F32(itry + int(KVALUES_IQ4NL[0])) / safe_max)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = np.where(better, sumqx / np.where(better, sumq2, F32(1)), d)
        best = np.where(better, d * sumqx, best)
    return np.where(zero, F32(0), d)


def _q_iq4_nl(b: np.ndarray, out: np.ndarray, w: np.ndarray | None = None) -> None:
    d = block_scales(b, w)
    out[:, 0:2] = _b.fp16_bytes(d)
    # the indices are re-chosen for the final (float32, not fp16-rounded) scale
    out[:, 2:] = _b.pack_nibbles(best_index(b * _b.inverse(d)[:, None]))


_SUB = 8  # IQ4_XS: sub-blocks of QK per super-block
# super-blocks per step: as many 32-element blocks as quants.py gives IQ4_NL in one step,
# so the search's (32, blocks) temporaries stay as small (8x more ran 1.5x slower)
_XS_CHUNK = 1024


def _q_iq4_xs(b: np.ndarray, out: np.ndarray, w: np.ndarray | None = None) -> None:
    for i in range(0, b.shape[0], _XS_CHUNK):
        _q_iq4_xs_chunk(b[i : i + _XS_CHUNK], out[i : i + _XS_CHUNK],
                        None if w is None else w[i : i + _XS_CHUNK])


def _q_iq4_xs_chunk(b: np.ndarray, out: np.ndarray, w: np.ndarray | None = None) -> None:
    n = b.shape[0]
    sub = b.reshape(n * _SUB, QK)
    scales = block_scales(sub, None if w is None else w.reshape(n * _SUB, QK)).reshape(n, _SUB)
    # the super-scale maps the sub-scale of largest magnitude (the first, with its
    # sign) to -32; each sub-scale becomes a 6-bit l in [-32, 31]
    d = -_b.signed_absmax(scales) / F32(32)
    ls = np.clip(_b.nearest_int(_b.inverse(d)[:, None] * scales), -32, 31)
    dl = d[:, None] * ls.astype(F32)
    q = best_index(sub * _b.inverse(dl.reshape(-1))[:, None]).reshape(n, _SUB * QK)
    u = (ls + 32).astype(np.uint16)
    scales_h = np.zeros(n, np.uint16)
    for ib in range(_SUB):
        scales_h |= (u[:, ib] >> np.uint16(4)) << np.uint16(2 * ib)
    lo = (u & np.uint16(0x0F)).astype(np.uint8)
    out[:, 0:2] = _b.fp16_bytes(d)
    out[:, 2:4] = scales_h.view(np.uint8).reshape(n, 2)
    out[:, 4:8] = lo[:, 0::2] | (lo[:, 1::2] << np.uint8(4))
    out[:, 8:] = _b.pack_nibbles(q)


def _dq_iq4_nl(b: np.ndarray, out: np.ndarray) -> None:
    d = _b.fp16_field(b, 0, out.dtype)
    out[:] = KVALUES_IQ4NL[_b.unpack_nibbles(b[:, 2:])]
    out *= d


def _dq_iq4_xs(b: np.ndarray, out: np.ndarray) -> None:
    n = b.shape[0]
    d = _b.fp16_field(b, 0, out.dtype)
    scales_h = b[:, 2:4].copy().view(np.uint16)  # (n, 1)
    shifts = np.arange(_SUB, dtype=np.uint16) * np.uint16(2)
    hi = ((scales_h >> shifts) & np.uint16(3)).astype(np.int16)
    lo = np.repeat(b[:, 4:8], 2, axis=1) >> (np.tile([0, 4], 4).astype(np.uint8))
    ls = (lo & np.uint8(0x0F)).astype(np.int16) | (hi << np.int16(4))
    dl = d * (ls - np.int16(32)).astype(out.dtype)  # ggml: d * (ls - 32), then * grid value
    o = out.reshape(n, _SUB, QK)
    o[:] = KVALUES_IQ4NL[_b.unpack_nibbles(b[:, 8:])].reshape(n, _SUB, QK)
    o *= dl[:, :, None]


BLOCK_QUANTIZERS = {GGMLType.IQ4_NL: _q_iq4_nl, GGMLType.IQ4_XS: _q_iq4_xs}
BLOCK_DEQUANTIZERS = {GGMLType.IQ4_NL: _dq_iq4_nl, GGMLType.IQ4_XS: _dq_iq4_xs}
