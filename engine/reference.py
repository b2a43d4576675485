"""The NumPy model: the oracle the C forward pass (ckernels/src/forward.c) is tested
against, for every family in engine/arch (the config's variations switch the same steps
forward.c switches). Slow and simple on purpose; every step mirrors forward.c.

The residual stream and every activation are float32. Matrix products with quantized
weights, RoPE, the attention and SwiGLU / GeGLU are computed in float64 and rounded to
float32 once, as forward.c does: the result is then a property of the arithmetic, not of an
order of float operations, so the two engines agree bit for bit (up to double
roundings that almost never reach float32's last bit).

With emulate_q8=True each product with a block-quantized weight first sends the
activations through the codec the C kernels quantize them with (Q8_0; Q8_1 for Q4_1
and Q5_1 weights; Q8_K for the K types and IQ4_XS), and takes the weights' exact values
(dequantized in float64). That makes the reference exact for the C engine: 8-bit rounding is a
step function, so any other rounding of its inputs flips some quantized values, and
over many layers the flips add up to a visible difference in the logits. The KV cache
is fp16 in both (as in llama.cpp): k and v are rounded to float16.
"""
from __future__ import annotations

import math

import numpy as np

import ckernels
import formats
from formats import GGMLType

from .config import ModelConfig
from .model import ROPE_FACTOR_TENSORS, layer_matrix_rows

# activation codec of the C kernels, per weight type, from the C type table (float
# weights are absent: their activations stay float)
ACTIVATION_TYPE = {GGMLType(b.ggml_id): GGMLType[b.act_type]
                   for b in ckernels.weight_types() if b.act_type is not None}


def dequantize_tensor(t) -> np.ndarray:
    if t.type == GGMLType.F32:
        return np.array(t.data, dtype=np.float32).reshape(t.shape)
    return np.asarray(formats.dequantize(t.data, t.type, t.shape), dtype=np.float32)


def _block_halves(blocks: np.ndarray, block_bytes: int, offset: int) -> np.ndarray:
    """The fp16 field at byte `offset` of every block, as float32 (..., n_blocks)."""
    b = np.ascontiguousarray(blocks).reshape(*blocks.shape[:-1], -1, block_bytes)
    return np.ascontiguousarray(b[..., offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)


class Linear:
    """y = x @ W.T over a dequantized weight."""

    def __init__(self, t, emulate_q8: bool):
        self.name = getattr(t, "name", None)  # the GGUF tensor (calibration records by it)
        self.first = getattr(t, "first", 0)   # its first row in that tensor (fused ones)
        self.act_type = ACTIVATION_TYPE.get(GGMLType(t.type)) if emulate_q8 else None
        self.block_min = None
        if self.act_type == GGMLType.Q8_1:
            # Q4_1 / Q5_1 x Q8_1 is computed per block as d_w*d_x*sum(q_w*q_x) + m_w*s_x with
            # s_x = fp16(d_x * sum(q_x)): split W = q*d + m into its two parts.
            rows, block_bytes = t.shape[0], formats.GGML_QUANT_SIZES[GGMLType(t.type)][1]
            raw = np.array(t.data, dtype=np.uint8).reshape(rows, -1, block_bytes)
            self.block_min = _block_halves(raw.reshape(rows, -1), block_bytes, 2)  # (rows, n_blocks)
            raw[..., 2:4] = 0                                  # m = 0 leaves q*d
            self.w = np.asarray(formats.dequantize(raw.reshape(rows, -1), t.type, t.shape),
                                dtype=np.float32)
        elif self.act_type is not None:  # the exact values of the quantized weights
            self.w = np.asarray(formats.dequantize(t.data, t.type, t.shape, dtype=np.float64))
        else:
            self.w = dequantize_tensor(t)
        if self.act_type is not None:
            self.w = self.w.astype(np.float64)
            if self.block_min is not None:
                self.block_min = self.block_min.astype(np.float64)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.act_type is None:
            return x @ self.w.T
        xq = formats.quantize(np.ascontiguousarray(x, dtype=np.float32), self.act_type)
        # float64: Q8_K's float32 d times q is not exact in float32
        y = formats.dequantize(xq, self.act_type, x.shape, dtype=np.float64) @ self.w.T
        if self.block_min is not None:
            act_bytes = formats.GGML_QUANT_SIZES[self.act_type][1]
            y += _block_halves(xq, act_bytes, 2).astype(np.float64) @ self.block_min.T
        return y.astype(np.float32)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    # the sum of squares in float64, as forward.c does
    ss = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    return x * (1.0 / np.sqrt(ss + eps)).astype(np.float32) * weight


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool = False) -> np.ndarray:
    """Rotate pair i of the first rope_dim dims of each head, in float64: (x[2i], x[2i+1])
    (interleaved), or (x[i], x[i + rope_dim/2]) when neox (rotate-half).
    x: (n_tokens, n_heads, head_dim); cos, sin (float64): (n_tokens, rope_dim / 2)."""
    x = x.copy()
    half = cos.shape[-1]
    i0, i1 = (slice(0, half), slice(half, 2 * half)) if neox else \
        (slice(0, 2 * half, 2), slice(1, 2 * half, 2))
    x0, x1 = x[..., i0].astype(np.float64), x[..., i1].astype(np.float64)
    c, s = cos[:, None, :], sin[:, None, :]
    x[..., i0] = x0 * c - x1 * s
    x[..., i1] = x0 * s + x1 * c
    return x


def fp16(x: np.ndarray) -> np.ndarray:
    """x rounded to the nearest float16 (the KV cache's type), as float32."""
    return x.astype(np.float16).astype(np.float32)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, in float64."""
    g = gate.astype(np.float64)
    return (g / (1.0 + np.exp(-g)) * up).astype(np.float32)


_tanh = np.vectorize(math.tanh, otypes=[np.float64])  # libm's, as forward.c calls it


def geglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gelu(gate) * up with GELU's tanh approximation, in float64: forward.c's operations
    in forward.c's order."""
    g = gate.astype(np.float64)
    u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    return (0.5 * g * (1.0 + _tanh(u)) * up).astype(np.float32)


class RowRange:
    """Rows [first, first + rows) of a 2-D GGUF tensor, as a tensor of their own (the
    row ranges of a fused matrix that forward.c multiplies as separate matrices)."""

    def __init__(self, t, first: int, rows: int):
        self.name, self.type, self.first = t.name, t.type, first
        self.shape = (rows, t.shape[-1])
        self.data = t.data[first:first + rows]


class Layer:
    def __init__(self, f, i: int, c: ModelConfig, emulate_q8: bool):
        t = lambda name: f.tensors[f"blk.{i}.{name}.weight"]  # noqa: E731
        self.attn_norm = dequantize_tensor(t("attn_norm"))
        self.ffn_norm = dequantize_tensor(t("ffn_norm"))
        m = {field: Linear(RowRange(t(name), first, rows), emulate_q8)
             for field, (name, first, rows) in layer_matrix_rows(c).items()}
        self.wq, self.wk, self.wv, self.wo = (m[k] for k in
                                              ("attn_q", "attn_k", "attn_v", "attn_output"))
        self.w1, self.w3, self.w2 = (m[k] for k in ("ffn_gate", "ffn_up", "ffn_down"))
        vector = lambda name: dequantize_tensor(f.tensors[f"blk.{i}.{name}"])  # noqa: E731
        self.q_bias, self.k_bias, self.v_bias = (
            (vector("attn_q.bias"), vector("attn_k.bias"), vector("attn_v.bias"))
            if c.attn_qkv_bias else (None, None, None))
        self.q_norm, self.k_norm = ((vector("attn_q_norm.weight"), vector("attn_k_norm.weight"))
                                    if c.attn_qk_norm else (None, None))
        # the norms after attention and after the FFN, where the family has them
        present = c.arch.tensor_shapes(c)
        self.attn_post_norm, self.ffn_post_norm = (
            vector(name) if f"blk.{i}.{name}" in present else None
            for name in ("post_attention_norm.weight", "post_ffw_norm.weight"))
        self.swa = c.swa_layers[i]
        self.glu = geglu if c.ffn_gelu else swiglu

    def qkv(self, h: np.ndarray, c: ModelConfig, cos, sin):
        """The attention's queries and keys (normed per head and rotated) and values of the
        normed stream h: (n, n_head, head_dim), (n, n_head_kv, head_dim) x 2."""
        n = h.shape[0]
        q, k, v = self.wq(h), self.wk(h), self.wv(h)
        if self.q_bias is not None:
            q, k, v = q + self.q_bias, k + self.k_bias, v + self.v_bias
        q = q.reshape(n, c.n_head, c.head_dim)
        k = k.reshape(n, c.n_head_kv, c.head_dim)
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm, c.rms_eps), rms_norm(k, self.k_norm, c.rms_eps)
        return (rope(q, cos, sin, c.rope_neox), rope(k, cos, sin, c.rope_neox),
                v.reshape(n, c.n_head_kv, c.head_dim))


class ReferenceModel:
    """Teacher-forced logits of a GGUF: `ReferenceModel(path)(tokens)` is
    (len(tokens), n_vocab) float32, tokens at positions 0.."""

    def __init__(self, path, emulate_q8: bool = True, n_ctx: int | None = None,
                 exact: bool = True):
        """n_ctx: the context the RoPE frequency factors are chosen for (LongRoPE's short
        or long ones, ModelConfig.rope_factors_name), as Model(path, n_ctx) chooses them;
        None: the length of each call's tokens. exact=False computes the attention and the
        gated FFN in float32, all heads at once: about 3x faster and no longer forward.c's
        bits (calibration statistics need the model's values, not its last bits)."""
        self.exact = exact
        self.attention_probe = None  # exact=False: called with each layer's probabilities
        f = formats.read_gguf(path)
        try:
            self.config = c = ModelConfig.from_metadata(f.metadata, f.tensors.keys())
            self.n_ctx = n_ctx
            self._inv_freq = {}  # n_ctx -> angles per position (the factors differ)
            for name in ROPE_FACTOR_TENSORS:
                if name in f.tensors:
                    self._inv_freq[name] = c.rope_inv_freq(dequantize_tensor(f.tensors[name]))
            self._inv_freq[None] = c.rope_inv_freq()
            self._inv_freq_swa = c.rope_inv_freq_swa()
            self._tensor_names = list(f.tensors.keys())
            self.token_embd = dequantize_tensor(f.tensors["token_embd.weight"])
            self.layers = [Layer(f, i, c, emulate_q8) for i in range(c.n_layer)]
            self.output_norm = dequantize_tensor(f.tensors["output_norm.weight"])
            self.output = Linear(f.tensors["token_embd.weight" if c.tied_output
                                           else "output.weight"], emulate_q8)
        finally:
            f.close()

    def inv_freq_for(self, n_ctx: int) -> np.ndarray:
        """RoPE's angle per position of each pair in a context of n_ctx."""
        return self._inv_freq[self.config.rope_factors_name(self._tensor_names, n_ctx)]

    @property
    def inv_freq(self) -> np.ndarray:
        return self.inv_freq_for(self.n_ctx if self.n_ctx is not None else self.config.n_ctx_train)

    def __call__(self, tokens) -> np.ndarray:
        x = self.token_embd[np.asarray(tokens)] * np.float32(self.config.embd_scale)
        for i in range(self.config.n_layer):
            x = self.layer(i, x)
        return self.logits(x)

    def layer(self, i: int, x: np.ndarray) -> np.ndarray:
        """Layer i on the residual stream x (n_tokens, n_embd) of positions 0.."""
        c, L, n = self.config, self.layers[i], x.shape[0]
        inv_freq = self._inv_freq_swa if L.swa else self.inv_freq_for(self.n_ctx or n)
        angle = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None, :]
        cos, sin = np.cos(angle) * c.rope_attn_factor, np.sin(angle) * c.rope_attn_factor
        mask = np.triu(np.full((n, n), -np.inf), k=1)
        if L.swa:  # a query at p attends to keys k with p - k < n_swa
            mask += np.tril(np.full((n, n), -np.inf), k=-c.n_swa)
        scale = c.attn_scale
        group = c.n_head // c.n_head_kv
        h = rms_norm(x, L.attn_norm, c.rms_eps)
        q, k, v = L.qkv(h, c, cos, sin)
        if self.exact:
            att = self._attention(q, fp16(k), fp16(v), mask, scale, group)
        else:
            att = self._attention_f32(q, fp16(k), fp16(v), mask, scale, group,
                                      self.attention_probe)
        att = att.reshape(n, -1)
        out = L.wo(att)
        if L.attn_post_norm is not None:
            out = rms_norm(out, L.attn_post_norm, c.rms_eps)
        x = x + out
        h = rms_norm(x, L.ffn_norm, c.rms_eps)
        gate, up = L.w1(h), L.w3(h)
        if self.exact:
            act = L.glu(gate, up)
        elif L.glu is swiglu:
            act = gate / (np.float32(1) + np.exp(-gate)) * up
        else:
            act = np.float32(0.5) * gate * (np.float32(1) + np.tanh(np.float32(
                0.7978845608028654) * (gate + np.float32(0.044715) * gate * gate * gate))) * up
        out = L.w2(act)
        if L.ffn_post_norm is not None:
            out = rms_norm(out, L.ffn_post_norm, c.rms_eps)
        return x + out

    @staticmethod
    def _attention(q, k, v, mask, scale, group):
        """Causal attention of each head in float64, rounded once: (n, n_head, head_dim)."""
        k, v = k.astype(np.float64), v.astype(np.float64)
        att = np.empty(q.shape, dtype=np.float32)
        for hd in range(q.shape[1]):
            kv = hd // group  # GQA: consecutive query heads share a key/value head
            scores = q[:, hd].astype(np.float64) @ k[:, kv].T * scale + mask
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores *= 1.0 / scores.sum(axis=-1, keepdims=True)
            att[:, hd] = scores @ v[:, kv]
        return att

    @staticmethod
    def _attention_f32(q, k, v, mask, scale, group, probe=None):
        """The same attention in float32, every head in one batched product; probe, when
        given, is called with the probabilities (n_head, n_query, n_key)."""
        n, n_head, d = q.shape
        qh = q.transpose(1, 0, 2).reshape(n_head // group, group * n, d)
        scores = (qh @ k.transpose(1, 2, 0)).reshape(n_head, n, n) * np.float32(scale)
        scores += mask.astype(np.float32)
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores *= np.float32(1) / scores.sum(axis=-1, keepdims=True)
        if probe is not None:
            probe(scores)
        att = scores.reshape(n_head // group, group * n, n) @ v.transpose(1, 0, 2)
        return att.reshape(n_head, n, d).transpose(1, 0, 2)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.output(rms_norm(x, self.output_norm, self.config.rms_eps))
