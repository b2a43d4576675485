"""Which type each tensor is written in: the `--type` names and the per-tensor choice.

The names are the weight types kiln's kernels run (engine.model.MATRIX_TYPES) that formats/
can encode; every fact about a type (block size, bits) comes from formats' size table."""
from __future__ import annotations

import formats
from engine.model import MATRIX_TYPES

GGMLType = formats.GGMLType

# `--type` name -> type
OUT_TYPES = {t.name.lower(): t for t in formats.ENCODABLE_TYPES if t in MATRIX_TYPES}
# llama.cpp's general.quantization_version for files with block-quantized tensors
QUANTIZATION_VERSION = 2


def is_block_type(t: GGMLType) -> bool:
    return formats.GGML_QUANT_SIZES[t][0] > 1


def bits_per_weight(t: GGMLType) -> float:
    block, size = formats.GGML_QUANT_SIZES[t]
    return 8.0 * size / block


def default_embed_type(target: GGMLType) -> GGMLType:
    """token_embd / output keep 8 bits under a 4-bit target (they set the output
    distribution directly, as llama.cpp's quantizer also protects the output matrix).
    4-bit types store 4.5 (Q4_0) to 5.0 (Q4_1) bits per weight with their scales."""
    return GGMLType.Q8_0 if bits_per_weight(target) <= 5.0 else target


def choose_type(name: str, shape: tuple, target: GGMLType, embed_type: GGMLType):
    """Output type of one tensor and an optional note explaining a fallback."""
    if len(shape) < 2:
        return GGMLType.F32, None  # norms and other vectors: tiny, and precision matters
    t = embed_type if name in ("token_embd.weight", "output.weight") else target
    block = formats.GGML_QUANT_SIZES[t][0]
    if shape[-1] % block != 0:
        return GGMLType.F16, (f"note: {name}: row length {shape[-1]} is not a multiple of "
                              f"{block}; stored as F16 instead of {t.name}")
    return t, None
