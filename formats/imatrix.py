"""Importance-matrix files: llama.cpp's imatrix GGUF format (what llama-imatrix writes and
llama-quantize --imatrix reads) and its older binary `.dat` format (read only).

GGUF layout, per matrix NAME (a weight tensor's name, e.g. blk.0.attn_q.weight):
  NAME.in_sum2  F32, NumPy shape (n_mat, n_cols): per input column, the sum of squares of
                the activations that multiplied it (n_mat = 1 except for stacked experts)
  NAME.counts   F32, NumPy shape (n_mat, 1): how many activation rows (tokens) were summed
and the keys general.type = "imatrix", imatrix.datasets (array of strings),
imatrix.chunk_count and imatrix.chunk_size (u32). Other tensors (e.g. a newer .in_sum)
are ignored, as llama-quantize ignores them.

Legacy .dat: int32 n_entries; per entry int32 name length, the name, int32 ncall, int32
nval, float32 values[nval] (sums already divided down so that values / ncall is the mean
square); then optionally int32 the last chunk count, int32 length and the dataset name.

The importance quantization uses (`Imatrix.importance`) is the mean square per column,
sums / count in float32, as llama-quantize loads it (1 for a matrix that saw no input).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .constants import FormatError, GGMLType
from .metadata import GGUFValue
from .constants import GGUFValueType as VT

SUM2_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
_MAX_NAME = 1 << 16


@dataclass
class Imatrix:
    """Per weight matrix: sums (float32 (n_mat, n_cols)) and counts (float32 (n_mat,))."""
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    datasets: list = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    def __len__(self) -> int:
        return len(self.sums)

    def names(self) -> list[str]:
        return sorted(self.sums)

    def importance(self, name: str) -> np.ndarray | None:
        """The importance weights of matrix `name`, float32 (n_mat * n_cols,) (the value
        llama-quantize gives ggml_quantize_chunk), or None without an entry."""
        if name not in self.sums:
            return None
        s = np.asarray(self.sums[name], np.float32)
        c = np.asarray(self.counts[name], np.float32).reshape(-1, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(c > 0, s / np.where(c > 0, c, np.float32(1)), np.float32(1))
        return out.astype(np.float32).reshape(-1)

    def add(self, name: str, sum_sq, count) -> None:
        """Accumulate one more batch for `name`: sum_sq (n_cols,) or (n_mat, n_cols)."""
        sum_sq = np.atleast_2d(np.asarray(sum_sq, np.float64))
        if name in self.sums:
            if self.sums[name].shape != sum_sq.shape:
                raise ValueError(f"{name}: {sum_sq.shape} sums added to {self.sums[name].shape}")
            self.sums[name] = self.sums[name] + sum_sq
            self.counts[name] = self.counts[name] + count
        else:
            self.sums[name] = sum_sq
            self.counts[name] = np.full(sum_sq.shape[0], count, np.float64)


def write_imatrix(path, im: Imatrix) -> None:
    """Write `im` in llama-imatrix's GGUF layout (atomically), tensors in name order."""
    from .writer import write_gguf
    meta = {
        KEY_TYPE: "imatrix",
        KEY_DATASETS: GGUFValue(list(im.datasets), VT.ARRAY, VT.STRING),
        KEY_CHUNK_COUNT: GGUFValue(int(im.chunk_count), VT.UINT32),
        KEY_CHUNK_SIZE: GGUFValue(int(im.chunk_size), VT.UINT32),
    }
    tensors = []
    for name in im.names():
        s = np.ascontiguousarray(np.atleast_2d(im.sums[name]), np.float32)
        c = np.ascontiguousarray(im.counts[name], np.float32).reshape(-1, 1)
        tensors.append((name + SUM2_SUFFIX, GGMLType.F32, s.shape, s))
        tensors.append((name + COUNTS_SUFFIX, GGMLType.F32, c.shape, c))
    write_gguf(path, meta, tensors)


def read_imatrix(path) -> Imatrix:
    """Read an imatrix file, GGUF or legacy .dat (told apart by the GGUF magic)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise FormatError(f"cannot read imatrix file {path}: {e.strerror}") from None
    if magic == b"GGUF":
        return _read_gguf_imatrix(path)
    return _read_legacy(path)


def _read_gguf_imatrix(path: Path) -> Imatrix:
    from .reader import read_gguf
    f = read_gguf(path)
    try:
        md = f.metadata
        kind = md.get(KEY_TYPE)
        if kind is not None and kind != "imatrix":
            raise FormatError(f"{path}: a GGUF file of type {kind!r}, not an imatrix "
                              "(general.type must be \"imatrix\")")
        sums, counts = {}, {}
        for name, t in f.tensors.items():
            for suffix, into in ((SUM2_SUFFIX, sums), (COUNTS_SUFFIX, counts)):
                if name.endswith(suffix):
                    if t.type != GGMLType.F32:
                        raise FormatError(f"{path}: {name} is {t.type.name}, an imatrix holds F32")
                    into[name[: -len(suffix)]] = np.array(t.data, np.float32).reshape(t.shape)
        if not sums and not counts:
            raise FormatError(f"{path}: no {SUM2_SUFFIX} / {COUNTS_SUFFIX} tensors: not an "
                              "imatrix file")
        im = Imatrix(datasets=list(md.get(KEY_DATASETS, []) or []),
                     chunk_count=int(md.get(KEY_CHUNK_COUNT, 0) or 0),
                     chunk_size=int(md.get(KEY_CHUNK_SIZE, 0) or 0))
        for name in sorted(set(sums) | set(counts)):
            if name not in sums or name not in counts:
                raise FormatError(f"{path}: {name} has "
                                  f"{'no ' + SUM2_SUFFIX if name not in sums else 'no ' + COUNTS_SUFFIX}"
                                  " tensor (each matrix needs both)")
            s = sums[name].reshape(-1, sums[name].shape[-1]) if sums[name].ndim else sums[name].reshape(1, 1)
            c = counts[name].reshape(-1)
            if c.size != s.shape[0]:
                raise FormatError(f"{path}: {name} has {c.size} counts for {s.shape[0]} "
                                  "matrices of sums")
            im.sums[name] = s
            im.counts[name] = c
        return im
    finally:
        f.close()


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise FormatError(f"{path}: legacy imatrix truncated reading {what} at byte {pos} "
                              f"(file is {len(data)} bytes)")
        b = data[pos : pos + n]
        pos += n
        return b

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = i32("the entry count")
    if n_entries < 1 or n_entries * 12 > len(data):
        raise FormatError(f"{path}: not an imatrix file (neither GGUF nor a legacy .dat with "
                          f"a plausible entry count: {n_entries})")
    im = Imatrix()
    for i in range(n_entries):
        n = i32(f"entry {i}'s name length")
        if not 0 < n <= _MAX_NAME:
            raise FormatError(f"{path}: entry {i}'s name length {n} is not plausible")
        try:
            name = take(n, f"entry {i}'s name").decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{path}: entry {i}'s name is not UTF-8") from None
        ncall = i32(f"{name}'s call count")
        nval = i32(f"{name}'s value count")
        if nval < 1:
            raise FormatError(f"{path}: {name} has {nval} values")
        vals = np.frombuffer(take(4 * nval, f"{name}'s {nval} values"), "<f4").astype(np.float32)
        im.sums[name] = vals.reshape(1, nval)
        # llama-quantize divides by ncall (if positive): the same as sums / counts
        im.counts[name] = np.array([ncall if ncall > 0 else 1], np.float32)
    if pos + 4 <= len(data):
        im.chunk_count = i32("the chunk count")
        if pos + 4 <= len(data):
            n = i32("the dataset name length")
            if 0 < n <= len(data) - pos:
                im.datasets = [take(n, "the dataset name").decode("utf-8", "replace")]
    return im
