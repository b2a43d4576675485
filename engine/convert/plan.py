"""The conversion plan: everything about the output, found before a byte is written.

`plan()` reads only headers and JSON and returns the metadata and a list of `TensorPlan`s
(name, shape, source and target type, and a way to read rows); `engine.convert.write` then
streams the tensors one at a time, in chunks of rows, into formats.GGUFWriter (which writes
atomically), so peak memory is bounded by a chunk, not by the largest tensor."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import formats
from engine.errors import ConvertError

GGMLType = formats.GGMLType


@dataclass
class TensorPlan:
    name: str                       # GGUF tensor name
    shape: tuple                    # NumPy order, GGUF layout
    src_type: str                   # "F32", "BF16", "Q4_1", ...
    out_type: GGMLType
    read_rows: Callable             # (i, j) -> float32 rows i..j of the 2-D view (n_rows, n)
    raw: Callable | None = None     # () -> bytes/array already in out_type (GGUF copy)
    release: Callable = lambda i, j: None   # rows i..j are done: drop their source pages
    note: str | None = None
    imatrix: np.ndarray | None = None       # importance weights (n,) for the quantizer
    hessian: np.ndarray | None = None       # input Hessian (n, n): GPTQ rounding (gptq.py)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def out_nbytes(self) -> int:
        block, size = formats.GGML_QUANT_SIZES[self.out_type]
        return self.n_elements // block * size


@dataclass
class Plan:
    metadata: dict                  # key -> value, typed per `types`
    types: dict                     # key -> formats.GGUFValueType (scalars) or (ARRAY, elem)
    tensors: list
    sources: list = field(default_factory=list)   # objects with .close()

    def close(self):
        for s in self.sources:
            s.close()


def check_encodable(plan: Plan, mix_name: str):
    """Every tensor that must be encoded has a type formats can encode: a mix planned for
    a type whose codec is missing fails here, before a byte is written."""
    missing = {}
    for tp in plan.tensors:
        if tp.raw is None and tp.out_type not in formats.ENCODABLE_TYPES:
            missing.setdefault(tp.out_type, tp.name)
    if missing:
        types = ", ".join(f"{t.name} (e.g. {name})" for t, name in missing.items())
        raise ConvertError(f"--type {mix_name} needs types this build cannot encode yet: "
                           f"{types}")
