# Cython binding: the scalar C block codecs (ckernels/src/codecs.c). Thin on purpose:
# every argument is checked here (dtype, contiguity, sizes) and ValueError raised before
# C touches any memory. Used by tests to compare C with the NumPy reference in formats/.
from libc.stdint cimport int64_t

import numpy as _np

cdef extern from "codecs.h":
    int kiln_quantize_row(int type, const float *x, void *y, int64_t n) nogil
    int kiln_dequantize_row(int type, const void *x, float *y, int64_t n) nogil
    int64_t kiln_row_size(int type, int64_t n) nogil


def codec_row_size(int type_, int64_t n):
    """Bytes in a row of n elements of ggml type id `type_` (0 if unknown or n invalid)."""
    return kiln_row_size(type_, n)


def _codec_row_bytes(int type_, int64_t n):
    cdef int64_t size = kiln_row_size(type_, n)
    if n <= 0 or size <= 0:
        raise ValueError(f"no C codec for ggml type {type_} with a row of {n} elements "
                         f"(block types need a positive multiple of 32)")
    return size


def quantize_row(int type_, x):
    """Encode a 1-D C-contiguous float32 array as ggml type id `type_` with the scalar C
    codec; returns the row's bytes as a uint8 array."""
    if not isinstance(x, _np.ndarray) or x.dtype != _np.float32 or x.ndim != 1:
        raise ValueError("quantize_row needs a 1-D float32 NumPy array")
    if not x.flags.c_contiguous:
        raise ValueError("quantize_row needs a C-contiguous array")
    cdef int64_t n = x.shape[0]
    out = _np.empty(_codec_row_bytes(type_, n), dtype=_np.uint8)
    cdef const float[::1] xv = x
    cdef unsigned char[::1] ov = out
    cdef int rc
    with nogil:
        rc = kiln_quantize_row(type_, &xv[0], &ov[0], n)
    if rc != 0:
        raise ValueError(f"no C quantizer for ggml type {type_}")
    return out


def dequantize_row(int type_, blocks, int64_t n):
    """Decode n elements of ggml type id `type_` from a 1-D C-contiguous uint8 array
    holding exactly one row's bytes; returns float32 (n,)."""
    if not isinstance(blocks, _np.ndarray) or blocks.dtype != _np.uint8 or blocks.ndim != 1:
        raise ValueError("dequantize_row needs a 1-D uint8 NumPy array")
    if not blocks.flags.c_contiguous:
        raise ValueError("dequantize_row needs a C-contiguous array")
    size = _codec_row_bytes(type_, n)
    if blocks.shape[0] != size:
        raise ValueError(f"{n} elements of ggml type {type_} are {size} bytes, got {blocks.shape[0]}")
    out = _np.empty(n, dtype=_np.float32)
    cdef const unsigned char[::1] bv = blocks
    cdef float[::1] ov = out
    cdef int rc
    with nogil:
        rc = kiln_dequantize_row(type_, &bv[0], &ov[0], n)
    if rc != 0:
        raise ValueError(f"no C dequantizer for ggml type {type_}")
    return out
