"""The model families kiln runs, one module each (its GGUF keys, tensors, Hugging Face
names and variations as data: base.py says what a module declares).

    arch = engine.arch.get("qwen2")          # ModelError naming the supported ones if unknown
    arch = engine.arch.for_hf_class("Qwen3ForCausalLM")   # None if no module reads it
"""
from __future__ import annotations

from ..errors import ModelError
from . import gemma3, llama, phi3, qwen2, qwen3
from .base import FFN_GELU, FFN_SILU, ROPE_NEOX, ROPE_NORM, Architecture, TensorSpec

ARCHITECTURES = {a.name: a for a in (llama.ARCH, qwen2.ARCH, qwen3.ARCH,
                                              phi3.ARCH, gemma3.ARCH)}

__all__ = ["ARCHITECTURES", "Architecture", "TensorSpec", "ROPE_NORM", "ROPE_NEOX",
           "FFN_SILU", "FFN_GELU", "get", "for_hf_class", "supported"]


def supported() -> str:
    """'llama' (Llama, Mistral, ...), 'qwen2' (...), ... for messages."""
    return ", ".join(f"'{a.name}' ({a.models})" for a in ARCHITECTURES.values())


def get(name) -> Architecture:
    arch = ARCHITECTURES.get(name) if isinstance(name, str) else None
    if arch is None:
        raise ModelError(f"unsupported model architecture {name!r}: kiln runs {supported()}")
    return arch


def for_hf_class(hf_class: str) -> Architecture | None:
    return next((a for a in ARCHITECTURES.values() if hf_class in a.hf_classes), None)
