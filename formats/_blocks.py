"""Float32 building blocks the NumPy block codecs share (quants.py, kquants.py, iquants.py).

Each reproduces one step of ggml's C exactly: its comparisons, its float32 rounding,
its fp16 conversion and its byte layout. Blocks are rows of a 2-D array (nblocks, block).
"""
from __future__ import annotations

import numpy as np

from .constants import QK

F32 = np.float32
# ggml's threshold: a group whose largest |x| is below it is quantized as all zero
GROUP_MAX_EPS = F32(1e-15)


def first_value(blocks: np.ndarray, rows: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Value of the first element of each selected block where `hit` is true."""
    idx = np.argmax(hit, axis=1)
    return blocks[rows, idx]


def signed_absmax(b: np.ndarray) -> np.ndarray:
    """Per block: the first element of largest magnitude, with its sign (ggml's loop
    `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }` from amax = max = 0), so +0 for
    an all-zero block. NaNs never compare greater, so they are skipped (fmax, fmin)."""
    mx = np.fmax.reduce(b, axis=1)
    mn = np.fmin.reduce(b, axis=1)
    out = np.where(-mn > mx, mn, mx)
    tie = (-mn == mx) & (mx != 0)
    if tie.any():  # both signs reach the magnitude: the first one in the block wins
        rows = np.nonzero(tie)[0]
        sub = b[rows]
        out[rows] = first_value(sub, np.arange(len(rows)), np.abs(sub) == mx[rows, None])
    out[((mx == 0) & (mn == 0)) | np.isnan(mx)] = 0.0  # the loop only moves on |v| > 0
    return out


def first_zero_fix(b: np.ndarray, v: np.ndarray) -> np.ndarray:
    """ggml's min/max loops keep the first of equal values; only the sign of a zero
    result can differ from NumPy's reduction, so take the first zero's sign."""
    z = v == 0
    if z.any():
        rows = np.nonzero(z)[0]
        sub = b[rows]
        v[rows] = first_value(sub, np.arange(len(rows)), sub == 0)
    return v


def inverse(d: np.ndarray) -> np.ndarray:
    """ggml's `id = d ? 1.0f/d : 0.0f`, in float32."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(d == 0, F32(0.0), F32(1.0) / np.where(d == 0, F32(1.0), d))


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5 * 2^23 in float32 and read the low mantissa bits, which
    rounds halves to even (and maps inf to -2^22, NaN to 0, as the bit trick does)."""
    bits = (v.astype(F32) + F32(12582912.0)).view(np.int32)
    return (bits & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 -> ggml's fp16 (round to nearest even) as 2 little-endian bytes per value."""
    return v.astype(np.float16).view(np.uint8).reshape(-1, 2)


def fp16_field(b: np.ndarray, start: int, dtype) -> np.ndarray:
    """The fp16 field at bytes [start, start + 2) of each block, widened to `dtype`, as a
    column (nblocks, 1) that broadcasts over the block."""
    return b[:, start : start + 2].copy().view(np.float16).astype(dtype)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Per 32 elements: element j in the low nibble of byte j, element j+16 in the high
    nibble (q is uint8 (nblocks, k * 32), the result (nblocks, k * 16))."""
    g = q.reshape(q.shape[0], -1, QK)
    out = g[:, :, : QK // 2] | (g[:, :, QK // 2 :] << np.uint8(4))
    return out.reshape(q.shape[0], -1)


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """The inverse of pack_nibbles: uint8 (nblocks, k * 16) -> (nblocks, k * 32)."""
    g = qs.reshape(qs.shape[0], -1, QK // 2)
    out = np.concatenate([g & np.uint8(0x0F), g >> np.uint8(4)], axis=2)
    return out.reshape(qs.shape[0], -1)
