"""The C forward pass against the NumPy reference on tiny random-weight Llamas.

Required: max |difference| <= 1e-3 * max |logit| against the reference that emulates
the kernels' Q8 activation quantization, mean KL < 1e-3 against the plain float
reference; 1 and 2 threads bit-identical.

With quantized weights the engines agree bit for bit, at every position: both compute
the quantized products, RoPE, attention and SwiGLU in double and round once
(forward.c), so no activation can land on the other side of an 8-bit rounding boundary
in one engine only. With float weights the C products are summed in float (in another
order than NumPy's), so there the logits agree to rounding, well inside that bound.
"""
import numpy as np
import pytest

import ckernels
from engine.errors import ContextOverflowError, ModelError
from engine.model import MATRIX_TYPES, Model, physical_cores
from engine.reference import ReferenceModel
from formats import FLOAT_TYPES, GGMLType
from cpu_isas import expected_isas
from tiny_models import SUPER_BLOCK_SHAPE, make_tiny_llama, mean_kl, needs_super_blocks

# vocab, n_head, n_head_kv, head_dim, tied, ftype: every ftype, both vocabularies,
# GQA and not, tied and untied, head sizes 32/64/128, n_head * head_dim != n_embd
CASES = [
    ("gpt2", 4, 2, 32, True, "f32"),
    ("llama", 2, 2, 128, False, "f32"),
    ("llama", 4, 4, 64, False, "f16"),
    ("gpt2", 2, 1, 128, True, "f16"),
    ("llama", 4, 2, 32, False, "bf16"),
    ("gpt2", 2, 1, 128, False, "q4_0"),
    ("llama", 4, 1, 64, True, "q4_0"),
    ("llama", 4, 2, 32, True, "q4_1"),
    ("gpt2", 6, 2, 32, False, "q4_1"),
    ("gpt2", 4, 4, 64, True, "q8_0"),
    ("llama", 8, 2, 32, False, "q8_0"),
    ("llama", 4, 2, 32, True, "q5_0"),
    ("gpt2", 2, 1, 128, False, "q5_1"),
    ("llama", 4, 4, 64, False, "iq4_nl"),
    # the super-block types: matrix widths in whole super-blocks (SUPER_BLOCK_SHAPE's)
    ("gpt2", 4, 2, 64, True, "q2_k"),
    ("llama", 4, 4, 64, False, "q3_k"),
    ("gpt2", 4, 1, 64, False, "q4_k"),
    ("llama", 8, 2, 32, True, "q5_k"),
    ("gpt2", 4, 2, 64, False, "q6_k"),
    ("llama", 2, 2, 128, True, "iq4_xs"),
]
N_TOKENS = 40
QUANTIZED = {t.name.lower() for t in MATRIX_TYPES if t not in FLOAT_TYPES}  # block types


def test_cases_cover_every_matrix_type():
    assert {c[-1] for c in CASES} == {t.name.lower() for t in MATRIX_TYPES}


def widths(ftype):
    """n_embd and n_ff of a CASES model: whole super-blocks for the types that need them."""
    if needs_super_blocks(ftype):
        return {k: SUPER_BLOCK_SHAPE[k] for k in ("n_embd", "n_ff")}
    return dict(n_embd=64, n_ff=96)


def case_id(c):
    return "-".join(str(x) for x in c)


@pytest.fixture(scope="module", params=CASES, ids=case_id)
def tiny(request, tmp_path_factory):
    vocab, n_head, n_head_kv, head_dim, tied, ftype = request.param
    path = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "m.gguf", vocab=vocab,
                           n_layer=2, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
                           tied=tied, ftype=ftype, seed=7, **widths(ftype))
    ref = ReferenceModel(path)
    tokens = np.random.default_rng(0).integers(0, ref.config.n_vocab, N_TOKENS)
    return (path, tokens, ref(tokens), ReferenceModel(path, emulate_q8=False)(tokens),
            ftype in QUANTIZED)


def check(logits, ref_q8, ref_float, exact):
    assert np.isfinite(logits).all()
    if exact:
        np.testing.assert_array_equal(logits, ref_q8)
    assert np.abs(logits - ref_q8).max() <= 1e-3 * np.abs(ref_q8).max()
    assert mean_kl(ref_float, logits) < 1e-3


def test_batched_prompt(tiny):
    path, tokens, ref_q8, ref_float, exact = tiny
    with Model(path, n_ctx=64, n_threads=2) as m:
        check(m.eval(tokens, 0, logits_all=True), ref_q8, ref_float, exact)
        last = m.eval(tokens, 0)  # last token only
        assert last.shape == (m.config.n_vocab,)
        np.testing.assert_array_equal(last, m.eval(tokens, 0, logits_all=True)[-1])


def test_single_tokens(tiny):
    path, tokens, ref_q8, ref_float, exact = tiny
    with Model(path, n_ctx=64, n_threads=2) as m:
        logits = np.stack([m.eval(tokens[i:i + 1], i) for i in range(len(tokens))])
    check(logits, ref_q8, ref_float, exact)


def test_chunks_and_cache_reuse(tiny):
    """A prompt longer than the internal batch is split; later evals continue the cache,
    and re-evaluating from an earlier n_past overwrites it."""
    path, tokens, ref_q8, ref_float, exact = tiny
    with Model(path, n_ctx=64, n_threads=2, n_batch=16) as m:
        head = m.eval(tokens[:25], 0, logits_all=True)           # chunks of 16 + 9
        tail = m.eval(tokens[25:], 25, logits_all=True)
        check(np.concatenate([head, tail]), ref_q8, ref_float, exact)
        m.eval([1, 2, 3], 10)                                    # scribble on the cache
        again = m.eval(tokens[10:], 10, logits_all=True)
        check(again, ref_q8[10:], ref_float[10:], exact)


def test_trace_holds_each_layers_output(tiny):
    """eval_trace's residual stream after each layer is the reference's layer output on
    the stream entering it (bit for bit with quantized weights)."""
    path, tokens, ref_q8, ref_float, exact = tiny
    ref = ReferenceModel(path)
    with Model(path, n_ctx=64, n_threads=2) as m:
        logits, trace = m.eval_trace(tokens)
    np.testing.assert_array_equal(trace[0], ref.token_embd[tokens])
    for i in range(ref.config.n_layer):
        want = ref.layer(i, trace[i])
        if exact:
            np.testing.assert_array_equal(trace[i + 1], want)
        np.testing.assert_allclose(trace[i + 1], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    check(logits, ref_q8, ref_float, exact)


def test_threads_bit_identical(tiny):
    path, tokens = tiny[:2]
    out = []
    for n_threads in (1, 2):
        with Model(path, n_ctx=64, n_threads=n_threads) as m:
            assert m.n_threads == n_threads
            out.append((m.eval(tokens, 0, logits_all=True),
                        np.stack([m.eval(tokens[i:i + 1], i) for i in range(8)])))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])


@pytest.fixture(scope="module")
def small_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("small") / "m.gguf", n_layer=1)


def test_context_overflow_names_both_lengths(small_path):
    with Model(small_path, n_ctx=16, n_threads=1) as m:
        m.eval(list(range(3, 13)), 0)
        with pytest.raises(ContextOverflowError, match=r"\b16\b") as e:
            m.eval(list(range(3, 10)), 10)
        assert "17" in str(e.value)
        with pytest.raises(ContextOverflowError):
            m.eval(list(range(20)), 0)


def test_bad_arguments(small_path):
    with Model(small_path, n_ctx=16, n_threads=1) as m:
        with pytest.raises(ValueError, match="vocabulary"):
            m.eval([m.config.n_vocab], 0)
        with pytest.raises(ValueError, match="vocabulary"):
            m.eval([-1], 0)
        with pytest.raises(ValueError):
            m.eval([], 0)
        with pytest.raises(ValueError):
            m.eval([5], -1)
        with pytest.raises(ValueError, match="vocabulary"):
            m.eval([2**40], 0)
        with pytest.raises(ValueError, match="integers"):
            m.eval([1.5], 0)
    with pytest.raises(ValueError, match="closed"):
        m.eval([5], 0)
    with pytest.raises(ValueError):
        Model(small_path, n_ctx=0)


def test_thread_count_above_the_pool_limit_is_refused(small_path):
    import ckernels
    from ckernels._ext import ModelForward

    limit = ckernels.MAX_THREADS
    with pytest.raises(ValueError, match=rf"n_threads \({limit + 1}\).*limit of {limit}"):
        Model(small_path, n_ctx=8, n_threads=limit + 1)
    # the binding checks too, before it looks at anything else
    with pytest.raises(ValueError, match=rf"between 1 and {limit}.*got {limit + 1}"):
        ModelForward({}, None, [], 0, None, np.zeros(0), limit + 1)


def test_default_threads_and_metadata(small_path):
    with Model(small_path, n_ctx=8) as m:
        assert m.n_threads == min(physical_cores(), ckernels.MAX_THREADS) >= 1
        assert m.metadata["general.architecture"] == "llama"
        assert m.n_ctx == 8 and m.config.n_layer == 1


# ---- validation before any C runs ----

def _rewrite(src, dst, edit_metadata=None, edit_tensors=None):
    import formats
    with formats.read_gguf(src) as f:
        md = f.metadata.copy()
        tensors = [(t.name, t.type, tuple(t.shape), np.array(t.data)) for t in f.tensors.values()]
    if edit_metadata:
        edit_metadata(md)
    if edit_tensors:
        tensors = edit_tensors(tensors)
    formats.write_gguf(dst, md, tensors)
    return dst


def test_unknown_architecture_is_refused(small_path, tmp_path):
    def arch(md):
        md["general.architecture"] = "mamba"
    with pytest.raises(ModelError, match="mamba"):
        Model(_rewrite(small_path, tmp_path / "a.gguf", edit_metadata=arch))


def test_missing_tensor_is_named(small_path, tmp_path):
    def drop(ts):
        return [t for t in ts if t[0] != "blk.0.ffn_up.weight"]
    with pytest.raises(ModelError, match="blk.0.ffn_up.weight"):
        Model(_rewrite(small_path, tmp_path / "b.gguf", edit_tensors=drop))


def test_misshaped_tensor_is_named(small_path, tmp_path):
    def shrink(ts):
        out = []
        for name, type_, shape, data in ts:
            if name == "blk.0.attn_k.weight":
                shape, data = (shape[0] // 2, shape[1]), data[: shape[0] // 2]
            out.append((name, type_, shape, data))
        return out
    with pytest.raises(ModelError, match="blk.0.attn_k.weight"):
        Model(_rewrite(small_path, tmp_path / "c.gguf", edit_tensors=shrink))


def test_unsupported_tensor_type_is_named(small_path, tmp_path):
    from formats import FLOAT_TYPES, GGMLType

    def retype(ts):  # an F32 matrix relabelled I32: same bytes, a type kiln cannot multiply
        return [(n, GGMLType.I32 if n == "blk.0.ffn_gate.weight" else t, s, d.view(np.int32)
                 if n == "blk.0.ffn_gate.weight" else d) for n, t, s, d in ts]
    with pytest.raises(ModelError, match="blk.0.ffn_gate.weight.*I32"):
        Model(_rewrite(small_path, tmp_path / "d.gguf", edit_tensors=retype))


def test_kv_cache_holds_roped_keys_and_values(tmp_path):
    """The cache (keys stored transposed) holds what the reference computes: keys after
    RoPE and values of every position, per layer; later evals append after n_past."""
    from engine import reference as R
    path = make_tiny_llama(tmp_path / "kv.gguf", n_layer=2, n_embd=64, n_head=4, n_head_kv=2,
                           head_dim=32, n_ff=96, seed=11)
    ref = R.ReferenceModel(path, emulate_q8=False)
    c = ref.config
    tokens = np.random.default_rng(1).integers(0, c.n_vocab, 21)
    with Model(path, n_ctx=37, n_threads=2) as m:  # n_ctx not a multiple of the key block
        m.eval(tokens[:13], 0)
        m.eval(tokens[13:], 13)
        x = ref.token_embd[tokens]
        n = len(tokens)
        angle = np.arange(n)[:, None] * ref.inv_freq[None, :]
        cos, sin = np.cos(angle), np.sin(angle)
        for i, L in enumerate(ref.layers):
            h = R.rms_norm(x, L.attn_norm, c.rms_eps)
            k = R.rope(L.wk(h).reshape(n, c.n_head_kv, c.head_dim), cos, sin).reshape(n, -1)
            keys, values = m._forward.kv_cache(i, n)
            for cached in (keys, values):  # fp16 values
                np.testing.assert_array_equal(cached, cached.astype(np.float16))
            # rounded to the nearest half: off by at most one fp16 step (2^-10 relative)
            np.testing.assert_allclose(keys, R.fp16(k), rtol=1e-3, atol=1e-5)
            np.testing.assert_allclose(values, R.fp16(L.wv(h)), rtol=1e-3, atol=1e-5)
            x = ref.layer(i, x)


@pytest.mark.parametrize("n_head, n_head_kv, head_dim, n_tokens", [
    (8, 2, 36, 37),   # head size 36 leaves a tail after the vector blocks of every variant
    (6, 2, 48, 39),   # 3 query heads per KV head: passes of 4, 3 and 1 query rows
    (6, 2, 48, 38),   # ... and of 2
])
def test_attention_loops_of_every_isa(tmp_path, n_head, n_head_kv, head_dim, n_tokens):
    """The loops reading the fp16 cache come per ISA (portable, F16C/AVX2, AVX512), chosen
    by the kernels' active ISA, and take 1 to 4 query rows per pass (a tile's tokens
    times the query heads sharing a KV head): each gives the reference's logits bit for
    bit, batched and token by token."""
    import ckernels
    path = make_tiny_llama(tmp_path / "m.gguf", n_layer=2, n_embd=64, n_head=n_head,
                           n_head_kv=n_head_kv, head_dim=head_dim, n_ff=96, ftype="q8_0", seed=3)
    ref = ReferenceModel(path)
    tokens = np.random.default_rng(2).integers(0, ref.config.n_vocab, n_tokens)
    want = ref(tokens)
    before = ckernels.active_isa()
    try:
        for isa in expected_isas():
            ckernels.set_isa(isa)
            with Model(path, n_ctx=64, n_threads=2) as m:
                batched = m.eval(tokens, 0, logits_all=True)
                single = np.stack([m.eval(tokens[i:i + 1], i) for i in range(len(tokens))])
            np.testing.assert_array_equal(batched, want, err_msg=isa)
            np.testing.assert_array_equal(single, want, err_msg=isa)
    finally:
        ckernels.set_isa(before)


@pytest.mark.parametrize("n_head, n_head_kv", [(6, 2), (4, 4)])
def test_long_context_token_splits_keys_over_threads(tmp_path, n_head, n_head_kv):
    """Past 256 keys, one token's attention is split over the threads by key segments
    and the partial softmaxes are joined (forward.c, task_attention_split): the logits
    are still the reference's bit for bit, and the same as on one thread (no split)."""
    path = make_tiny_llama(tmp_path / "m.gguf", n_layer=2, n_embd=64, n_head=n_head,
                           n_head_kv=n_head_kv, head_dim=32 if n_head == 6 else 16, n_ff=96,
                           ftype="q4_0", seed=5)
    ref = ReferenceModel(path)
    tokens = np.random.default_rng(4).integers(0, ref.config.n_vocab, 300)
    want = ref(tokens)
    out = []
    for n_threads in (1, 2, 3):
        with Model(path, n_ctx=320, n_threads=n_threads) as m:
            m.eval(tokens[:250], 0)
            out.append(np.stack([m.eval(tokens[i:i + 1], i) for i in range(250, 300)]))
    for got in out:
        np.testing.assert_array_equal(got, want[250:])
