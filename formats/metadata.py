"""GGUF metadata values and their types.

`GGUFMetadata` is the dict `read_gguf` returns: plain Python values (int, float, bool, str,
lists of those) plus `.types`, the GGUF type each key had in the file, so passing it back
to the writer reproduces the file's types exactly. Large string arrays (a vocabulary of
49,152 tokens, 48,900 merges) are decoded to `list[str]` on first access, which keeps
opening a model file fast; their bytes are copied out of the file at open (a memcpy), so
the metadata stays valid after the file is closed.

For plain dicts given to the writer, `value_type` picks the type llama.cpp uses for such
keys (UINT32 for counts and token ids, FLOAT32 for floats, STRING, ARRAY of STRING /
FLOAT32 / INT32); wrap a value in `GGUFValue(value, type)` to force another type.
"""
from __future__ import annotations

import struct
from typing import Any, NamedTuple

import numpy as np

from .constants import GGUFValueType as VT

# scalar type -> struct format (little-endian, as GGUF v3 is)
SCALAR_FORMATS: dict[VT, str] = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h",
    VT.UINT32: "<I", VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<?",
    VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d",
}
# scalar type -> NumPy dtype of one array element
SCALAR_DTYPES: dict[VT, np.dtype] = {
    VT.UINT8: np.dtype("<u1"), VT.INT8: np.dtype("<i1"), VT.UINT16: np.dtype("<u2"),
    VT.INT16: np.dtype("<i2"), VT.UINT32: np.dtype("<u4"), VT.INT32: np.dtype("<i4"),
    VT.FLOAT32: np.dtype("<f4"), VT.BOOL: np.dtype("u1"), VT.UINT64: np.dtype("<u8"),
    VT.INT64: np.dtype("<i8"), VT.FLOAT64: np.dtype("<f8"),
}
_INT_TYPES = {VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64}
_FLOAT_TYPES = {VT.FLOAT32, VT.FLOAT64}
_DTYPE_TO_VT = {np.dtype(np.bool_): VT.BOOL, **{v: k for k, v in SCALAR_DTYPES.items() if k != VT.BOOL}}

# A metadata key's GGUF type: (type, element type for arrays else None)
KeyType = tuple[VT, "VT | None"]


class GGUFValue(NamedTuple):
    """A metadata value with an explicit GGUF type, e.g.
    `GGUFValue(7, GGUFValueType.UINT64)` or
    `GGUFValue([1, 2], GGUFValueType.ARRAY, GGUFValueType.UINT8)`."""
    value: Any
    type: VT
    sub_type: VT | None = None


def _int_range(t: VT) -> tuple[int, int]:
    info = np.iinfo(SCALAR_DTYPES[t])
    return int(info.min), int(info.max)


def infer_type(value: Any) -> KeyType:
    """The GGUF type llama.cpp would use for a plain Python / NumPy value."""
    if isinstance(value, GGUFValue):
        return VT(value.type), (VT(value.sub_type) if value.sub_type is not None else None)
    if isinstance(value, (bool, np.bool_)):
        return VT.BOOL, None
    if isinstance(value, np.generic):
        if value.dtype in _DTYPE_TO_VT:
            return _DTYPE_TO_VT[value.dtype.newbyteorder("<")], None
        raise ValueError(f"no GGUF type for NumPy {value.dtype}")
    if isinstance(value, int):
        for t in (VT.UINT32, VT.INT32, VT.UINT64, VT.INT64):
            lo, hi = _int_range(t)
            if lo <= value <= hi:
                return t, None
        raise ValueError(f"integer {value} does not fit in 64 bits")
    if isinstance(value, float):
        return VT.FLOAT32, None
    if isinstance(value, (str, bytes)):
        return VT.STRING, None
    if isinstance(value, np.ndarray):
        dt = value.dtype.newbyteorder("<") if value.dtype.byteorder == ">" else value.dtype
        if value.ndim != 1:
            raise ValueError("metadata arrays must be one-dimensional")
        if dt.kind in "US":
            return VT.ARRAY, VT.STRING
        if dt not in _DTYPE_TO_VT:
            raise ValueError(f"no GGUF type for NumPy {value.dtype}")
        return VT.ARRAY, _DTYPE_TO_VT[dt]
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (str, bytes)) for v in value):
            return VT.ARRAY, VT.STRING if value else VT.INT32
        if all(isinstance(v, (bool, np.bool_)) for v in value):
            return VT.ARRAY, VT.BOOL
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in value):
            lo, hi = min(value), max(value)
            for t in (VT.INT32, VT.INT64, VT.UINT64):
                tlo, thi = _int_range(t)
                if tlo <= lo and hi <= thi:
                    return VT.ARRAY, t
            raise ValueError("integer array values do not fit in 64 bits")
        if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
               for v in value):
            return VT.ARRAY, VT.FLOAT32
        raise ValueError("metadata arrays must hold one kind of value (str, bool, int or float)")
    raise ValueError(f"no GGUF type for a value of type {type(value).__name__}")


def check_value(value: Any, t: VT, sub: VT | None) -> None:
    """Raise ValueError unless `value` can be stored as GGUF type (t, sub)."""
    if t == VT.ARRAY:
        if sub is None or sub == VT.ARRAY:
            raise ValueError("arrays need a scalar or string element type (nested arrays are not supported)")
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise ValueError(f"expected a sequence for an array of {sub.name}")
        for v in (value.tolist() if isinstance(value, np.ndarray) else value):
            check_value(v, sub, None)
        return
    if t == VT.STRING:
        if not isinstance(value, (str, bytes)):
            raise ValueError(f"expected str for STRING, got {type(value).__name__}")
    elif t == VT.BOOL:
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"expected bool for BOOL, got {type(value).__name__}")
    elif t in _INT_TYPES:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"expected an integer for {t.name}, got {type(value).__name__}")
        lo, hi = _int_range(t)
        if not lo <= int(value) <= hi:
            raise ValueError(f"{value} is out of range for {t.name}")
    elif t in _FLOAT_TYPES:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"expected a number for {t.name}, got {type(value).__name__}")
    else:
        raise ValueError(f"unknown GGUF value type {t!r}")


class LazyStrings:
    """A GGUF string array not yet decoded: its raw bytes (u64 length + bytes, repeated)."""
    __slots__ = ("raw", "count")

    def __init__(self, raw: bytes, count: int):
        self.raw = raw
        self.count = count

    def decode(self) -> list[str]:
        raw = self.raw
        unpack = struct.Struct("<Q").unpack_from
        out = []
        append = out.append
        off = 0
        for _ in range(self.count):
            (n,) = unpack(raw, off)
            off += 8
            append(raw[off : off + n].decode("utf-8", "surrogateescape"))
            off += n
        return out


class GGUFMetadata(dict):
    """dict of metadata key -> Python value, plus `.types[key] = (GGUFValueType, element
    type or None)`. Values decode lazily where noted above, transparently.

    Assigning a value keeps the key's GGUF type if the value still fits it, else the
    writer infers a new one; assign a `GGUFValue` to set the type explicitly.
    """

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.types: dict[str, KeyType] = {}
        self.update(*args, **kwargs)

    # -- lazy values ------------------------------------------------------------------
    def _resolve(self, key):
        v = dict.__getitem__(self, key)
        if isinstance(v, LazyStrings):
            v = v.decode()
            dict.__setitem__(self, key, v)
        return v

    def _resolve_all(self) -> None:
        for k in list(dict.keys(self)):
            self._resolve(k)

    def __getitem__(self, key):
        return self._resolve(key)

    def get(self, key, default=None):
        return self._resolve(key) if dict.__contains__(self, key) else default

    def items(self):
        self._resolve_all()
        return dict.items(self)

    def values(self):
        self._resolve_all()
        return dict.values(self)

    def __iter__(self):
        # a Python-level __iter__ also makes dict(md) / {**md} go through __getitem__
        return dict.__iter__(self)

    def copy(self):
        return GGUFMetadata(self)

    def pop(self, key, *default):
        if dict.__contains__(self, key):
            self._resolve(key)
            self.types.pop(key, None)
        return dict.pop(self, key, *default)

    def popitem(self):
        self._resolve_all()
        k, v = dict.popitem(self)
        self.types.pop(k, None)
        return k, v

    def setdefault(self, key, default=None):
        if not dict.__contains__(self, key):
            self[key] = default
        return self[key]

    def __eq__(self, other):
        self._resolve_all()
        return dict.__eq__(self, other)

    __hash__ = None

    def __repr__(self):
        self._resolve_all()
        return f"GGUFMetadata({dict.__repr__(self)})"

    def __reduce__(self):
        return (GGUFMetadata, (), {"types": self.types}, None, iter(self.items()))

    # -- typed assignment -------------------------------------------------------------
    def __setitem__(self, key, value):
        if isinstance(value, GGUFValue):
            t, sub = infer_type(value)
            check_value(value.value, t, sub)
            dict.__setitem__(self, key, value.value)
            self.types[key] = (t, sub)
            return
        old = self.types.get(key)
        if old is not None:
            try:
                check_value(value, *old)
            except ValueError:
                del self.types[key]
        dict.__setitem__(self, key, value)

    def __delitem__(self, key):
        dict.__delitem__(self, key)
        self.types.pop(key, None)

    def update(self, other=(), /, **kwargs):
        if isinstance(other, GGUFMetadata):
            for k in dict.keys(other):
                dict.__setitem__(self, k, dict.__getitem__(other, k))  # lazy stays lazy
                if k in other.types:
                    self.types[k] = other.types[k]
                else:
                    self.types.pop(k, None)
        else:
            for k, v in (other.items() if hasattr(other, "keys") else other):
                self[k] = v
        for k, v in kwargs.items():
            self[k] = v

    def set_typed(self, key: str, value: Any, type_: VT, sub_type: VT | None = None) -> None:
        """Store `value` under `key` with an explicit GGUF type."""
        self[key] = GGUFValue(value, type_, sub_type)

    def type_of(self, key: str) -> KeyType:
        """The GGUF type the writer will use for `key`."""
        if key in self.types:
            return self.types[key]
        return infer_type(self[key])
