"""Block codecs: the vectorized NumPy reference, bit-exact with ggml's *_ref quantizers.

Every function works on whole rows (..., n) of float32 and produces the GGUF byte layout
(..., n // block * bytes_per_block) as uint8. The C scalar codecs (ckernels/src/codecs.c)
are tested bit for bit against these.

ggml's quantizers round and compare in float32 in a particular order (e.g. Q4_0 scales by
the *signed* value of largest magnitude, the first one on ties; Q8_0 uses roundf, which
rounds halves away from zero); the code below reproduces each step in float32. Work is
done in chunks of blocks so temporaries stay in cache and memory stays bounded.
"""
from __future__ import annotations

import numpy as np

from . import _blocks as _b
from . import iquants, kquants
from .constants import GGML_QUANT_SIZES, QK, GGMLType

_CHUNK_BLOCKS = 8192  # 256K floats (1 MiB) per step: temporaries fit in L2

_F32 = np.float32
# the shared helpers (_blocks.py) under the names the codecs here use
_first_value = _b.first_value
_signed_absmax = _b.signed_absmax
_first_zero_fix = _b.first_zero_fix
_inverse = _b.inverse
_fp16_bytes = _b.fp16_bytes
_fp16_scale = _b.fp16_field
_pack_nibbles = _b.pack_nibbles


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (halves away from zero), exactly: trunc plus the rounded-off half."""
    t = np.trunc(v)
    return t + np.trunc((v - t) * _F32(2.0))


def _q4_0(b: np.ndarray, out: np.ndarray) -> None:
    d = _signed_absmax(b) / _F32(-8)
    q = b * _inverse(d)[:, None]
    q += _F32(8.5)
    # values lie in [0, 16.5): the uint8 cast truncates like ggml's (int8_t) cast
    qi = np.minimum(q.astype(np.uint8), np.uint8(15))
    out[:, 0:2] = _fp16_bytes(d)
    out[:, 2:] = _pack_nibbles(qi)


def _q4_1(b: np.ndarray, out: np.ndarray) -> None:
    mn = _first_zero_fix(b, b.min(axis=1))
    mx = _first_zero_fix(b, b.max(axis=1))
    d = (mx - mn) / _F32(15)
    q = b - mn[:, None]
    q *= _inverse(d)[:, None]
    q += _F32(0.5)
    qi = np.minimum(q.astype(np.uint8), np.uint8(15))
    out[:, 0:2] = _fp16_bytes(d)
    out[:, 2:4] = _fp16_bytes(mn)
    out[:, 4:] = _pack_nibbles(qi)


def _q5_bits(qi: np.ndarray, out: np.ndarray) -> None:
    """5-bit quants (nblocks, 32) into qh (bit j = bit 4 of element j, a little-endian
    uint32) and qs (the low nibbles, packed as in Q4_0): out is (nblocks, 20)."""
    hi = (qi >> np.uint8(4)) & np.uint8(1)
    out[:, 0:4] = np.packbits(hi, axis=1, bitorder="little")
    out[:, 4:] = _pack_nibbles(qi & np.uint8(0x0F))


def _q5_0(b: np.ndarray, out: np.ndarray) -> None:
    d = _signed_absmax(b) / _F32(-16)
    q = b * _inverse(d)[:, None]
    q += _F32(16.5)
    # values lie in [0, 32.5): the uint8 cast truncates like ggml's (int8_t) cast
    qi = np.minimum(q.astype(np.uint8), np.uint8(31))
    out[:, 0:2] = _fp16_bytes(d)
    _q5_bits(qi, out[:, 2:])


def _q5_1(b: np.ndarray, out: np.ndarray) -> None:
    mn = _first_zero_fix(b, b.min(axis=1))
    mx = _first_zero_fix(b, b.max(axis=1))
    d = (mx - mn) / _F32(31)
    q = b - mn[:, None]
    q *= _inverse(d)[:, None]
    q += _F32(0.5)
    qi = q.astype(np.uint8)  # ggml does not clamp: (x - min) / d + 0.5 stays below 32
    out[:, 0:2] = _fp16_bytes(d)
    out[:, 2:4] = _fp16_bytes(mn)
    _q5_bits(qi, out[:, 4:])


def _q8(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.abs(b).max(axis=1) / _F32(127)
    q = _roundf(b * _inverse(d)[:, None]).astype(np.int8)
    return d, q


def _q8_0(b: np.ndarray, out: np.ndarray) -> None:
    d, q = _q8(b)
    out[:, 0:2] = _fp16_bytes(d)
    out[:, 2:] = q.view(np.uint8)


def _q8_1(b: np.ndarray, out: np.ndarray) -> None:
    d, q = _q8(b)
    s = q.sum(axis=1, dtype=np.int32).astype(_F32) * d  # ggml: (float)sum * d
    out[:, 0:2] = _fp16_bytes(d)
    out[:, 2:4] = _fp16_bytes(s)
    out[:, 4:] = q.view(np.uint8)


_BLOCK_QUANTIZERS = {
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q8_1: _q8_1,
    **iquants.BLOCK_QUANTIZERS,
    **kquants.BLOCK_QUANTIZERS,
}


# The element types: stored as NumPy floats (BF16 as its bits), no blocks.
FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN forced quiet."""
    u = x.view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    r = (u.astype(np.uint64) + (np.uint64(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint64(16)
    r = r.astype(np.uint16)
    if nan.any():
        r[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(64)).astype(np.uint16)
    return r


def quantize(x, type_: GGMLType) -> np.ndarray:
    """Encode float rows (..., n) as `type_`; returns uint8 (..., row bytes).

    Input of another float dtype is first rounded to float32 (ggml quantizes float32).
    n must be a multiple of the type's block size.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # ggml lets fp16 scales overflow to inf
        return _quantize(x, type_)


def _quantize(x, type_: GGMLType) -> np.ndarray:
    type_ = GGMLType(type_)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("quantize needs at least one dimension")
    n = x.shape[-1]
    lead = x.shape[:-1]
    if type_ == GGMLType.F32:
        return x.view(np.uint8).reshape(*lead, n * 4)
    if type_ == GGMLType.F16:
        return x.astype(np.float16).view(np.uint8).reshape(*lead, n * 2)
    if type_ == GGMLType.BF16:
        return _bf16_bits(x.reshape(-1)).view(np.uint8).reshape(*lead, n * 2)
    fn = _BLOCK_QUANTIZERS.get(type_)
    if fn is None:
        raise NotImplementedError(f"quantizing to {type_.name} is not supported")
    block, size = GGML_QUANT_SIZES[type_]
    if n % block:
        raise ValueError(f"row length {n} is not a multiple of {type_.name}'s block size {block}")
    blocks = x.reshape(-1, block)
    out = np.empty((blocks.shape[0], size), dtype=np.uint8)
    for i in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        fn(blocks[i : i + _CHUNK_BLOCKS], out[i : i + _CHUNK_BLOCKS])
    return out.reshape(*lead, n // block * size)


# Block dequantizers: fn(b, out) with uint8 blocks b (nblocks, type_size) writes out
# (nblocks, block_size) in out's dtype: float32 follows ggml's float32 arithmetic, float64
# evaluates the same formula in float64 (the exact values of the quantized weights).

def _dq_q4_0(b: np.ndarray, out: np.ndarray) -> None:
    d = _fp16_scale(b, 0, out.dtype)
    qs = b[:, 2:]
    out[:, : QK // 2] = (qs & np.uint8(0x0F)).astype(np.int8) - np.int8(8)
    out[:, QK // 2 :] = (qs >> np.uint8(4)).astype(np.int8) - np.int8(8)
    out *= d


def _dq_q4_1(b: np.ndarray, out: np.ndarray) -> None:
    d = _fp16_scale(b, 0, out.dtype)
    m = _fp16_scale(b, 2, out.dtype)
    qs = b[:, 4:]
    out[:, : QK // 2] = qs & np.uint8(0x0F)
    out[:, QK // 2 :] = qs >> np.uint8(4)
    out *= d
    out += m


def _dq_q5(b: np.ndarray, out: np.ndarray) -> None:
    """The 5-bit quants of a Q5_0 / Q5_1 block from its qh (4 bytes) and qs (16 bytes)."""
    hi = np.unpackbits(b[:, 0:4], axis=1, bitorder="little") << np.uint8(4)
    out[:] = _b.unpack_nibbles(b[:, 4:]) | hi


def _dq_q5_0(b: np.ndarray, out: np.ndarray) -> None:
    d = _fp16_scale(b, 0, out.dtype)
    _dq_q5(b[:, 2:], out)
    out -= 16
    out *= d


def _dq_q5_1(b: np.ndarray, out: np.ndarray) -> None:
    d = _fp16_scale(b, 0, out.dtype)
    m = _fp16_scale(b, 2, out.dtype)
    _dq_q5(b[:, 4:], out)
    out *= d
    out += m


def _dq_q8(b: np.ndarray, out: np.ndarray, start: int) -> None:
    d = _fp16_scale(b, 0, out.dtype)
    out[:] = b[:, start:].view(np.int8)
    out *= d


_BLOCK_DEQUANTIZERS = {
    GGMLType.Q4_0: _dq_q4_0,
    GGMLType.Q4_1: _dq_q4_1,
    GGMLType.Q5_0: _dq_q5_0,
    GGMLType.Q5_1: _dq_q5_1,
    GGMLType.Q8_0: lambda b, out: _dq_q8(b, out, 2),
    GGMLType.Q8_1: lambda b, out: _dq_q8(b, out, 4),  # s is only used by dot products
    **iquants.BLOCK_DEQUANTIZERS,
    **kquants.BLOCK_DEQUANTIZERS,
}


# What quantize() encodes and dequantize() decodes: the float types and each block codec.
ENCODABLE_TYPES = FLOAT_TYPES + tuple(_BLOCK_QUANTIZERS)
DECODABLE_TYPES = FLOAT_TYPES + tuple(_BLOCK_DEQUANTIZERS)


_DEQUANTIZE_DTYPES = (np.float32, np.float64)


def dequantize(blocks, type_: GGMLType, shape, dtype=np.float32) -> np.ndarray:
    """Decode the raw bytes of a `type_` tensor of NumPy shape `shape`.

    dtype=np.float32 gives ggml's dequantized values (its float32 arithmetic, bit for bit);
    dtype=np.float64 evaluates the same formulas in float64, which gives the exact values
    the quantized weights stand for (every type's formula is exact in float64).
    """
    dtype = np.dtype(dtype)
    if dtype not in _DEQUANTIZE_DTYPES:
        raise ValueError(f"dequantize gives float32 or float64, not {dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # inf scales decode to inf / NaN, as in ggml
        return _dequantize(blocks, type_, shape, dtype)


def _dequantize(blocks, type_: GGMLType, shape, dtype: np.dtype) -> np.ndarray:
    type_ = GGMLType(type_)
    shape = tuple(int(s) for s in shape)
    raw = np.ascontiguousarray(blocks).reshape(-1).view(np.uint8)
    n_el = int(np.prod(shape, dtype=np.int64)) if shape else 1
    block, size = GGML_QUANT_SIZES[type_]
    if shape and shape[-1] % block:
        raise ValueError(f"row length {shape[-1]} is not a multiple of {type_.name}'s block size {block}")
    want = n_el // block * size
    if raw.size != want:
        raise ValueError(f"{type_.name} tensor of shape {shape} needs {want} bytes, got {raw.size}")
    if type_ == GGMLType.F32:
        return raw.view(_F32).reshape(shape).astype(dtype)
    if type_ == GGMLType.F16:
        return raw.view(np.float16).astype(dtype).reshape(shape)
    if type_ == GGMLType.BF16:  # the bits above float32's lower half: exact in both dtypes
        f = (raw.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(_F32)
        return f.astype(dtype).reshape(shape)
    fn = _BLOCK_DEQUANTIZERS.get(type_)
    if fn is None:
        raise NotImplementedError(f"dequantizing {type_.name} is not supported")
    b = raw.reshape(-1, size)
    out = np.empty((b.shape[0], block), dtype=dtype)
    for i in range(0, b.shape[0], _CHUNK_BLOCKS):
        fn(b[i : i + _CHUNK_BLOCKS], out[i : i + _CHUNK_BLOCKS])
    return out.reshape(shape)
