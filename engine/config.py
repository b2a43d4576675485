"""A model's hyper-parameters and its architecture's variations, from GGUF metadata.

One config for every family in engine/arch: the keys are read under the prefix
`general.architecture` names, and the architecture module adds the variations (RoPE
pairing, Q/K/V biases, Q/K norms, the FFN's activation, the embedding and attention
scales, sliding-window layers) that the C forward pass and the NumPy reference both
follow. Keys and defaults follow llama.cpp's llm_load_hparams: head_count_kv defaults to
head_count, key_length to n_embd / n_head, rope.dimension_count to the head size,
rope.freq_base to 10000, attention.sliding_window to none.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import arch as architectures
from .arch import Architecture
from .errors import ModelError


def _value(v):
    """A metadata value as a plain Python scalar (readers may hand out NumPy scalars or
    one-element arrays)."""
    if isinstance(v, np.ndarray) and v.size == 1:
        return v.reshape(-1)[0].item()
    if isinstance(v, np.generic):
        return v.item()
    return v


# the attention kernels hold a query head in double on the stack (KILN_ATT_MAX_HEAD_DIM)
MAX_HEAD_DIM = 256
# llama.cpp's LLAMA_MAX_LAYERS: a block count above it is a corrupt file, and refusing it
# up front keeps a wild count from driving a loop over billions of layers' tensor names.
MAX_LAYERS = 512


@dataclass(frozen=True)
class ModelConfig:
    arch: Architecture         # the family: its tensors and the variations below
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    rms_eps: float
    rope_freq_base: float
    rope_dim: int              # leading dimensions of each head that RoPE rotates
    rope_freq_scale: float     # 1 / linear rope-scaling factor (1.0 = no scaling)
    tied_output: bool | None   # no `output.weight`: logits use token_embd (None: unknown)
    # LongRoPE (phi3): rope.scaling.attn_factor scales the rotated values (cos and sin, as
    # ggml's attn_factor does); rope.scaling.original_context_length is the context up to
    # which the short frequency factors are used (n_ctx_orig_yarn; default n_ctx_train)
    rope_attn_factor: float = 1.0
    n_ctx_orig: int | None = None
    # sliding window of the architecture's local layers (attention.sliding_window); 0: none
    n_swa: int = 0

    # the architecture's variations from the Llama graph (engine/arch/base.py)
    @property
    def rope_neox(self) -> bool:
        return self.arch.rope_neox

    @property
    def attn_qkv_bias(self) -> bool:
        return self.arch.attn_qkv_bias

    @property
    def attn_qk_norm(self) -> bool:
        return self.arch.attn_qk_norm

    @property
    def attn_qkv_fused(self) -> bool:
        return self.arch.attn_qkv_fused

    @property
    def ffn_gate_up_fused(self) -> bool:
        return self.arch.ffn_gate_up_fused

    @property
    def ffn_gelu(self) -> bool:
        return self.arch.ffn_act == architectures.FFN_GELU

    @property
    def embd_scale(self) -> float:
        """What the token embeddings are multiplied by: a float32 value (gemma3's
        sqrtf(n_embd)), applied in float as llama.cpp's ggml_scale is."""
        return float(np.float32(np.sqrt(np.float32(self.n_embd)))) if self.arch.embd_scale_sqrt \
            else 1.0

    @property
    def attn_scale(self) -> float:
        """The factor of the attention scores q.k (in double)."""
        rule = self.arch.attn_scale
        if rule is None:
            return 1.0 / np.sqrt(float(self.head_dim))
        return float(rule(self.n_layer, self.n_embd, self.n_head, self.head_dim))

    @property
    def swa_layers(self) -> tuple:
        """Whether each layer is a sliding-window (local) layer."""
        return self.arch.swa_layers(self.n_layer, self.n_swa)

    @property
    def n_embd_qkv(self) -> int:
        """Rows of a fused attn_qkv matrix: Q, then K, then V."""
        return self.n_embd_q + 2 * self.n_embd_kv

    @property
    def n_ff_gate_up(self) -> int:
        """Rows of a fused ffn_up matrix: the gate's n_ff, then the up projection's."""
        return 2 * self.n_ff

    @property
    def untied_output(self) -> bool:
        return self.tied_output is False

    @property
    def n_embd_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    @classmethod
    def from_metadata(cls, md, tensor_names=None) -> "ModelConfig":
        """Config of a GGUF of a known architecture. `tensor_names` (the file's tensor
        names) decides tied_output; without it tied_output is None."""
        name = _value(md.get("general.architecture"))
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        arch = architectures.get(name)
        prefix = arch.name

        def get(key, default=None, kind=int):
            v = _value(md.get(f"{prefix}.{key}", default))
            if v is None:
                raise ModelError(f"model metadata lacks '{prefix}.{key}'")
            try:
                return kind(v)
            except (TypeError, ValueError):
                raise ModelError(f"model metadata '{prefix}.{key}' = {v!r} is not "
                                 f"a {kind.__name__}") from None

        n_embd = get("embedding_length")
        n_head = get("attention.head_count")
        n_head_kv = get("attention.head_count_kv", n_head)
        if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
            raise ModelError(f"attention.head_count {n_head} is not a positive multiple "
                             f"of attention.head_count_kv {n_head_kv}")
        head_dim = get("attention.key_length", n_embd // n_head)
        if not 0 < head_dim <= MAX_HEAD_DIM:
            raise ModelError(f"head size {head_dim} (attention.key_length) is outside the "
                             f"1..{MAX_HEAD_DIM} kiln supports")
        if get("attention.value_length", head_dim) != head_dim:
            raise ModelError("attention.value_length differs from attention.key_length; "
                             "kiln needs equal key and value head sizes")
        rope_dim = get("rope.dimension_count", head_dim)
        if rope_dim % 2 or not 0 < rope_dim <= head_dim:
            raise ModelError(f"rope.dimension_count {rope_dim} must be even and at most "
                             f"the head size {head_dim}")
        scaling = _value(md.get(f"{prefix}.rope.scaling.type", "none"))
        if scaling not in ("none", "linear"):
            raise ModelError(f"unsupported rope scaling type {scaling!r} (kiln supports "
                             "'none' and 'linear')")
        factor = get("rope.scaling.factor", 1.0, float) if scaling == "linear" else 1.0

        n_vocab = _value(md.get(f"{prefix}.vocab_size"))
        if n_vocab is None:
            tokens = md.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ModelError(f"model metadata has neither {prefix}.vocab_size nor "
                                 "tokenizer.ggml.tokens")
            n_vocab = len(tokens)

        cfg = cls(
            arch=arch, n_vocab=int(n_vocab), n_embd=n_embd, n_layer=get("block_count"),
            n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
            n_ff=get("feed_forward_length"), n_ctx_train=get("context_length", 2048),
            rms_eps=get("attention.layer_norm_rms_epsilon", kind=float),
            rope_freq_base=get("rope.freq_base", 10000.0, float), rope_dim=rope_dim,
            rope_freq_scale=1.0 / factor if factor > 0 else 1.0,
            tied_output=None if tensor_names is None else "output.weight" not in tensor_names,
            rope_attn_factor=get("rope.scaling.attn_factor", 1.0, float),
            n_ctx_orig=get("rope.scaling.original_context_length", 0) or None,
            n_swa=get("attention.sliding_window", 0) if arch.swa_pattern else 0,
        )
        if _value(md.get(f"{prefix}.final_logit_softcapping")):
            raise ModelError(f"{prefix}.final_logit_softcapping is set; kiln does not "
                             "soft-cap logits")
        if not cfg.rope_attn_factor > 0:
            raise ModelError(f"rope.scaling.attn_factor {cfg.rope_attn_factor} is not positive")
        if cfg.n_swa < 0:
            raise ModelError(f"{prefix}.attention.sliding_window {cfg.n_swa} is negative")
        for name in ("n_vocab", "n_embd", "n_layer", "head_dim", "n_ff", "n_ctx_train"):
            if getattr(cfg, name) <= 0:
                raise ModelError(f"model metadata gives {name} = {getattr(cfg, name)}")
        if cfg.n_layer > MAX_LAYERS:
            raise ModelError(f"{prefix}.block_count {cfg.n_layer} is more than the "
                             f"{MAX_LAYERS} layers a model can have")
        return cfg

    def rope_factors_name(self, tensor_names, n_ctx: int) -> str | None:
        """The frequency-factor tensor RoPE divides by for a context of n_ctx positions per
        sequence, as llama_model::get_rope_factors chooses: Llama 3.1's rope_freqs
        whatever the context, else LongRoPE's rope_factors_long when n_ctx exceeds
        rope.scaling.original_context_length, else rope_factors_short; None when the
        file has none of them (plain RoPE)."""
        names = set(tensor_names)
        if "rope_freqs.weight" in names:
            return "rope_freqs.weight"
        orig = self.n_ctx_orig or self.n_ctx_train
        name = "rope_factors_long.weight" if n_ctx > orig else "rope_factors_short.weight"
        return name if name in names else None

    def rope_inv_freq(self, freq_factors=None) -> np.ndarray:
        """Angle per position of each rotated pair i: base^(-2i/rope_dim) * freq_scale,
        divided by the file's frequency factors when it has them (`rope_freqs.weight`,
        Llama 3.1+; LongRoPE's short or long factors: rope_factors_name).
        Shared by the C engine and the reference so both rotate by the same angles."""
        i = np.arange(self.rope_dim // 2, dtype=np.float64)
        inv = self.rope_freq_scale * self.rope_freq_base ** (-2.0 * i / self.rope_dim)
        if freq_factors is not None:
            inv = inv / np.asarray(freq_factors, dtype=np.float64)
        return inv

    def rope_inv_freq_swa(self) -> np.ndarray:
        """rope_inv_freq of the sliding-window layers: their own base, no scaling and no
        frequency factors (llama.cpp's rope_freq_base_train_swa, freq_scale 1)."""
        i = np.arange(self.rope_dim // 2, dtype=np.float64)
        return self.arch.rope_freq_base_swa ** (-2.0 * i / self.rope_dim)
