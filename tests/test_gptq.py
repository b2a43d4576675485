"""GPTQ error-feedback rounding (engine.convert.gptq, `kiln convert --method gptq`): the
solver lowers the error that matters (the output error under the calibration inputs)
for every block type it rounds into; the calibration's Hessians agree with its importance
matrix; converted files are plain blocks that kiln and llama.cpp run, closer to the
float model than plain and importance-weighted rounding."""
import numpy as np
import pytest

import formats
from engine.cli import convert as convert_cli
from engine.convert.gptq import GPTQ, GPTQ_TYPES, GPTQError
from formats import GGMLType as T
from tiny_models import CORPUS, make_tiny_llama


def _inputs(n, rows=2048, seed=0):
    """Correlated activations with a few loud channels, as a transformer's are."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(n, n)) / np.sqrt(n) + np.eye(n)
    x = rng.normal(size=(rows, n)) @ mix
    x[:, rng.choice(n, 4, replace=False)] *= 8.0
    return x


def _output_error(w, q, t, h):
    e = w.astype(np.float64) - formats.dequantize(q, t, w.shape).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", e, h, e))


@pytest.mark.parametrize("t", GPTQ_TYPES, ids=lambda t: t.name)
def test_gptq_lowers_the_output_error_of_every_block_type(t):
    n = 512 if formats.GGML_QUANT_SIZES[t][0] == 256 else 256
    x = _inputs(n)
    h = x.T @ x
    w = np.random.default_rng(1).normal(size=(24, n)).astype(np.float32)
    got = GPTQ(h, t).quantize(w)
    assert got.shape == formats.quantize(w, t).shape and got.dtype == np.uint8
    plain = _output_error(w, formats.quantize(w, t), t, h)
    weighted = _output_error(w, formats.quantize_weighted(w, t, np.diag(h) / len(x)), t, h)
    gptq = _output_error(w, got, t, h)
    assert gptq < 0.9 * min(plain, weighted), (plain, weighted, gptq)


def test_chunks_of_rows_give_the_same_blocks_as_the_whole_matrix():
    x = _inputs(128)
    w = np.random.default_rng(2).normal(size=(10, 128)).astype(np.float32)
    s = GPTQ(x.T @ x, T.Q4_0)
    assert np.array_equal(s.quantize(w), np.concatenate([s.quantize(w[:3]), s.quantize(w[3:])]))


def test_a_stack_of_hessians_gives_each_group_of_rows_its_own():
    h0, h1 = (_inputs(64, seed=s).T @ _inputs(64, seed=s) for s in (3, 4))
    w = np.random.default_rng(5).normal(size=(8, 64)).astype(np.float32)
    grouped = GPTQ(np.stack([h0, h1]), T.Q5_0)
    want = np.concatenate([GPTQ(h0, T.Q5_0).quantize(w[:4]), GPTQ(h1, T.Q5_0).quantize(w[4:])])
    assert np.array_equal(grouped.quantize(w), want)
    # a chunk of rows starting inside the matrix is told its place
    assert np.array_equal(grouped.quantize(w[2:6], first_row=2, n_rows=8), want[2:6])
    with pytest.raises(GPTQError, match="equal groups"):
        grouped.quantize(w[:7])


def test_columns_no_input_reaches_are_quantized_as_zero():
    x = _inputs(64)
    x[:, 5] = 0.0
    w = np.random.default_rng(6).normal(size=(4, 64)).astype(np.float32)
    q = formats.dequantize(GPTQ(x.T @ x, T.Q8_0).quantize(w), T.Q8_0, w.shape)
    assert np.all(q[:, 5] == 0) and np.all(np.isfinite(q))


@pytest.mark.parametrize("hessian, t, message", [
    (np.ones((64, 32)), T.Q4_0, "square"),
    (np.eye(48), T.Q4_0, "whole Q4_0 blocks"),
    (np.eye(64), T.F16, "not a block type"),
    (np.full((64, 64), np.nan), T.Q4_0, "NaN or infinite"),
    (2 * np.ones((64, 64)) - np.eye(64), T.Q4_0, "not positive semi-definite"),
])
def test_bad_hessians_are_named(hessian, t, message):
    with pytest.raises(GPTQError, match=message):
        GPTQ(hessian, t)


def test_rows_of_another_width_are_refused():
    with pytest.raises(GPTQError, match="rows of 32 given to a solver for rows of 64"):
        GPTQ(np.eye(64), T.Q4_0).quantize(np.zeros((2, 32), np.float32))


# -- calibration and conversion ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny float model (rows of 256: the K types apply) and calibration / held-out text."""
    d = tmp_path_factory.mktemp("tiny-gptq")
    path = make_tiny_llama(d / "tiny.gguf", n_layer=2, n_embd=256, n_ff=512, n_head=4,
                           n_head_kv=2, tied=True, seed=11)
    words = CORPUS.split()
    calib, held = d / "calib.txt", d / "held.txt"
    calib.write_text(CORPUS * 4, encoding="utf-8")
    held.write_text(" ".join(reversed(words)) * 4, encoding="utf-8")
    return path, calib, held


def test_calibration_hessians_agree_with_its_importance_matrix(tiny):
    from engine.convert.calibrate import calibrate
    from engine.perplexity import read_text
    path, calib, _ = tiny
    cal = calibrate(path, read_text(calib), n_ctx=64, n_chunks=3, quiet=True, hessians=True)
    for name, sums in cal.imatrix.sums.items():
        h = cal.hessians[name]
        if name.endswith("attn_v.weight"):  # one per KV head, weighted by attention
            assert h.shape == (2, 256, 256)
            assert not np.allclose(np.diag(h[0]), sums[0], rtol=1e-3)
            assert np.all(np.linalg.eigvalsh(h[0]) > -1e-6 * np.trace(h[0]))
        else:  # the diagonal of the sum of x x^T is the sum of squares
            np.testing.assert_allclose(np.diag(h), sums[0], rtol=1e-4, err_msg=name)
    # q, k share one array (computed once); so do gate and up
    assert cal.hessians["blk.1.attn_q.weight"] is cal.hessians["blk.1.attn_k.weight"]
    assert cal.hessians["blk.0.ffn_gate.weight"] is cal.hessians["blk.0.ffn_up.weight"]


def _logit_error(path, base, held):
    """Mean square difference of the teacher-forced logits from the float model's over
    the held-out text (the tiny random models' softmax is too sharp for a KL to tell)."""
    from engine import LLM
    from engine.perplexity import read_text
    with LLM(str(path), n_ctx=256) as llm, LLM(str(base), n_ctx=256) as b:
        ids = b.tokenize(read_text(held))[:200]
        return float(np.mean((llm.logits(ids) - b.logits(ids)) ** 2))


@pytest.mark.parametrize("typ", ["q4_0", "q4_1", "q5_1", "q4_k_m"])
def test_gptq_files_are_closer_to_the_float_model_than_plain_ones(tiny, tmp_path, typ):
    path, calib, held = tiny
    cal = ["--calibration", str(calib), "--calibration-ctx", "64", "--quiet"]
    kls = {}
    for method, extra in (("plain", []), ("imatrix", cal), ("gptq", cal + ["--method", "gptq"])):
        out = tmp_path / f"{method}.gguf"
        assert convert_cli.main([path, "-o", str(out), "--type", typ, "--quiet", *extra]) == 0
        kls[method] = _logit_error(out, path, held)
    assert kls["gptq"] < kls["plain"] and kls["imatrix"] < kls["plain"], kls
    with formats.read_gguf(tmp_path / "gptq.gguf") as f:
        assert f.metadata["quantize.kiln.method"] == "gptq"


def test_gptq_needs_calibration_text_and_writes_nothing_without_it(tiny, tmp_path, capsys):
    path, _, _ = tiny
    out = tmp_path / "x.gguf"
    assert convert_cli.main([path, "-o", str(out), "--type", "q4_0", "--method", "gptq"]) == 1
    assert "--method gptq needs --calibration TEXT" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.oracle
def test_llama_cpp_runs_a_gptq_file_as_kiln_does(tiny, tmp_path):
    from test_convert import llama_cpp_greedy

    from engine import LLM
    path, calib, _ = tiny
    out = tmp_path / "gptq.gguf"
    assert convert_cli.main([path, "-o", str(out), "--type", "q4_k_m", "--calibration",
                             str(calib), "--calibration-ctx", "64", "--method", "gptq",
                             "--quiet"]) == 0
    want = llama_cpp_greedy(out, "Once upon a time")["tokens"]
    with LLM(str(out), n_ctx=64) as llm:
        got = llm.generate("Once upon a time", max_tokens=16, temperature=0,
                           ignore_eos=True).tokens
    assert got == want


def test_attn_v_hessians_weight_each_token_by_the_attention_it_receives(tiny):
    """An independent computation, position by position, from the reference model's
    attention probabilities of layer 0 on one chunk."""
    from engine.convert.calibrate import calibrate
    from engine.perplexity import read_text, split_chunks
    from engine.reference import ReferenceModel, rms_norm
    from engine.tokenizer import load_tokenizer
    path, calib, _ = tiny
    cal = calibrate(path, read_text(calib), n_ctx=64, n_chunks=1, quiet=True, hessians=True)
    with formats.read_gguf(path) as f:
        tok = load_tokenizer(f.metadata)
    chunk = split_chunks(tok.encode(read_text(calib)), 64, tok.bos_id if tok.add_bos else None, 1)[0]
    m = ReferenceModel(path, emulate_q8=False, exact=False)
    seen = []
    m.attention_probe = seen.append
    x = m.token_embd[chunk]
    m.layer(0, x)
    probs = seen[0].astype(np.float64)                       # (n_head 4, 64, 64)
    h_in = rms_norm(x, m.layers[0].attn_norm, m.config.rms_eps).astype(np.float64)
    for kv in range(2):                                      # heads 2kv, 2kv+1 share kv
        w = np.array([sum(probs[hd, q, t] ** 2 for hd in (2 * kv, 2 * kv + 1)
                          for q in range(64)) for t in range(64)])
        w *= 64 / w.sum()
        want = sum(w[t] * np.outer(h_in[t], h_in[t]) for t in range(64))
        np.testing.assert_allclose(cal.hessians["blk.0.attn_v.weight"][kv], want,
                                   rtol=2e-3, atol=1e-4 * np.abs(want).max())
    assert w[0] > 2 * w[1:].mean()  # the first position is attended most (every query sees it)
