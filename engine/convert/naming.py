"""Tensor naming between Hugging Face Llama checkpoints and GGUF (llama.cpp's names), and
the Q/K row permutation: HF stores Q and K rows permuted for "rotate-half" RoPE, GGUF in
Meta's interleaved order."""
from __future__ import annotations

import numpy as np

from engine.errors import ConvertError


HF_TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def hf_to_gguf_name(name: str) -> str | None:
    """GGUF name of an HF tensor; None for tensors llama.cpp does not use."""
    if name in HF_TENSOR_NAMES:
        return HF_TENSOR_NAMES[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        if parts[3] == "self_attn.rotary_emb.inv_freq":
            return None  # recomputed from rope.freq_base at load time
        if parts[3] in HF_LAYER_NAMES:
            return f"blk.{int(parts[2])}.{HF_LAYER_NAMES[parts[3]]}"
    raise ConvertError(f"unexpected tensor {name!r} in the checkpoint; "
                       f"only the Llama tensors are supported")


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

