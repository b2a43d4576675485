"""Llama hyper-parameters from GGUF metadata.

One config covers every model that llama.cpp loads as `general.architecture == "llama"`:
Llama 1/2/3, Mistral, TinyLlama, SmolLM/SmolLM2. Keys and defaults follow llama.cpp's
llm_load_hparams: head_count_kv defaults to head_count, key_length to n_embd / n_head,
rope.dimension_count to the head size, rope.freq_base to 10000.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ModelError

ARCHITECTURE = "llama"


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


@dataclass(frozen=True)
class LlamaConfig:
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

    @property
    def n_embd_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    @classmethod
    def from_metadata(cls, md, tensor_names=None) -> "LlamaConfig":
        """Config of a llama GGUF. `tensor_names` (the file's tensor names) decides
        tied_output; without it tied_output is None."""
        arch = _value(md.get("general.architecture"))
        if isinstance(arch, bytes):
            arch = arch.decode("utf-8", "replace")
        if arch != ARCHITECTURE:
            raise ModelError(f"unsupported model architecture {arch!r}: kiln runs "
                             f"'{ARCHITECTURE}' models (Llama, Mistral, SmolLM, TinyLlama)")

        def get(key, default=None, kind=int):
            v = _value(md.get(f"{ARCHITECTURE}.{key}", default))
            if v is None:
                raise ModelError(f"model metadata lacks '{ARCHITECTURE}.{key}'")
            try:
                return kind(v)
            except (TypeError, ValueError):
                raise ModelError(f"model metadata '{ARCHITECTURE}.{key}' = {v!r} is not "
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
        scaling = _value(md.get(f"{ARCHITECTURE}.rope.scaling.type", "none"))
        if scaling not in ("none", "linear"):
            raise ModelError(f"unsupported rope scaling type {scaling!r} (kiln supports "
                             "'none' and 'linear')")
        factor = get("rope.scaling.factor", 1.0, float) if scaling == "linear" else 1.0

        n_vocab = _value(md.get(f"{ARCHITECTURE}.vocab_size"))
        if n_vocab is None:
            tokens = md.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ModelError("model metadata has neither llama.vocab_size nor "
                                 "tokenizer.ggml.tokens")
            n_vocab = len(tokens)

        cfg = cls(
            n_vocab=int(n_vocab), n_embd=n_embd, n_layer=get("block_count"),
            n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
            n_ff=get("feed_forward_length"), n_ctx_train=get("context_length", 2048),
            rms_eps=get("attention.layer_norm_rms_epsilon", kind=float),
            rope_freq_base=get("rope.freq_base", 10000.0, float), rope_dim=rope_dim,
            rope_freq_scale=1.0 / factor if factor > 0 else 1.0,
            tied_output=None if tensor_names is None else "output.weight" not in tensor_names,
        )
        for name in ("n_vocab", "n_embd", "n_layer", "head_dim", "n_ff"):
            if getattr(cfg, name) <= 0:
                raise ModelError(f"model metadata gives {name} = {getattr(cfg, name)}")
        return cfg

    def rope_inv_freq(self, freq_factors=None) -> np.ndarray:
        """Angle per position of each rotated pair i: base^(-2i/rope_dim) * freq_scale,
        divided by the file's `rope_freqs.weight` factors when it has them (Llama 3.1+).
        Shared by the C engine and the reference so both rotate by the same angles."""
        i = np.arange(self.rope_dim // 2, dtype=np.float64)
        inv = self.rope_freq_scale * self.rope_freq_base ** (-2.0 * i / self.rope_dim)
        if freq_factors is not None:
            inv = inv / np.asarray(freq_factors, dtype=np.float64)
        return inv
