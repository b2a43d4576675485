"""Safetensors files: a memory-mapped reader (one tensor at a time) and a streaming writer.

The format (huggingface/safetensors): u64 little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`,
then the data section; offsets are relative to its start, tensors are C-contiguous and
little-endian.

Reading maps the file and hands out NumPy views, so opening a 10 GB checkpoint costs
nothing. `tensor_f32` widens F16/BF16 one tensor at a time (BF16 is the top half of an
IEEE float32, so widening is a shift) and `release` drops the pages a tensor occupied from
this process's resident set once the caller is done with it, so the peak memory of a pass
over all tensors is about one tensor, not the model.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .atomic import atomic_write

# Sizes of every dtype the format defines, so a header naming any of them validates; only
# the float types below are convertible.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}
READABLE_DTYPES = ("F32", "F16", "BF16")
_NUMPY_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_MAX_HEADER = 100 << 20  # the reference implementation's own limit


def _format_error(msg: str) -> Exception:
    # formats.FormatError is the one exception type for malformed files; imported late so
    # this module can be imported by formats/__init__ in any order.
    from formats import FormatError
    return FormatError(msg)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str            # safetensors dtype name: "F32", "F16", "BF16", ...
    shape: tuple          # NumPy order
    begin: int            # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class SafetensorsFile:
    """A memory-mapped .safetensors file. Use as a context manager or call close()."""

    def __init__(self, path):
        self.path = str(path)
        self._file = open(self.path, "rb")
        self._map = None
        try:
            size = os.fstat(self._file.fileno()).st_size
            self.file_size = size
            if size < 8:
                raise _format_error(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n_header,) = struct.unpack("<Q", self._file.read(8))
            if n_header > _MAX_HEADER or 8 + n_header > size:
                raise _format_error(f"{self.path}: header length {n_header} at offset 0 "
                                    f"exceeds the file size {size}")
            raw = self._file.read(n_header)
            try:
                header = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _format_error(f"{self.path}: header is not valid JSON ({e})") from None
            if not isinstance(header, dict):
                raise _format_error(f"{self.path}: header is not a JSON object")
            self.metadata = header.pop("__metadata__", None) or {}
            self.data_start = 8 + n_header
            self.tensors: dict[str, TensorInfo] = {}
            spans = []
            for name, entry in header.items():
                info = self._parse_entry(name, entry, size)
                self.tensors[name] = info
                spans.append((info.begin, info.end, name))
            spans.sort()
            for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
                if b1 < e0:
                    raise _format_error(f"{self.path}: tensors {n0!r} and {n1!r} overlap")
            if size > self.data_start:
                self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self._file.close()
            raise

    def _parse_entry(self, name, entry, size) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise _format_error(f"{where}: entry is not an object")
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise _format_error(f"{where}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or
                not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise _format_error(f"{where}: shape {shape!r} is not a list of non-negative ints")
        if (not isinstance(offs, list) or len(offs) != 2 or
                not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise _format_error(f"{where}: data_offsets {offs!r} is not [begin, end]")
        begin, end = offs
        n = 1
        for d in shape:
            n *= d
        if not 0 <= begin <= end or self.data_start + end > size:
            raise _format_error(f"{where}: data_offsets [{begin}, {end}] lie outside the "
                                f"data section of {size - self.data_start} bytes")
        if end - begin != n * DTYPE_SIZES[dtype]:
            raise _format_error(f"{where}: {end - begin} bytes of data for shape {shape} "
                                f"of {dtype} ({n * DTYPE_SIZES[dtype]} expected)")
        return TensorInfo(name, dtype, tuple(shape), self.data_start + begin, self.data_start + end)

    # -- access -----------------------------------------------------------------------
    def tensor(self, name) -> np.ndarray:
        """Zero-copy view: F32 as float32, F16 as float16, BF16 as its raw uint16 bits."""
        info = self.tensors[name]
        if info.dtype not in _NUMPY_DTYPES:
            raise _format_error(f"{self.path}: tensor {name!r} has dtype {info.dtype}; "
                                f"readable dtypes are {', '.join(READABLE_DTYPES)}")
        if info.nbytes == 0:
            return np.zeros(info.shape, _NUMPY_DTYPES[info.dtype])
        return np.frombuffer(self._map, _NUMPY_DTYPES[info.dtype], info.n_elements,
                             info.begin).reshape(info.shape)

    def tensor_f32(self, name) -> np.ndarray:
        """The tensor as float32 (a view for F32, a new array for F16/BF16)."""
        info = self.tensors[name]
        x = self.tensor(name)
        if info.dtype == "BF16":
            return bf16_to_f32(x)
        if info.dtype == "F16":
            return x.astype(np.float32)
        return x

    def release(self, name, start: int = 0, end: int | None = None) -> None:
        """Drop the pages of bytes [start, end) of a tensor from this process's resident
        set (they stay in the page cache; a later read faults them back in)."""
        info = self.tensors[name]
        end = info.nbytes if end is None else min(end, info.nbytes)
        if self._map is None or end <= start:
            return
        page = mmap.PAGESIZE
        first = (info.begin + start) // page * page
        try:
            self._map.madvise(mmap.MADV_DONTNEED, first, info.begin + end - first)
        except (AttributeError, OSError, ValueError):
            pass  # an optimisation only: platforms without madvise keep the pages

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                # Views still alive: leave the map to the garbage collector.
                pass
            self._map = None
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32."""
    from formats import GGMLType, dequantize
    return dequantize(bits, GGMLType.BF16, bits.shape)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits as ggml does (nearest even, NaN kept quiet)."""
    from formats import GGMLType, quantize
    x = np.asarray(x, dtype=np.float32)
    return quantize(x.reshape(-1, x.shape[-1] if x.ndim else 1), GGMLType.BF16).view(
        np.uint16).reshape(x.shape)


def write_safetensors(path, tensors: Iterable, metadata: dict | None = None) -> None:
    """Write a .safetensors file atomically, one tensor in memory at a time.

    `tensors` yields (name, dtype, shape, produce): dtype one of "F32", "F16", "BF16";
    produce() returns the data (float32/float16 array; for BF16 a float32 array, rounded
    here, or uint16 bits). The header needs every shape first, so data is produced only
    while writing.
    """
    entries = list(tensors)
    header = {}
    offset = 0
    for name, dtype, shape, _ in entries:
        if dtype not in READABLE_DTYPES:
            raise ValueError(f"cannot write dtype {dtype}")
        n = int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer aligns the data section to 8
    path = Path(path)
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape, produce in entries:
            data = np.asarray(produce())
            if dtype == "BF16":
                bits = data if data.dtype == np.uint16 else f32_to_bf16(data)
            else:
                bits = np.ascontiguousarray(data, dtype=_NUMPY_DTYPES[dtype])
            if bits.size != int(np.prod(shape, dtype=np.int64)):
                raise ValueError(f"tensor {name}: produced {bits.size} elements "
                                 f"for shape {tuple(shape)}")
            # the format is little-endian; so is every platform kiln runs on
            f.write(np.ascontiguousarray(bits).data)
