"""Planning the requantization of a GGUF file: metadata kept, each tensor dequantized
from its type (or copied when the type does not change)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

import formats
from engine.convert.mixes import (QUANTIZATION_VERSION, Mix, ModelFacts, is_block_type,
                                  layer_of, tensor_type)
from engine.arch import ARCHITECTURES
from engine.convert.plan import Plan, TensorPlan
from engine.errors import ConvertError

GGMLType = formats.GGMLType


def plan_gguf(src: Path, out: Path, mix: Mix, embed_type: GGMLType | None) -> Plan:
    try:
        f = formats.read_gguf(src)
    except formats.FormatError as e:
        raise ConvertError(f"{src}: {e}") from None
    plan = Plan({}, {}, [], sources=[f])
    try:
        arch = f.metadata.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ConvertError(f"{src}: unsupported architecture {arch!r}; supported: "
                               f"{', '.join(ARCHITECTURES)}")
        plan.metadata = dict(f.metadata)
        plan.types = {k: tuple(v) for k, v in f.metadata.types.items()}
        plan.metadata["general.file_type"] = int(mix.file_type)
        plan.types["general.file_type"] = (formats.GGUFValueType.UINT32,)
        if is_block_type(mix.default) or any(is_block_type(t.type) for t in f.tensors.values()):
            plan.metadata["general.quantization_version"] = QUANTIZATION_VERSION
            plan.types["general.quantization_version"] = (formats.GGUFValueType.UINT32,)
        model = _model_facts(src, f, arch)
        for t in f.tensors.values():
            out_type, note = tensor_type(t.name, tuple(t.shape), layer_of(t.name), mix, model,
                                         embed_type)
            plan.tensors.append(_gguf_tensor_plan(src, t, out_type, note))
    except BaseException:
        plan.close()
        raise
    return plan


def _model_facts(src, f, arch: str) -> ModelFacts:
    """The hyperparameters the type rules read, from the file's {arch}.* keys."""
    md = f.metadata
    values = {}
    for key in (f"{arch}.block_count", f"{arch}.attention.head_count"):
        v = md.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConvertError(f"{src}: metadata {key} is {v!r}; expected a positive integer")
        values[key] = v
    n_head = values[f"{arch}.attention.head_count"]
    n_head_kv = md.get(f"{arch}.attention.head_count_kv", n_head)
    if not isinstance(n_head_kv, int) or isinstance(n_head_kv, bool) or n_head_kv <= 0:
        raise ConvertError(f"{src}: metadata {arch}.attention.head_count_kv is {n_head_kv!r}; "
                           f"expected a positive integer")
    return ModelFacts(values[f"{arch}.block_count"], n_head // n_head_kv,
                      tied="output.weight" not in f.tensors)


def _gguf_tensor_plan(src, t, out_type, note) -> TensorPlan:
    shape = tuple(t.shape)
    if t.type == out_type:
        # Same type: copy the bytes, so requantizing never loses more than it must.
        return TensorPlan(t.name, shape, t.type.name, out_type, None, raw=lambda: t.data,
                          note=note)
    if t.type not in formats.DECODABLE_TYPES:
        raise ConvertError(f"{src}: tensor {t.name} has type {t.type.name}; supported "
                           f"source types: {', '.join(x.name for x in formats.DECODABLE_TYPES)}")
    n = shape[-1]
    n_rows = t.n_elements // n
    row_bytes = formats.row_nbytes(t.type, n)

    def read_rows(i, j):
        raw = np.asarray(t.data).reshape(-1).view(np.uint8).reshape(n_rows, row_bytes)
        return formats.dequantize(raw[i:j], t.type, (j - i, n)).astype(np.float32, copy=False)

    return TensorPlan(t.name, shape, t.type.name, out_type, read_rows, note=note)

