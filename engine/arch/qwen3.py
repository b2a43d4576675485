"""`qwen3`: Qwen3 (dense). Llama with an RMSNorm over each head of Q and of K (one weight
vector of head_dim per layer for each, shared by the heads) between the projection and
RoPE, NEOX RoPE, no biases, and a head size that may differ from n_embd / n_head
(qwen3.attention.key_length) (llama.cpp src/models/qwen3.cpp, transformers
modeling_qwen3.py)."""
from .base import LLAMA_TENSORS, ROPE_NEOX, Architecture, blk, with_layer_tensors

ARCH = Architecture(
    name="qwen3",
    models="Qwen3",
    hf_classes=("Qwen3ForCausalLM",),
    tensors=with_layer_tensors(
        LLAMA_TENSORS, "blk.{i}.attn_v.weight",
        blk("attn_q_norm.weight", "self_attn.q_norm.weight", ("head_dim",), matrix=False),
        blk("attn_k_norm.weight", "self_attn.k_norm.weight", ("head_dim",), matrix=False)),
    rope=ROPE_NEOX,
    attn_qk_norm=True,
)
