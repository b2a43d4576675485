"""Tensor naming between Hugging Face checkpoints and GGUF (llama.cpp's names, declared by
each architecture in engine/arch), and the Q/K row permutation: HF stores Q and K rows
permuted for "rotate-half" RoPE, and Llama GGUFs keep Meta's interleaved order (the NEOX
families keep the checkpoint's order)."""
from __future__ import annotations

import numpy as np

from engine.arch import Architecture
from engine.errors import ConvertError


def hf_to_gguf_name(name: str, arch: Architecture, n_layer: int) -> str | None:
    """GGUF name of an HF tensor; None for tensors llama.cpp does not use. A tensor of a
    layer past n_layer gets its blk.N name (the plan then refuses it). A multimodal
    checkpoint's text tensors are named as the text-only checkpoint's first."""
    name = arch.hf_text_name(name)
    if name is None:
        return None
    names = arch.hf_names(n_layer)
    if name in names:
        return names[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        if parts[3] == "self_attn.rotary_emb.inv_freq":
            return None  # recomputed from rope.freq_base at load time
        beyond = arch.hf_names(int(parts[2]) + 1)
        if name in beyond:
            return beyond[name]
    raise ConvertError(f"unexpected tensor {name!r} in the checkpoint; "
                       f"only the {arch.name} tensors are supported")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> GGUF (Meta) interleaved order, as llama.cpp's `permute`."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of unpermute_qk: GGUF interleaved rows -> HF rotate-half rows."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row gather index: GGUF row r is HF row idx[r] (lets us convert in row chunks)."""
    return unpermute_qk(np.arange(n_rows), n_head)


def _gguf_order(names) -> list:
    # llama.cpp's order: token_embd, the blocks in order, output_norm, output.
    def key(n):
        if n.startswith("blk."):
            return (1, int(n.split(".")[1]), n)
        return ({"token_embd.weight": 0, "output_norm.weight": 2}.get(n, 3), 0, n)
    return sorted(names, key=key)

