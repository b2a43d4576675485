"""`gemma3`: Gemma 3 text models (270m, 1b, and the text model of the 4b/12b/27b
image-text checkpoints). Llama with:

- the token embeddings times sqrt(n_embd), rounded to float (llama.cpp's ggml_scale by
  sqrtf(n_embd); transformers' embed_scale is the same for float32 weights);
- a per-head RMSNorm of Q and of K before RoPE (as qwen3), NEOX RoPE;
- RMSNorms after attention (blk.N.post_attention_norm) and after the FFN
  (blk.N.post_ffw_norm), applied to the sub-layer's output before the residual add;
- GeGLU: gelu(gate) * up with GELU's tanh approximation;
- sliding-window layers: with gemma3.attention.sliding_window in the file, layer il is
  local iff il % 6 < 5 (llama.cpp's set_swa_pattern(6); transformers' layer_types of
  sliding_window_pattern 6 agree). A local layer's query at position p attends to keys
  k with p - k < sliding_window (llama.cpp's LLAMA_SWA_TYPE_STANDARD and transformers'
  sliding_window_overlay agree) and rotates with base 10000, unscaled; global layers
  attend to the whole causal context and rotate with rope.freq_base (1e6) and the file's
  linear scaling. Without a window every layer is global (as llama.cpp runs Rnj-1);
- the output matrix tied to token_embd; Gemma's norm weights are stored as w + 1 (every
  *norm.weight, as llama.cpp's converter does), so each norm is the plain x/rms * w.

Where llama.cpp and transformers differ, kiln follows llama.cpp:
- the embedding scale: transformers rounds sqrt(n_embd) to the weights' dtype (bf16 for
  the released checkpoints: 33.75 for the 1b's sqrt(1152) = 33.94); llama.cpp keeps it
  in float.
- the attention scale: llama.cpp reads no key for it and uses 1/sqrt(head_dim), or
  1/sqrt(n_embd / n_head) for the 62-layer 27B; transformers uses
  query_pre_attn_scalar ** -0.5. They agree on the released checkpoints; the converter
  refuses a config.json whose query_pre_attn_scalar says otherwise.
- the local layers' RoPE base: llama.cpp fixes 10000 for gemma3 (it does not read
  rope.freq_base_swa for it); transformers reads rope_local_base_freq /
  rope_parameters.sliding_attention.rope_theta. The converter refuses another value.
- GELU: llama.cpp's CPU backend (built with GGML_GELU_FP16, its default) looks gelu up
  in a table indexed by the input rounded to fp16; kiln computes the tanh approximation
  in double (as transformers does in float), a difference far below the agreement the
  tests ask of llama.cpp.
- final logit soft-capping: none in Gemma 3's configs; llama.cpp applies
  gemma3.final_logit_softcapping only without sliding windows. kiln refuses a file or
  checkpoint that asks for it.

llama.cpp src/models/gemma3.cpp and src/llama-model.cpp (LLM_ARCH_GEMMA3), transformers
modeling_gemma3.py."""
import math

from .base import FFN_GELU, LLAMA_TENSORS, ROPE_NEOX, Architecture, blk, with_layer_tensors


def attention_scale(n_layer: int, n_embd: int, n_head: int, head_dim: int) -> float:
    """llama.cpp's f_attention_scale for gemma3: the 27B (62 layers) scales by its
    query_pre_attn_scalar n_embd / n_head, the others by their head size."""
    return 1.0 / math.sqrt(n_embd // n_head if n_layer == 62 else head_dim)


_TENSORS = with_layer_tensors(
    LLAMA_TENSORS, "blk.{i}.attn_v.weight",
    blk("attn_q_norm.weight", "self_attn.q_norm.weight", ("head_dim",), matrix=False),
    blk("attn_k_norm.weight", "self_attn.k_norm.weight", ("head_dim",), matrix=False))
_TENSORS = with_layer_tensors(
    _TENSORS, "blk.{i}.attn_output.weight",
    blk("post_attention_norm.weight", "post_attention_layernorm.weight", ("n_embd",),
        matrix=False))
# HF's pre-FFN norm is pre_feedforward_layernorm (its post_attention_layernorm is the
# norm after attention)
_TENSORS = tuple(blk("ffn_norm.weight", "pre_feedforward_layernorm.weight", ("n_embd",),
                     matrix=False) if s.gguf == "blk.{i}.ffn_norm.weight" else s
                 for s in _TENSORS)
_TENSORS = with_layer_tensors(
    _TENSORS, "blk.{i}.ffn_down.weight",
    blk("post_ffw_norm.weight", "post_feedforward_layernorm.weight", ("n_embd",),
        matrix=False))

ARCH = Architecture(
    name="gemma3",
    models="Gemma 3 (text)",
    hf_classes=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
    tensors=_TENSORS,
    rope=ROPE_NEOX,
    attn_qk_norm=True,
    ffn_act=FFN_GELU,
    embd_scale_sqrt=True,
    swa_pattern=6,
    rope_freq_base_swa=10000.0,
    attn_scale=attention_scale,
    norm_shift=1.0,
    spm_add_space_prefix=False,
    # the text model of Gemma 3's image-text checkpoints (4b, 12b, 27b), saved under
    # language_model.model. (transformers 4 and 5's legacy layout) or
    # model.language_model. (5's own); the vision tower and projector are left out, as
    # llama.cpp's converter leaves them to the mmproj file
    hf_multimodal=("Gemma3ForConditionalGeneration",),
    hf_renames=(("language_model.model.", "model."), ("model.language_model.", "model."),
                ("language_model.lm_head.", "lm_head.")),
    hf_ignored=("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                "model.multi_modal_projector."),
    # Gemma3TextConfig's defaults (the 4b/12b/27b text_config leave some out)
    hf_defaults=(("vocab_size", 262208), ("num_attention_heads", 8),
                 ("num_key_value_heads", 4), ("head_dim", 256), ("rms_norm_eps", 1e-6),
                 ("max_position_embeddings", 131072), ("query_pre_attn_scalar", 256),
                 ("sliding_window", 4096), ("tie_word_embeddings", True)),
)
