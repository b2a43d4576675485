"""Quantizing with an importance matrix (`kiln convert --imatrix FILE` / `--calibration
TEXT`), as llama-quantize --imatrix does: every tensor whose type takes importance weights
is quantized with its entry, matched by tensor name; a tensor without an entry is quantized
plain (with a note); an entry whose length is not the tensor's row length is an error.
Everything is checked before a byte is written."""
from __future__ import annotations

from pathlib import Path

import formats
from engine.convert.plan import Plan
from engine.errors import ConvertError
from formats.imatrix import Imatrix, read_imatrix

VT = formats.GGUFValueType

# the keys llama-quantize records about the importance matrix it used
KEY_FILE = "quantize.imatrix.file"
KEY_DATASET = "quantize.imatrix.dataset"
KEY_ENTRIES = "quantize.imatrix.entries_count"
KEY_CHUNKS = "quantize.imatrix.chunks_count"
KEY_METHOD = "quantize.kiln.method"  # "gptq" when the rounding used error feedback


def load(path) -> Imatrix:
    """Read an imatrix file for the converter: every problem is a ConvertError."""
    p = Path(path)
    if not p.is_file():
        raise ConvertError(f"imatrix file {path}: no such file")
    try:
        im = read_imatrix(p)
    except formats.FormatError as e:
        raise ConvertError(f"imatrix file {path} is malformed: {e}") from None
    if len(im) == 0:
        raise ConvertError(f"imatrix file {path} holds no entries")
    return im


def attach_hessians(plan: Plan, hessians: dict) -> int:
    """--method gptq: give each tensor of `plan` to be encoded in a block type its input
    Hessian from the calibration (engine.convert.gptq rounds it); returns how many got one.
    Tensors without one keep their importance weights or none; a tied token_embd is left
    out (its rows are also the input embeddings, which the output's Hessian says nothing
    about)."""
    from engine.convert.gptq import GPTQ_TYPES
    used = 0
    for tp in plan.tensors:
        h = hessians.get(tp.name) if tp.name != "token_embd.weight" else None
        if tp.raw is not None or tp.out_type not in GPTQ_TYPES or h is None:
            continue
        if h.shape[-2:] != (tp.shape[-1],) * 2:
            raise ConvertError(f"calibration Hessian of {tp.name} is {h.shape[0]} wide but the "
                               f"tensor's rows have {tp.shape[-1]} columns")
        tp.hessian = h
        used += 1
    if used == 0:
        raise ConvertError("--method gptq: no tensor of this conversion has a calibration "
                           "Hessian (a type without blocks, such as f16?)")
    return used


def attach(plan: Plan, im: Imatrix, source: str) -> int:
    """Give each tensor of `plan` to be encoded in a weighted type its importance weights;
    returns how many got one. Raises ConvertError (naming the tensor) on a mismatch."""
    used = 0
    for tp in plan.tensors:
        if tp.raw is not None or tp.out_type not in formats.WEIGHTED_TYPES:
            continue
        w = im.importance(tp.name)
        if w is None:
            if tp.name.startswith("blk."):
                msg = f"no importance-matrix entry: quantized to {tp.out_type.name} without one"
                tp.note = f"{tp.note}; {msg}" if tp.note else msg
            continue
        n = tp.shape[-1]
        if w.size != n:
            raise ConvertError(
                f"imatrix {source}: entry {tp.name} has {w.size} values but the tensor's rows "
                f"have {n} columns (shape {'x'.join(map(str, tp.shape))}): an importance "
                "matrix computed on another model?")
        tp.imatrix = w
        used += 1
    if used == 0:
        raise ConvertError(f"imatrix {source}: none of its {len(im)} entries names a tensor "
                           f"this conversion quantizes (e.g. it has {im.names()[0]}): an "
                           "importance matrix of another model?")
    plan.metadata[KEY_FILE] = str(source)
    plan.types[KEY_FILE] = VT.STRING
    if im.datasets:
        plan.metadata[KEY_DATASET] = str(im.datasets[0])
        plan.types[KEY_DATASET] = VT.STRING
    plan.metadata[KEY_ENTRIES] = len(im)
    plan.types[KEY_ENTRIES] = VT.INT32
    plan.metadata[KEY_CHUNKS] = int(im.chunk_count)
    plan.types[KEY_CHUNKS] = VT.INT32
    return used
