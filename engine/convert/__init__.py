"""The converter: Hugging Face checkpoints and GGUF files to block-quantized GGUF.

    from engine import convert
    p = convert.plan("path/to/hf-model", "out.gguf", "q4_0")   # checks everything, writes nothing
    try:
        convert.write(p, "out.gguf")                            # streams the tensors, atomically
    finally:
        p.close()

SRC is a Hugging Face model directory (a class of a family in engine/arch: LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM; safetensors
weights in F32/F16/BF16, one file or sharded; a SentencePiece `tokenizer.model` or a
byte-level BPE `tokenizer.json`) or a GGUF file (requantized, metadata kept). Names and
metadata keys follow llama.cpp's convert_hf_to_gguf.py so that llama.cpp loads what we
write. The rooms: `plan` (the plan's types), `hf` and `gguf_source` (reading each kind of
source), `naming` (tensor names, Q/K permutation), `vocab` (tokenizers), `mixes` (which type
each tensor gets), `streaming` (writing), `export_hf` (GGUF back to a checkpoint).
`kiln convert` (engine.cli.convert) is the program.
"""
from __future__ import annotations

import os
from pathlib import Path

from engine.convert.gguf_source import plan_gguf
from engine.convert.hf import plan_hf
from engine.convert.mixes import MIXES, NAMED_TYPES
from engine.convert.plan import Plan, TensorPlan, check_encodable
from engine.convert.streaming import write
from engine.errors import ConvertError

__all__ = ["plan", "write", "check_output", "source_files", "Plan", "TensorPlan", "MIXES", "OUT_TYPES"]

# --type name -> its main type
OUT_TYPES = {name: m.default for name, m in MIXES.items()}


def source_files(src) -> list[Path]:
    """The files a conversion of `src` reads: the GGUF itself, or every file of the
    Hugging Face directory but GGUFs (a GGUF written into the directory by an earlier
    run is an output, not an input)."""
    src = Path(src)
    if not src.is_dir():
        return [src]
    return [f for f in src.iterdir() if f.is_file() and f.suffix != ".gguf"]


def check_output(out, inputs, what: str = "an input") -> None:
    """ConvertError if writing `out` would replace one of `inputs` (the same file under
    any name: a symlink or a hard link counts)."""
    if not os.path.exists(out):
        return
    for f in inputs:
        try:
            same = os.path.samefile(out, f)
        except OSError:
            continue
        if same:
            raise ConvertError(f"output {out} is {what} ({f}); kiln never writes over its "
                               f"inputs: give another output path")


def plan(src, out, out_type: str = "q8_0", embed_type: str | None = None) -> Plan:
    """Read and check everything the conversion needs; raises ConvertError, writes nothing."""
    src, out = Path(src), Path(out)
    if out_type not in MIXES:
        raise ConvertError(f"unknown type {out_type!r}; known: {', '.join(MIXES)}")
    if embed_type is not None and embed_type not in NAMED_TYPES:
        raise ConvertError(f"unknown embedding type {embed_type!r}; known: "
                           f"{', '.join(NAMED_TYPES)}")
    mix = MIXES[out_type]
    embed = NAMED_TYPES[embed_type] if embed_type else None
    if not src.exists():
        raise ConvertError(f"{src}: no such file or directory")
    if out.is_dir():
        raise ConvertError(f"output {out} is a directory; give a file path such as "
                           f"{out / 'model.gguf'}")
    if not out.resolve().parent.is_dir():
        raise ConvertError(f"output directory {out.resolve().parent} does not exist")
    check_output(out, source_files(src), "a file of the source")
    if src.is_dir():
        p = plan_hf(src, out, mix, embed)
    else:
        with open(src, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ConvertError(f"{src}: not a GGUF file or a Hugging Face model directory")
        p = plan_gguf(src, out, mix, embed)
    try:
        check_encodable(p, out_type)
    except ConvertError:
        p.close()
        raise
    return p

