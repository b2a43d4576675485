"""GGUF v2/v3 reader: memory-maps the file, validates every field before using it, and
returns metadata as Python values and tensors as zero-copy NumPy views of the map.

Every length, count, dimension and offset is checked against the file's size before it
is used, so a malformed file raises `FormatError` naming the field and its offset —
never a read outside the map, a huge allocation or a long loop.
"""
from __future__ import annotations

import mmap
import os
import struct

import numpy as np

from .constants import (GGML_MAX_DIMS, GGML_MAX_NAME, GGML_NUMPY_DTYPES, GGML_QUANT_SIZES,
                        GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_SUPPORTED_VERSIONS, FormatError,
                        GGMLType)
from .constants import GGUFValueType as VT
from .metadata import SCALAR_DTYPES, SCALAR_FORMATS, GGUFMetadata, LazyStrings

# string arrays longer than this are decoded on first access (vocabularies, merges)
_LAZY_STRING_ARRAY = 64
_INT64_MAX = 2**63 - 1


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Tensor:
    """One tensor of a GGUF file.

    `data` is a read-only view of the memory map: F32/F16/F64/I8..I64 as that dtype in
    `shape`, BF16 as uint16 bits in `shape`, block types as raw uint8 blocks with shape
    (*shape[:-1], row bytes). `shape` is in NumPy order (the reverse of ggml's ne).
    """
    __slots__ = ("name", "type", "shape", "data", "offset", "nbytes")

    def __init__(self, name, type_, shape, data, offset, nbytes):
        self.name = name
        self.type = type_
        self.shape = shape
        self.data = data
        self.offset = offset  # absolute file offset of the first byte
        self.nbytes = nbytes

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def __repr__(self):
        return f"Tensor({self.name!r}, {self.type.name}, shape={self.shape}, nbytes={self.nbytes})"


class GGUFFile:
    """An open GGUF file: `.metadata` (GGUFMetadata), `.tensors` (dict name -> Tensor, in
    file order), `.version`, `.alignment`, `.data_offset`, `.path`, `.file_size`.

    Tensor views stay valid after `close()`: the map is released when the last view goes.
    """

    def __init__(self, path, version, metadata, tensors, alignment, data_offset, file_size, mm):
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self.alignment = alignment
        self.data_offset = data_offset
        self.file_size = file_size
        self._mmap = mm
        self._fh, self._identity = None, None  # the open file, and its size and mtime then

    def changed_on_disk(self) -> str | None:
        """How the file this map reads has changed since it was opened (truncated,
        extended, or written in place), or None. The map shows a file's current bytes, so
        a changed file would change what a consumer reads; a file replaced by a rename
        is not a change: the open file (and the map) are still the one loaded."""
        fh = self._fh
        if fh is None or fh.closed:
            return None
        st = os.fstat(fh.fileno())
        (size, mtime), now = self._identity, _identity(st)
        if now == self._identity:
            return None
        if st.st_size < size:
            return f"truncated from {size} to {st.st_size} bytes"
        if st.st_size > size:
            return f"extended from {size} to {st.st_size} bytes"
        return "written in place (its modification time changed)"

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # tensor views still use the map; it closes when they are gone

    def release_pages(self, names) -> None:
        """Drop the named tensors' pages from this process's resident memory.

        For tensors a consumer has copied into a layout of its own (the kernels repack
        Q4/Q8 matrices at load time): without this, the file's pages it read while
        copying stay resident and the process holds two copies of the weights. The data
        stays readable; a later access reads it back from the page cache. Only whole
        pages inside each tensor are dropped, never a neighbour's.
        """
        mm = self._mmap
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        for name in names:
            t = self.tensors[name]
            start = -(-t.offset // page) * page
            end = (t.offset + t.nbytes) // page * page
            if end > start:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"GGUFFile({self.path!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


class _Cursor:
    """Bounds-checked little-endian reads from the map."""

    def __init__(self, buf, size):
        self.buf = buf
        self.size = size
        self.off = 0

    def need(self, n: int, what: str) -> int:
        off = self.off
        if n < 0 or off + n > self.size:
            raise FormatError(f"{what} at offset {off}: needs {n} bytes but the file ends at {self.size}")
        self.off = off + n
        return off

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.need(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.need(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(what + " length")
        off = self.need(n, what)
        return self.buf[off : off + n].decode("utf-8", "surrogateescape")


def _read_value(c: _Cursor, t: VT, key: str):
    if t == VT.STRING:
        return c.string(f"string value of {key!r}")
    if t != VT.ARRAY:
        fmt = SCALAR_FORMATS[t]
        off = c.need(struct.calcsize(fmt), f"{t.name} value of {key!r}")
        v = struct.unpack_from(fmt, c.buf, off)[0]
        return bool(v) if t == VT.BOOL else v
    at = c.off
    sub_id = c.u32(f"array element type of {key!r}")
    if sub_id not in VT._value2member_map_:
        raise FormatError(f"array element type of {key!r} at offset {at}: unknown value type {sub_id}")
    sub = VT(sub_id)
    if sub == VT.ARRAY:
        raise FormatError(f"array {key!r} at offset {at}: nested arrays are not supported")
    at = c.off
    count = c.u64(f"array length of {key!r}")
    if sub == VT.STRING:
        # every string needs at least its 8-byte length: rejects absurd counts up front
        if count > (c.size - c.off) // 8:
            raise FormatError(f"array length of {key!r} at offset {at}: {count} strings "
                              f"do not fit in the {c.size - c.off} bytes left")
        start = c.off
        off = start
        unpack = _U64.unpack_from
        buf = c.buf
        try:
            for i in range(count):
                off += 8 + unpack(buf, off)[0]
        except (struct.error, OverflowError):  # a length ran far past the map
            off = c.size + 1
        if off > c.size:
            raise FormatError(f"string array {key!r} starting at offset {start}: "
                              f"a string length runs past the end of the file ({c.size})")
        c.off = off
        if count > _LAZY_STRING_ARRAY:
            return LazyStrings(buf[start:off], count)
        return LazyStrings(buf[start:off], count).decode()
    dt = SCALAR_DTYPES[sub]
    if count > (c.size - c.off) // dt.itemsize:
        raise FormatError(f"array length of {key!r} at offset {at}: {count} x {sub.name} "
                          f"does not fit in the {c.size - c.off} bytes left")
    off = c.need(count * dt.itemsize, f"array {key!r}")
    arr = np.frombuffer(c.buf, dtype=dt, count=count, offset=off)
    return arr.astype(bool).tolist() if sub == VT.BOOL else arr.tolist()


def _read_metadata(c: _Cursor, kv_count: int) -> GGUFMetadata:
    md = GGUFMetadata()
    for _ in range(kv_count):
        at = c.off
        key = c.string("metadata key")
        if dict.__contains__(md, key):
            raise FormatError(f"duplicate metadata key {key!r} at offset {at}")
        t_at = c.off
        t_id = c.u32(f"value type of {key!r}")
        if t_id not in VT._value2member_map_:
            raise FormatError(f"value type of {key!r} at offset {t_at}: unknown value type {t_id}")
        t = VT(t_id)
        sub_at = c.off
        value = _read_value(c, t, key)
        sub = VT(_U32.unpack_from(c.buf, sub_at)[0]) if t == VT.ARRAY else None
        dict.__setitem__(md, key, value)
        md.types[key] = (t, sub)
    return md


def _alignment(md: GGUFMetadata) -> int:
    if "general.alignment" not in md:
        return GGUF_DEFAULT_ALIGNMENT
    t, _ = md.types["general.alignment"]
    a = md["general.alignment"]
    if t != VT.UINT32:
        raise FormatError(f"general.alignment must be UINT32, not {t.name}")
    if a == 0 or a & (a - 1):
        raise FormatError(f"general.alignment is {a}: must be a power of two")
    return a


def read_gguf(path) -> GGUFFile:
    """Open a GGUF (v2 or v3) file. Raises FormatError if it is malformed, OSError if it
    cannot be opened."""
    path = os.fspath(path)
    fh = open(path, "rb")
    try:
        st = os.fstat(fh.fileno())
        size = st.st_size
        head = fh.read(4)
        if head != GGUF_MAGIC:
            if len(head) < 4:
                raise FormatError(f"{path}: not a GGUF file (only {size} bytes)")
            raise FormatError(f"{path}: not a GGUF file (magic {head!r} at offset 0, expected {GGUF_MAGIC!r})")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except BaseException:
        fh.close()
        raise
    try:
        f = _parse(path, mm, size)
    except FormatError as e:
        mm.close()
        fh.close()
        raise FormatError(f"{path}: {e}") from None
    except BaseException:
        mm.close()
        fh.close()
        raise
    f._fh, f._identity = fh, _identity(st)
    return f


def _identity(st) -> tuple:
    return st.st_size, st.st_mtime_ns


def _parse(path, mm, size) -> GGUFFile:
    c = _Cursor(mm, size)
    c.off = 4
    version = c.u32("version")
    if version not in GGUF_SUPPORTED_VERSIONS:
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise FormatError(f"GGUF version {version} at offset 4 is not supported{hint}: "
                          f"kiln reads versions {', '.join(map(str, GGUF_SUPPORTED_VERSIONS))}")
    tensor_count = c.u64("tensor count")
    kv_count = c.u64("metadata key-value count")
    # each KV needs >= 8 (key length) + 4 (type) + 1 bytes, each tensor info >= 8+4+4+8
    if kv_count > (size - c.off) // 13:
        raise FormatError(f"metadata key-value count {kv_count} at offset 16 cannot fit in a file of {size} bytes")
    if tensor_count > (size - c.off) // 24:
        raise FormatError(f"tensor count {tensor_count} at offset 8 cannot fit in a file of {size} bytes")
    md = _read_metadata(c, kv_count)
    alignment = _alignment(md)

    infos = []
    names = set()
    for i in range(tensor_count):
        at = c.off
        name = c.string(f"name of tensor {i}")
        if len(name.encode("utf-8", "surrogateescape")) >= GGML_MAX_NAME:
            raise FormatError(f"tensor name {name[:80]!r} at offset {at} is longer than {GGML_MAX_NAME - 1} bytes")
        if name in names:
            raise FormatError(f"duplicate tensor name {name!r} at offset {at}")
        names.add(name)
        d_at = c.off
        n_dims = c.u32(f"n_dims of tensor {name!r}")
        if n_dims > GGML_MAX_DIMS:
            raise FormatError(f"tensor {name!r}: n_dims {n_dims} at offset {d_at} is more than {GGML_MAX_DIMS}")
        ne = []
        n_el = 1
        for j in range(n_dims):
            d_at = c.off
            d = c.u64(f"dimension {j} of tensor {name!r}")
            if d > _INT64_MAX:
                raise FormatError(f"tensor {name!r}: dimension {j} at offset {d_at} is {d} (negative as int64)")
            ne.append(d)
            n_el *= d
            if n_el > _INT64_MAX:
                raise FormatError(f"tensor {name!r}: element count overflows int64 at dimension {j} (offset {d_at})")
        t_at = c.off
        t_id = c.u32(f"type of tensor {name!r}")
        if t_id not in GGMLType._value2member_map_:
            raise FormatError(f"tensor {name!r}: unknown ggml type id {t_id} at offset {t_at}")
        ttype = GGMLType(t_id)
        block, bsize = GGML_QUANT_SIZES[ttype]
        row = ne[0] if ne else 1  # ggml's ne defaults to 1 for missing dimensions
        if row % block:
            raise FormatError(f"tensor {name!r}: row length {row} is not a multiple of "
                              f"{ttype.name}'s block size {block}")
        o_at = c.off
        offset = c.u64(f"data offset of tensor {name!r}")
        if offset % alignment:
            raise FormatError(f"tensor {name!r}: data offset {offset} at offset {o_at} is not "
                              f"a multiple of the alignment {alignment}")
        infos.append((name, ttype, tuple(reversed(ne)), offset, n_el // block * bsize))

    data_offset = -(-c.off // alignment) * alignment
    tensors = {}
    end = data_offset
    for name, ttype, shape, offset, nbytes in sorted(infos, key=lambda t: t[3]):
        start = data_offset + offset
        if start < end:
            raise FormatError(f"tensor {name!r} (data offset {offset}) overlaps the previous tensor's data")
        end = start + nbytes
        if end > size:
            raise FormatError(f"tensor {name!r}: data [{start}, {end}) runs past the end of the file ({size} bytes)")
    for name, ttype, shape, offset, nbytes in infos:
        start = data_offset + offset
        raw = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=start) if nbytes else np.empty(0, np.uint8)
        dt = GGML_NUMPY_DTYPES.get(ttype)
        if dt is not None:
            data = raw.view(dt).reshape(shape)
        else:
            block, bsize = GGML_QUANT_SIZES[ttype]
            data = raw.reshape(*shape[:-1], shape[-1] // block * bsize) if shape else raw
        tensors[name] = Tensor(name, ttype, shape, data, start, nbytes)
    return GGUFFile(path, version, md, tensors, alignment, data_offset, size, mm)
