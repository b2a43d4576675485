"""The NumPy reference model is itself checked: its activation-quantization emulation
against ggml's integer block dot products, its RoPE against complex rotation, and the
whole model against llama.cpp where llama-cpp-python is installed."""
import numpy as np
import pytest

import ckernels
import formats
from formats import GGMLType
from engine.reference import Linear, ReferenceModel, rope
from tiny_models import make_tiny_llama, mean_kl
from formats.iquants import KVALUES_IQ4NL as _KVALUES_IQ4NL  # checked against ggml


class _T:  # the parts of formats.Tensor that Linear reads
    def __init__(self, x, type_):
        self.type, self.shape = type_, x.shape
        self.data = formats.quantize(x, type_)


def _halves(b, size, off):
    b = b.reshape(*b.shape[:-1], -1, size)
    return np.ascontiguousarray(b[..., off:off + 2]).view(np.float16)[..., 0].astype(np.float64)




def _weight_quants(wb, wtype):
    """The signed integer quants (rows, blocks, 32) of raw weight blocks, as ggml's
    vec_dot multiplies them (the offsets of Q4_0 and Q5_0 applied; Q4_1's and Q5_1's m
    is a separate term)."""
    if wtype == GGMLType.Q8_0:
        return wb[..., 2:].copy().view(np.int8).astype(np.int64)
    # after d (and m for Q4_1 / Q5_1): qh (Q5_*), then the 16 nibble bytes
    nib = wb[..., -16:].astype(np.int64)
    q = np.concatenate([nib & 15, nib >> 4], axis=-1)
    if wtype in (GGMLType.Q5_0, GGMLType.Q5_1):
        qh = wb[..., -20:-16].copy().view("<u4").astype(np.int64)  # (rows, blocks, 1)
        q |= ((qh >> np.arange(32)) & 1) << 4
    if wtype == GGMLType.IQ4_NL:
        return _KVALUES_IQ4NL[q]
    return q - {GGMLType.Q4_0: 8, GGMLType.Q5_0: 16}.get(wtype, 0)


def _ggml_dot(wq, wtype, xq, xtype):
    """ggml's vec_dot over blocks: d_w*d_x*sum(q_w*q_x) (+ m_w*s_x for Q4_1 and Q5_1),
    from the raw block bytes, in float64."""
    if xtype == GGMLType.Q8_K:  # the super-block types: the exact product of both
        # (their integer sums per super-block are tested in test_kernels.py's contract)
        n = xq.shape[-1] // formats.GGML_QUANT_SIZES[xtype][1] * 256
        return (formats.dequantize(xq, xtype, (xq.shape[0], n), dtype=np.float64)
                @ formats.dequantize(wq, wtype, (wq.shape[0], n), dtype=np.float64).T)
    wsize = formats.GGML_QUANT_SIZES[wtype][1]
    wb = wq.reshape(wq.shape[0], -1, wsize)
    xb = xq.reshape(xq.shape[0], -1, formats.GGML_QUANT_SIZES[xtype][1])
    qstart = 4 if xtype == GGMLType.Q8_1 else 2
    qx = xb[..., qstart:].copy().view(np.int8).astype(np.int64)          # (t, b, 32)
    sumi = np.einsum("rbk,tbk->trb", _weight_quants(wb, wtype), qx)
    y = (_halves(wq, wsize, 0)[None] * _halves(xq, xb.shape[-1], 0)[:, None] * sumi).sum(-1)
    if wtype in (GGMLType.Q4_1, GGMLType.Q5_1):
        y += _halves(xq, xb.shape[-1], 2) @ _halves(wq, wsize, 2).T
    return y


# each block weight type with the activation format the kernels pair it with
@pytest.mark.parametrize("wtype,xtype", [(GGMLType(b.ggml_id), GGMLType[b.act_type])
                                         for b in ckernels.weight_types() if b.act_type],
                         ids=str)
def test_linear_emulates_integer_block_dot(wtype, xtype):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    x = (rng.standard_normal((5, 256)) + 0.5).astype(np.float32)  # offset: s matters
    lin = Linear(_T(w, wtype), emulate_q8=True)
    wq = formats.quantize(w, wtype)
    want = _ggml_dot(wq, wtype, formats.quantize(x, xtype), xtype)
    np.testing.assert_allclose(lin(x), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    exact = x @ formats.dequantize(wq, wtype, w.shape).T
    # and the emulation is not a no-op: without it the result is the float product
    np.testing.assert_allclose(Linear(_T(w, wtype), emulate_q8=False)(x), exact, rtol=1e-5, atol=1e-3)
    assert np.abs(lin(x) - exact).max() > 1e-4 * np.abs(exact).max()


def test_rope_is_complex_rotation_of_interleaved_pairs():
    rng = np.random.default_rng(2)
    n, heads, hd, rope_dim = 7, 3, 16, 12
    x = rng.standard_normal((n, heads, hd)).astype(np.float32)
    inv = 10000.0 ** (-np.arange(0, rope_dim, 2) / rope_dim)
    ang = np.arange(n)[:, None] * inv[None]
    got = rope(x, np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32))
    z = (x[..., 0:rope_dim:2] + 1j * x[..., 1:rope_dim:2]) * np.exp(1j * ang)[:, None, :]
    np.testing.assert_allclose(got[..., 0:rope_dim:2], z.real, atol=1e-5)
    np.testing.assert_allclose(got[..., 1:rope_dim:2], z.imag, atol=1e-5)
    np.testing.assert_array_equal(got[..., rope_dim:], x[..., rope_dim:])  # partial rotary


def _llama_cpp_logits(path, tokens):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the outside oracle")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(tokens)), n_batch=512,
                          logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)  # float32 KV cache, as kiln's
    llm.eval(list(tokens))
    out = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    llm.close()
    return out


@pytest.mark.oracle
@pytest.mark.parametrize("n_head,n_head_kv,head_dim,vocab", [(4, 2, 32, "gpt2"),
                                                             (2, 2, 64, "llama")])
def test_reference_matches_llama_cpp_on_float_weights(tmp_path, n_head, n_head_kv, head_dim, vocab):
    path = make_tiny_llama(tmp_path / "tiny.gguf", vocab=vocab, n_head=n_head,
                           n_head_kv=n_head_kv, head_dim=head_dim, tied=False, seed=3)
    tokens = np.random.default_rng(4).integers(3, 250, 40)
    want = _llama_cpp_logits(path, tokens)
    got = ReferenceModel(path, emulate_q8=False)(tokens)
    assert mean_kl(want, got) < 1e-4
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max())
