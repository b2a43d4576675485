"""`qwen2`: Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen. Llama with biases on the Q, K and
V projections (none on the output projection) and NEOX RoPE (llama.cpp
src/models/qwen2.cpp, transformers modeling_qwen2.py). Q and K rows stay in the
checkpoint's order: NEOX pairs are the checkpoint's rotate-half halves."""
from .base import LLAMA_TENSORS, ROPE_NEOX, Architecture, blk, with_layer_tensors

ARCH = Architecture(
    name="qwen2",
    models="Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen",
    hf_classes=("Qwen2ForCausalLM",),
    tensors=with_layer_tensors(
        LLAMA_TENSORS, "blk.{i}.attn_v.weight",
        blk("attn_q.bias", "self_attn.q_proj.bias", ("n_embd_q",), matrix=False),
        blk("attn_k.bias", "self_attn.k_proj.bias", ("n_embd_kv",), matrix=False),
        blk("attn_v.bias", "self_attn.v_proj.bias", ("n_embd_kv",), matrix=False)),
    rope=ROPE_NEOX,
    attn_qkv_bias=True,
)
