"""GGUF v3 writer: streams tensors to disk one at a time, atomically.

GGUF puts every tensor's name, shape, type and offset before the data, so a writer must
know all tensors before it writes any data, but never needs more than one tensor's data
in memory. `GGUFWriter` is an explicit state machine:

    with GGUFWriter("out.gguf") as w:        # nothing on disk yet
        w.add_metadata(md)                   # or w.add_key(key, value, type=None)
        w.add_tensor_info("token_embd.weight", GGMLType.Q8_0, (49152, 576))
        ...                                  # every tensor, in the order of their data
        w.write_header()                     # opens out.gguf.tmp-<pid>-<rand>; writes header, KVs, infos
        w.write_tensor("token_embd.weight", array)   # in the same order, one at a time
        w.write_tensor_chunk("blk.0.attn_q.weight", rows)  # or in pieces of whole rows, until
        ...                                                # the declared size is reached
    # leaving the block calls finish(): fsync, rename over out.gguf, fsync the directory

Calls out of order raise `GGUFWriterError`. If the block raises (or `abort()` is called)
the temp file is deleted and an existing out.gguf is left untouched. A process killed
mid-write leaves only its temp file, which the next successful write to the same target
deletes (the temp name carries the writer's pid; files of live processes are kept).

`write_tensor` accepts, for a tensor of type T and NumPy shape S:
  * float data of shape S (float32/float64/float16) for any type with a codec: it is
    encoded with `formats.quantize`, a bounded number of rows at a time;
  * data already in T's storage: uint8 raw bytes (any shape, T's byte count), or for
    F32/F16/F64/I8..I64 an array of that dtype and shape S, for BF16 uint16 bits of shape S.
Either may be a NumPy view of a memory map: only small chunks are ever copied.
`write_tensor_chunk` takes a tensor in pieces (raw bytes, or whole rows of either kind), so
a converter holds one chunk of a tensor at a time, never the whole tensor.
"""
from __future__ import annotations

import enum
import os
import struct
from typing import Any, Iterable, Iterator

import numpy as np

from .atomic import commit, create_temp, discard
from .constants import (GGML_MAX_DIMS, GGML_MAX_NAME, GGML_NUMPY_DTYPES, GGML_QUANT_SIZES,
                        GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, GGMLType)
from .constants import GGUFValueType as VT
from .metadata import SCALAR_DTYPES, SCALAR_FORMATS, GGUFMetadata, GGUFValue, check_value, infer_type
from .quants import quantize

_ENCODE_CHUNK_ELEMENTS = 1 << 22  # float rows are encoded ~16 MiB of float32 at a time



class GGUFWriterError(RuntimeError):
    """A GGUFWriter method was called out of order, or the tensors written do not match
    the tensor infos declared."""


class _State(enum.Enum):
    NEW = "adding metadata and tensor infos"
    DATA = "writing tensor data"
    DONE = "finished"
    ABORTED = "aborted"


def _pack_string(s) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _pack_value(value: Any, t: VT, sub: VT | None) -> bytes:
    if t == VT.STRING:
        return _pack_string(value)
    if t != VT.ARRAY:
        v = bool(value) if t == VT.BOOL else (float(value) if t in (VT.FLOAT32, VT.FLOAT64) else int(value))
        return struct.pack(SCALAR_FORMATS[t], v)
    head = struct.pack("<IQ", sub, len(value))
    if sub == VT.STRING:
        return head + b"".join(_pack_string(s) for s in value)
    return head + np.asarray(value).astype(SCALAR_DTYPES[sub]).tobytes()


class _TensorInfo:
    __slots__ = ("name", "type", "shape", "nbytes", "offset")

    def __init__(self, name, type_, shape, nbytes, offset):
        self.name, self.type, self.shape, self.nbytes, self.offset = name, type_, shape, nbytes, offset


def _pad(n: int, alignment: int) -> int:
    return -n % alignment


class GGUFWriter:
    """Streaming, atomic GGUF v3 writer (see the module docstring for the call order)."""

    def __init__(self, path, alignment: int | None = None):
        """alignment: data alignment in bytes (a power of two); None = the metadata's
        general.alignment if it has one, else 32. A value other than 32 is stored as
        general.alignment."""
        self.path = os.path.abspath(os.fspath(path))
        if alignment is not None and (alignment <= 0 or alignment & (alignment - 1) or alignment >= 2**32):
            raise ValueError(f"alignment {alignment} must be a power of two below 2^32")
        self._alignment_arg = alignment
        self.alignment = alignment or GGUF_DEFAULT_ALIGNMENT
        self._kv: dict[str, tuple[Any, VT, VT | None]] = {}
        self._tensors: list[_TensorInfo] = []
        self._names: set[str] = set()
        self._data_size = 0
        self._next = 0  # index of the next tensor whose data is due
        self._written = 0  # bytes of that tensor written so far (chunked writes)
        self._state = _State.NEW
        self._fh = None
        self.tmp_path: str | None = None

    # -- state ------------------------------------------------------------------------
    def _expect(self, state: _State, action: str) -> None:
        if self._state is not state:
            raise GGUFWriterError(f"cannot {action} while {self._state.value} (allowed only while {state.value})")

    # -- metadata and tensor infos (state NEW) ----------------------------------------
    def add_key(self, key: str, value: Any, type_: VT | None = None, sub_type: VT | None = None) -> None:
        """Add one metadata key. Without `type_`, the type is inferred (see
        formats.metadata.infer_type); a GGUFValue value carries its own type."""
        self._expect(_State.NEW, "add metadata")
        if not isinstance(key, str) or not key:
            raise ValueError(f"metadata key must be a non-empty str, got {key!r}")
        if key in self._kv:
            raise ValueError(f"duplicate metadata key {key!r}")
        if isinstance(value, GGUFValue):
            value, type_, sub_type = value
        if type_ is None:
            type_, sub_type = infer_type(value)
        type_ = VT(type_)
        sub_type = VT(sub_type) if sub_type is not None else None
        try:
            check_value(value, type_, sub_type)
        except ValueError as e:
            raise ValueError(f"metadata key {key!r}: {e}") from None
        if key == "general.alignment":
            if type_ != VT.UINT32 or value <= 0 or value & (value - 1):
                raise ValueError(f"general.alignment must be a UINT32 power of two, got {value!r}")
            if self._alignment_arg is not None and value != self._alignment_arg:
                raise ValueError(f"general.alignment {value} conflicts with alignment={self._alignment_arg}")
            if self._tensors:
                raise GGUFWriterError("set general.alignment before adding tensor infos")
            self.alignment = int(value)
        self._kv[key] = (value, type_, sub_type)

    def add_metadata(self, metadata) -> None:
        """Add every key of a dict; a GGUFMetadata (from read_gguf) keeps each key's type."""
        typed = isinstance(metadata, GGUFMetadata)
        for key, value in metadata.items():
            t = metadata.types.get(key) if typed else None
            if t is not None and not isinstance(value, GGUFValue):
                self.add_key(key, value, *t)
            else:
                self.add_key(key, value)

    def add_tensor_info(self, name: str, type_: GGMLType, shape: Iterable[int]) -> None:
        """Declare a tensor (NumPy-order shape). Data must later come in declaration order."""
        self._expect(_State.NEW, "add tensor info")
        type_ = GGMLType(type_)
        shape = tuple(int(s) for s in shape)
        nb = len(name.encode("utf-8", "surrogateescape"))
        if not name or nb >= GGML_MAX_NAME:
            raise ValueError(f"tensor name {name!r} must be 1..{GGML_MAX_NAME - 1} bytes")
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        if not 1 <= len(shape) <= GGML_MAX_DIMS or any(s < 0 for s in shape):
            raise ValueError(f"tensor {name!r}: shape {shape} must have 1..{GGML_MAX_DIMS} non-negative dims")
        block, size = GGML_QUANT_SIZES[type_]
        if shape[-1] % block:
            raise ValueError(f"tensor {name!r}: row length {shape[-1]} is not a multiple of "
                             f"{type_.name}'s block size {block}")
        n_el = int(np.prod(shape, dtype=object))
        nbytes = n_el // block * size
        self._names.add(name)
        self._tensors.append(_TensorInfo(name, type_, shape, nbytes, self._data_size))
        self._data_size += nbytes + _pad(nbytes, self.alignment)

    # -- writing ----------------------------------------------------------------------
    def write_header(self) -> None:
        """Create the temp file and write the header, metadata and tensor infos."""
        self._expect(_State.NEW, "write the header")
        if self.alignment != GGUF_DEFAULT_ALIGNMENT and "general.alignment" not in self._kv:
            self._kv["general.alignment"] = (self.alignment, VT.UINT32, None)
        parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(self._tensors), len(self._kv))]
        for key, (value, t, sub) in self._kv.items():
            parts += [_pack_string(key), struct.pack("<I", t), _pack_value(value, t, sub)]
        for ti in self._tensors:
            parts += [_pack_string(ti.name), struct.pack("<I", len(ti.shape)),
                      struct.pack(f"<{len(ti.shape)}Q", *reversed(ti.shape)),
                      struct.pack("<IQ", ti.type, ti.offset)]
        header = b"".join(parts)
        header += b"\0" * _pad(len(header), self.alignment)
        fd, self.tmp_path = create_temp(self.path)
        self._fh = os.fdopen(fd, "wb")
        self._state = _State.DATA
        self._fh.write(header)

    def _due(self, name: str, action: str) -> _TensorInfo:
        """The info of tensor `name` if its data is due now, else GGUFWriterError."""
        self._expect(_State.DATA, action)
        if self._next >= len(self._tensors):
            raise GGUFWriterError(f"tensor {name!r}: all {len(self._tensors)} declared tensors "
                                  f"are already written")
        ti = self._tensors[self._next]
        if name != ti.name:
            if self._written:
                raise GGUFWriterError(f"got data for tensor {name!r} while {ti.name!r} is "
                                      f"incomplete ({self._written} of {ti.nbytes} bytes written)")
            raise GGUFWriterError(f"expected data for tensor {ti.name!r} (declaration order), got {name!r}")
        return ti

    def write_tensor(self, name: str, data) -> None:
        """Write all the data of the next declared tensor, `name` (see the module docstring
        for the accepted arrays), followed by alignment padding. `data` may also be an
        iterator of chunks (each as for write_tensor_chunk) that together make the whole
        tensor."""
        ti = self._due(name, "write tensor data")
        if self._written:
            raise GGUFWriterError(f"tensor {name!r} is partly written ({self._written} of "
                                  f"{ti.nbytes} bytes); continue it with write_tensor_chunk")
        if isinstance(data, Iterator):
            for chunk in data:
                self.write_tensor_chunk(name, chunk)
            if self._next < len(self._tensors) and self._tensors[self._next] is ti:
                if self._written < ti.nbytes:
                    raise GGUFWriterError(f"tensor {name!r}: the chunks gave {self._written} bytes, "
                                          f"{ti.type.name} shape {ti.shape} needs {ti.nbytes}")
                self._end_tensor(ti)  # a zero-byte tensor given no chunks at all
            return
        arr = np.asarray(data)
        if not (arr.dtype == np.uint8 and ti.type != GGMLType.I8) and arr.shape != ti.shape and (
                arr.dtype == GGML_NUMPY_DTYPES.get(ti.type) or arr.dtype.kind == "f"):
            raise ValueError(f"tensor {name!r}: shape {arr.shape} does not match the declared {ti.shape}")
        n = self._chunk_nbytes(ti, arr)
        if n != ti.nbytes:
            raise ValueError(f"tensor {name!r}: {n} raw bytes given, {ti.type.name} "
                             f"shape {ti.shape} needs {ti.nbytes}")
        self._write_chunk(ti, arr, n)

    def write_tensor_chunk(self, name: str, data) -> None:
        """Write the next piece of tensor `name`'s data, so a tensor never has to be in
        memory whole. A piece is raw bytes in the tensor's type (uint8, any length), or
        whole rows (last dimension = the tensor's row length; for a 1-D tensor, a multiple
        of the type's block size) of float data to encode or of the type's own dtype.
        Pieces follow each other in C order; when they add up to the declared size the
        tensor is complete (padding follows). Too many bytes, or another tensor or finish()
        before the declared size is reached, raise GGUFWriterError."""
        ti = self._due(name, "write tensor data")
        arr = np.asarray(data)
        n = self._chunk_nbytes(ti, arr)
        if self._written + n > ti.nbytes:
            raise GGUFWriterError(f"tensor {name!r}: a chunk of {n} bytes after {self._written} "
                                  f"exceeds the declared {ti.nbytes} ({ti.type.name} shape {ti.shape})")
        self._write_chunk(ti, arr, n)

    def _chunk_nbytes(self, ti: _TensorInfo, arr: np.ndarray) -> int:
        """Bytes `arr` becomes in the file as (part of) tensor ti; ValueError if unusable."""
        if arr.dtype == np.uint8 and ti.type != GGMLType.I8:
            return arr.nbytes
        raw_dt = GGML_NUMPY_DTYPES.get(ti.type)
        if not (raw_dt is not None and arr.dtype == raw_dt) and arr.dtype.kind != "f":
            raise ValueError(f"tensor {ti.name!r}: cannot store a {arr.dtype} array as {ti.type.name}")
        block, size = GGML_QUANT_SIZES[ti.type]
        whole_rows = arr.ndim >= 1 and (arr.shape[-1] == ti.shape[-1] if len(ti.shape) > 1
                                        else arr.ndim == 1 and arr.size % block == 0)
        if not whole_rows:
            raise ValueError(f"tensor {ti.name!r}: a chunk of shape {arr.shape} is not whole rows "
                             f"of the declared {ti.type.name} shape {ti.shape}")
        return arr.size // block * size

    def _write_chunk(self, ti: _TensorInfo, arr: np.ndarray, n: int) -> None:
        if arr.dtype.kind == "f" and arr.dtype != GGML_NUMPY_DTYPES.get(ti.type):
            self._write_encoded(arr, ti.type)
        else:
            self._write_raw(arr)
        self._written += n
        if self._written == ti.nbytes:
            self._end_tensor(ti)

    def _end_tensor(self, ti: _TensorInfo) -> None:
        self._fh.write(b"\0" * _pad(ti.nbytes, self.alignment))
        self._next += 1
        self._written = 0

    def _write_raw(self, arr: np.ndarray) -> None:
        for piece in _pieces(arr, 1):
            self._fh.write(np.ascontiguousarray(piece).view(np.uint8).data)

    def _write_encoded(self, arr: np.ndarray, type_: GGMLType) -> None:
        for piece in _pieces(arr, GGML_QUANT_SIZES[type_][0]):
            self._fh.write(quantize(piece, type_).data)

    def finish(self) -> None:
        """Check every tensor was written, fsync, and rename the temp file into place."""
        if self._state is _State.NEW:
            self.write_header()
        self._expect(_State.DATA, "finish")
        if self._next != len(self._tensors):
            ti = self._tensors[self._next]
            raise GGUFWriterError(f"finish() before all tensors were written: next is {ti.name!r} "
                                  f"({self._written} of its {ti.nbytes} bytes written; "
                                  f"{self._next} of {len(self._tensors)} tensors done)")
        fh, self._fh = self._fh, None
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        commit(self.tmp_path, self.path)
        self._state = _State.DONE

    def abort(self) -> None:
        """Discard everything written; the target path is untouched."""
        if self._state in (_State.DONE, _State.ABORTED):
            return
        self._state = _State.ABORTED
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()
        if self.tmp_path is not None:
            discard(self.tmp_path)

    def __del__(self):
        # dropped without finish(): discard the partial file like an exception would
        if getattr(self, "_state", None) is _State.DATA:
            self.abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            return
        try:
            if self._state is not _State.DONE:
                self.finish()
        except BaseException:
            self.abort()
            raise


def _pieces(arr: np.ndarray, block: int):
    """Consecutive pieces of `arr` in C order, each about _ENCODE_CHUNK_ELEMENTS elements,
    so a strided or memory-mapped array is never copied whole. A 1-D array is cut at
    multiples of `block` (blocks are encoded independently)."""
    if arr.ndim <= 1:
        step = max(block, _ENCODE_CHUNK_ELEMENTS // block * block)
        for i in range(0, arr.size, step):
            yield arr[i : i + step]
        return
    inner = arr[0].size if arr.shape[0] else 0
    if inner > _ENCODE_CHUNK_ELEMENTS:
        for sub in arr:
            yield from _pieces(sub, block)
        return
    step = max(1, _ENCODE_CHUNK_ELEMENTS // max(inner, 1))
    for i in range(0, arr.shape[0], step):
        yield arr[i : i + step]


def write_gguf(path, metadata, tensors, alignment: int | None = None) -> None:
    """Write a GGUF v3 file atomically.

    metadata: dict of key -> value (a GGUFMetadata keeps its types; GGUFValue forces one).
    tensors: iterable of (name, GGMLType, NumPy shape, data), where data is an array (see
    GGUFWriter.write_tensor) or a zero-argument callable returning one, called when that
    tensor's turn comes — so a converter can stream tensors without holding them all.
    alignment: default is metadata's general.alignment, else 32.
    """
    tensors = list(tensors)
    with GGUFWriter(path, alignment) as w:
        w.add_metadata(metadata)
        for name, type_, shape, _ in tensors:
            w.add_tensor_info(name, type_, shape)
        w.write_header()
        for name, _, _, data in tensors:
            w.write_tensor(name, data() if callable(data) else data)
