"""What an architecture module declares: its GGUF key prefix, its Hugging Face classes,
its tensors (GGUF name, Hugging Face name, shape) and its variations from the Llama graph.

The variations are fields that engine/config.py copies into the one ModelConfig that the
C forward pass (ckernels/src/forward.c) and the NumPy reference (engine/reference.py)
both read; a new family is a new module with other values, never another forward pass.

The variations are of two kinds. A switch of the graph is an Architecture field copied
into the config and forward.h's kiln_model_config (as `rope`): the gated FFN's
activation (SiLU or tanh-GELU), an embedding scale (Gemma's sqrt(n_embd)), the attention
scale, sliding-window layers with their own RoPE base (a layer pattern here, the window
from the file's keys). A weight that only some families have is a TensorSpec, passed to
C as a pointer that is NULL elsewhere: the Q/K/V biases, the Q/K norms, the norms after
attention and after the FFN, RoPE frequency factors. Fused QKV / gate-up tensors are
TensorSpecs whose rows the loader hands to the kernels as views of one matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

# RoPE pairing, by ggml's names: NORM rotates (x[2i], x[2i+1]) (Meta's interleaved order,
# which Llama GGUFs store), NEOX rotates (x[i], x[i + rope_dim/2]) (rotate-half, as the
# Hugging Face checkpoints of Qwen, Gemma and Phi are stored and GGUF keeps them).
ROPE_NORM = "norm"
ROPE_NEOX = "neox"

# The gated FFN's activation, by llama.cpp's names (LLM_FFN_SILU, LLM_FFN_GELU): SwiGLU
# silu(gate) * up, or GeGLU gelu(gate) * up with GELU's tanh approximation (Gemma's
# gelu_pytorch_tanh).
FFN_SILU = "silu"
FFN_GELU = "gelu"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor the graph reads. Names hold `{i}` for the layer index; `shape` is in
    NumPy order, each entry a ModelConfig attribute; `matrix` tensors may be any weight
    type the kernels multiply, the others (norms, biases) are F32 vectors. `when` names a
    ModelConfig attribute that must be true for the tensor to be there."""
    gguf: str
    hf: str
    shape: tuple
    matrix: bool = True
    when: str | None = None

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.gguf


@dataclass(frozen=True)
class Architecture:
    name: str                     # general.architecture, and the prefix of its keys
    models: str                   # the families it covers, for messages
    hf_classes: tuple             # config.json "architectures" the converter reads
    tensors: tuple                # TensorSpecs in llama.cpp's order within a layer
    rope: str = ROPE_NORM         # ROPE_NORM | ROPE_NEOX
    attn_qkv_bias: bool = False   # biases on the Q, K and V projections
    attn_qk_norm: bool = False    # per-head RMSNorm of Q and K (weights of head_dim), before RoPE
    attn_qkv_fused: bool = False  # one attn_qkv matrix: the Q, K then V rows (phi3)
    ffn_gate_up_fused: bool = False  # one ffn_up matrix of 2 n_ff rows: gate, then up (phi3)
    ffn_act: str = FFN_SILU       # FFN_SILU | FFN_GELU
    embd_scale_sqrt: bool = False  # token embeddings times sqrt(n_embd), in float (gemma3)
    # Sliding-window layers (llama.cpp's set_swa_pattern(n)): when the file gives a window,
    # layer il is local iff il % swa_pattern < swa_pattern - 1 (the last of every
    # swa_pattern layers is global); 0: every layer is global. Local layers rotate with
    # their own base rope_freq_base_swa, unscaled.
    swa_pattern: int = 0
    rope_freq_base_swa: float = 10000.0
    # attention scale rule (n_layer, n_embd, n_head, head_dim) -> scale; None: 1/sqrt(head_dim)
    attn_scale: object = None
    # for the converter, as llama.cpp's writes the family: a value added to every
    # *norm.weight (Gemma's RMSNorm multiplies by 1 + w), and SentencePiece's
    # add_space_prefix when the family fixes it (None: the tokenizer.model's own)
    norm_shift: float = 0.0
    spm_add_space_prefix: bool | None = None
    # multimodal checkpoints among hf_classes, whose text model kiln converts: their
    # config.json's text_config, their tensor names' prefixes as (prefix, the text-only
    # checkpoint's), and the prefixes of what the text graph does not read
    hf_multimodal: tuple = ()
    hf_renames: tuple = ()
    hf_ignored: tuple = ()
    # (key, value) of config.json keys the checkpoints may leave out, as transformers'
    # config class defaults them (llama.cpp's converter reads the config through it)
    hf_defaults: tuple = ()

    @property
    def rope_neox(self) -> bool:
        return self.rope == ROPE_NEOX

    def swa_layers(self, n_layer: int, n_swa: int) -> tuple:
        """Whether each layer attends to a sliding window of n_swa positions."""
        if not self.swa_pattern or n_swa <= 0:
            return (False,) * n_layer
        return tuple(il % self.swa_pattern < self.swa_pattern - 1 for il in range(n_layer))

    def tensor_shapes(self, cfg) -> dict:
        """GGUF name -> (NumPy shape, matrix) of every tensor the graph reads, for cfg (a
        ModelConfig: its attributes give the shapes and the `when` conditions)."""
        out = {}
        for s in self.tensors:
            if s.when is not None and not getattr(cfg, s.when):
                continue
            shape = tuple(getattr(cfg, d) for d in s.shape)
            for i in range(cfg.n_layer) if s.per_layer else (0,):
                out[s.gguf.format(i=i)] = (shape, s.matrix)
        return out

    def hf_text_name(self, name: str) -> str | None:
        """A multimodal checkpoint's tensor name as the text-only checkpoint's; None for
        a tensor the text graph does not read."""
        if name.startswith(self.hf_ignored):
            return None
        for prefix, to in self.hf_renames:
            if name.startswith(prefix):
                return to + name[len(prefix):]
        return name

    def hf_names(self, n_layer: int) -> dict:
        """Hugging Face name -> GGUF name of every tensor the converter reads."""
        return {s.hf.format(i=i): s.gguf.format(i=i) for s in self.tensors
                for i in (range(n_layer) if s.per_layer else (0,))}


def blk(name: str, hf: str, shape: tuple, matrix: bool = True) -> TensorSpec:
    """A per-layer tensor: blk.{i}.<name> from model.layers.{i}.<hf>."""
    return TensorSpec(f"blk.{{i}}.{name}", f"model.layers.{{i}}.{hf}", shape, matrix)


# The Llama graph's tensors, which every family here starts from: the embedding first,
# the blocks, then the final norm and the (untied) output matrix, as llama.cpp writes them.
LLAMA_TENSORS = (
    TensorSpec("token_embd.weight", "model.embed_tokens.weight", ("n_vocab", "n_embd")),
    blk("attn_norm.weight", "input_layernorm.weight", ("n_embd",), matrix=False),
    blk("attn_q.weight", "self_attn.q_proj.weight", ("n_embd_q", "n_embd")),
    blk("attn_k.weight", "self_attn.k_proj.weight", ("n_embd_kv", "n_embd")),
    blk("attn_v.weight", "self_attn.v_proj.weight", ("n_embd_kv", "n_embd")),
    blk("attn_output.weight", "self_attn.o_proj.weight", ("n_embd", "n_embd_q")),
    blk("ffn_norm.weight", "post_attention_layernorm.weight", ("n_embd",), matrix=False),
    blk("ffn_gate.weight", "mlp.gate_proj.weight", ("n_ff", "n_embd")),
    blk("ffn_up.weight", "mlp.up_proj.weight", ("n_ff", "n_embd")),
    blk("ffn_down.weight", "mlp.down_proj.weight", ("n_embd", "n_ff")),
    TensorSpec("output_norm.weight", "model.norm.weight", ("n_embd",), matrix=False),
    TensorSpec("output.weight", "lm_head.weight", ("n_vocab", "n_embd"), when="untied_output"),
)


def with_layer_tensors(base: tuple, after: str, *extra: TensorSpec) -> tuple:
    """base with extra per-layer tensors inserted after the one named `after`."""
    at = next(i for i, s in enumerate(base) if s.gguf == after) + 1
    return base[:at] + extra + base[at:]
