"""`phi3`: Phi-3-mini, Phi-3.5-mini, Phi-4-mini (dense). Llama with the Q, K and V
projections in one matrix (blk.N.attn_qkv, HF self_attn.qkv_proj: the Q rows, then K,
then V) and the gate and up projections in one (blk.N.ffn_up of 2 n_ff rows, HF
mlp.gate_up_proj: the gate rows first, as llama.cpp's swiglu and transformers'
chunk(2, dim=-1) split it), NEOX RoPE, maybe over only the leading rope.dimension_count
dims of a head (Phi-4-mini's partial_rotary_factor), and LongRoPE: per-dimension
frequency factors rope_factors_short / rope_factors_long (the long ones when the context
exceeds rope.scaling.original_context_length) and rope.scaling.attn_factor scaling the
rotated values (engine/config.py). llama.cpp src/models/phi3.cpp, transformers
modeling_phi3.py.

Phi-3-mini's config.json asks for a sliding window of 2047; llama.cpp disables it for
phi3 (it attends to the whole context), and so does kiln."""
from .base import LLAMA_TENSORS, ROPE_NEOX, Architecture, blk

_FUSED = {"blk.{i}.attn_q.weight": blk("attn_qkv.weight", "self_attn.qkv_proj.weight",
                                       ("n_embd_qkv", "n_embd")),
          "blk.{i}.ffn_gate.weight": blk("ffn_up.weight", "mlp.gate_up_proj.weight",
                                         ("n_ff_gate_up", "n_embd"))}
_GONE = ("blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight", "blk.{i}.ffn_up.weight")

ARCH = Architecture(
    name="phi3",
    models="Phi-3, Phi-3.5-mini, Phi-4-mini",
    hf_classes=("Phi3ForCausalLM",),
    tensors=tuple(_FUSED.get(s.gguf, s) for s in LLAMA_TENSORS if s.gguf not in _GONE),
    rope=ROPE_NEOX,
    attn_qkv_fused=True,
    ffn_gate_up_fused=True,
)
