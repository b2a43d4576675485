"""kiln perplexity: llama.cpp's llama-perplexity method (engine/perplexity.py) and its CLI.

The rule is re-stated here on its own (`reference_nll`) and checked against the library on
tiny random models; on the real SmolLM2 (F16, where kiln's logits match llama.cpp's to a
KL of ~1e-6) the same rule applied to llama.cpp's own logits gives the same perplexity.
"""
import json
import sys

import numpy as np
import pytest

from engine import LLM
from engine.cli.kiln import main
from engine.perplexity import PerplexityError, perplexity, read_text
from oracles import run_oracle
from tiny_models import CORPUS, make_tiny_llama


def reference_nll(logits, chunk):
    """NLL of the scored tokens of one chunk: logits of positions n//2..n-2 predict tokens
    n//2+1..n-1 (llama.cpp's `first = n_ctx/2`)."""
    n = len(chunk)
    first = n // 2
    z = np.asarray(logits, np.float64)[first:n - 1]
    lse = np.logaddexp.reduce(z, axis=-1)
    return lse - z[np.arange(n - 1 - first), np.asarray(chunk)[first + 1:]]


def reference_chunks(llm, text, n_ctx):
    """Non-overlapping n_ctx-token chunks of the text, tail dropped, first token BOS when
    the model adds BOS."""
    ids = llm.tokenize(text)
    chunks = [list(ids[i:i + n_ctx]) for i in range(0, len(ids) - n_ctx + 1, n_ctx)]
    if llm.tokenizer.add_bos:
        for c in chunks:
            c[0] = llm.tokenizer.bos_id
    return chunks


def ppl_and_err(nll):
    nll = np.asarray(nll, np.float64)
    ppl = np.exp(nll.mean())
    return ppl, ppl * nll.std() / np.sqrt(len(nll) - 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppl")
    # untied: the tied random embedding makes logits so peaked that every model predicts
    # the same token with probability ~1 (KL ~1e-10 between two seeds)
    return {name: make_tiny_llama(d / f"{name}.gguf", vocab=vocab, seed=seed, tied=False)
            for name, vocab, seed in (("gpt2", "gpt2", 0), ("gpt2b", "gpt2", 1),
                                      ("llama", "llama", 0))}


TEXT = CORPUS * 4   # ~850 tokens with either tiny vocabulary


@pytest.mark.parametrize("vocab, n_ctx", [("gpt2", 64), ("llama", 64), ("llama", 33)])
def test_ppl_is_llamacpps_rule_over_teacher_forced_logits(tiny, vocab, n_ctx):
    with LLM(tiny[vocab], n_ctx=n_ctx) as llm:
        r = perplexity(llm, TEXT, n_ctx=n_ctx)
        chunks = reference_chunks(llm, TEXT, n_ctx)
        assert len(chunks) >= 10
        if vocab == "llama":   # BOS replaces a real token at the start of later chunks
            assert llm.tokenizer.add_bos and llm.tokenize(TEXT)[n_ctx] != llm.tokenizer.bos_id
        nll = [reference_nll(llm.logits(c), c) for c in chunks]
    ppl, err = ppl_and_err(np.concatenate(nll))
    assert r.n_chunks == len(chunks) and r.n_ctx == n_ctx
    assert r.n_tokens == len(llm.tokenize(TEXT))
    assert r.n_tokens_scored == len(chunks) * (n_ctx - 1 - n_ctx // 2)
    assert r.ppl == pytest.approx(ppl, rel=1e-9)
    assert r.ppl_err == pytest.approx(err, rel=1e-6)
    running = [np.exp(np.concatenate(nll[:k + 1]).mean()) for k in range(len(chunks))]
    np.testing.assert_allclose(r.chunk_ppls, running, rtol=1e-9)
    assert r.kl is None


def test_n_chunks_limits_the_run(tiny):
    with LLM(tiny["gpt2"], n_ctx=64) as llm:
        r = perplexity(llm, TEXT, n_ctx=64, n_chunks=3)
        full = perplexity(llm, TEXT, n_ctx=64)
    assert r.n_chunks == 3 and r.chunk_ppls == pytest.approx(full.chunk_ppls[:3], rel=1e-12)


def test_kl_of_a_model_against_itself_is_zero(tiny):
    with LLM(tiny["llama"], n_ctx=64) as llm, LLM(tiny["llama"], n_ctx=64) as base:
        r = perplexity(llm, TEXT, n_ctx=64, base=base)
    assert r.kl.mean_kl == 0.0 and r.kl.kl_max == 0.0
    assert r.kl.top1_agreement == 1.0
    assert r.kl.base_ppl == r.ppl and r.kl.ln_ppl_ratio == 0.0


def test_kl_against_another_model_is_the_direct_computation(tiny):
    n_ctx = 64
    with LLM(tiny["gpt2"], n_ctx=n_ctx) as llm, LLM(tiny["gpt2b"], n_ctx=n_ctx) as base:
        r = perplexity(llm, TEXT, n_ctx=n_ctx, base=base)
        chunks = reference_chunks(llm, TEXT, n_ctx)
        pairs = [(base.logits(c), llm.logits(c), c) for c in chunks]
    first = n_ctx // 2
    kl, same, base_nll = [], [], []
    for b, m, c in pairs:
        b, m = b[first:-1].astype(np.float64), m[first:-1].astype(np.float64)
        lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
        lm = m - np.logaddexp.reduce(m, axis=-1, keepdims=True)
        kl.append((np.exp(lb) * (lb - lm)).sum(-1))
        same.append(b.argmax(-1) == m.argmax(-1))
        base_nll.append(-lb[np.arange(len(lb)), np.asarray(c)[first + 1:]])
    kl, same = np.concatenate(kl), np.concatenate(same)
    assert r.kl.mean_kl == pytest.approx(kl.mean(), rel=1e-9) and r.kl.mean_kl > 0.01
    assert r.kl.kl_max == pytest.approx(kl.max(), rel=1e-9)
    assert r.kl.top1_agreement == pytest.approx(same.mean()) and 0 < same.mean() < 1
    assert r.kl.base_ppl == pytest.approx(ppl_and_err(np.concatenate(base_nll))[0], rel=1e-9)
    assert r.kl.ln_ppl_ratio == pytest.approx(np.log(r.ppl / r.kl.base_ppl), rel=1e-9)


def test_library_refusals(tiny):
    with LLM(tiny["gpt2"], n_ctx=64) as llm, LLM(tiny["llama"], n_ctx=64) as other:
        with pytest.raises(PerplexityError, match="same tokenizer"):
            perplexity(llm, TEXT, n_ctx=64, base=other)
        with pytest.raises(PerplexityError, match=r"the text is \d+ tokens, shorter than one chunk of --ctx 64"):
            perplexity(llm, "a short text", n_ctx=64)
        with pytest.raises(PerplexityError, match="context of 64 tokens, less than the chunk size 128"):
            perplexity(llm, TEXT, n_ctx=128)
        with pytest.raises(PerplexityError, match=">= 3"):
            perplexity(llm, TEXT, n_ctx=2)


def test_read_text_is_llamacpps_file_reading(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"line one\r\nline two\n")   # bytes as they are; one final newline dropped
    assert read_text(p) == "line one\r\nline two"


# -- the real model against llama.cpp --------------------------------------------------

LLAMA_CHILD = """
import sys, numpy as np
from llama_cpp import Llama
path, text_path, n_ctx, n_chunks, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
llm = Llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, logits_all=True, verbose=False)
add_bos = llm._model.add_bos_token()
ids = llm.tokenize(open(text_path, "rb").read(), add_bos=add_bos, special=False)
chunks, logits = [], []
for i in range(n_chunks):
    c = ids[i * n_ctx:(i + 1) * n_ctx]
    if add_bos:
        c[0] = llm.token_bos()
    llm.reset()
    llm.eval(c)
    chunks.append(c)
    logits.append(np.array(llm.scores[:n_ctx], dtype=np.float32))  # a copy: scores is reused
np.savez(out, chunks=np.asarray(chunks), logits=np.stack(logits), n_tokens=len(ids))
"""


@pytest.mark.oracle
def test_smollm2_f16_ppl_matches_llamacpp(smollm2_variant, botchan, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the outside oracle (.ci/run builds it)")
    n_ctx, n_chunks = 256, 2
    path = smollm2_variant("f16")
    text = read_text(botchan)
    text_path = tmp_path / "text.txt"
    text_path.write_bytes(text.encode("utf-8"))
    out = tmp_path / "llamacpp.npz"
    run_oracle([sys.executable, "-c", LLAMA_CHILD, path, str(text_path), str(n_ctx),
                str(n_chunks), str(out)], timeout=600)
    theirs = np.load(out)
    with LLM(path, n_ctx=n_ctx) as llm:
        r = perplexity(llm, text, n_ctx=n_ctx, n_chunks=n_chunks)
        assert reference_chunks(llm, text, n_ctx)[:n_chunks] == theirs["chunks"].tolist()
    assert r.n_tokens == int(theirs["n_tokens"])
    ppl, err = ppl_and_err(np.concatenate([reference_nll(z, c) for z, c in
                                           zip(theirs["logits"], theirs["chunks"])]))
    print(f"kiln PPL {r.ppl:.4f} +/- {r.ppl_err:.4f}, llama.cpp {ppl:.4f} +/- {err:.4f}")
    assert r.ppl == pytest.approx(ppl, rel=0.005), (r.ppl, ppl)
    assert r.ppl_err == pytest.approx(err, rel=0.05)


# -- the CLI ------------------------------------------------------------------------------

@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def run_cli(capsys, *argv):
    rc = main(["perplexity", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_prints_running_and_final_estimates(tiny, text_file, capsys):
    rc, out, err = run_cli(capsys, tiny["gpt2"], "-f", text_file, "--ctx", 64)
    assert rc == 0, err
    with LLM(tiny["gpt2"], n_ctx=64) as llm:
        r = perplexity(llm, read_text(text_file), n_ctx=64)
    assert out.strip() == f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}"
    assert f"{r.n_chunks} chunks of 64 tokens, scoring the last 31 of each" in err
    assert "".join(f"[{i + 1}]{p:.4f}," for i, p in enumerate(r.chunk_ppls)) in err


def test_cli_json(tiny, text_file, capsys):
    rc, out, err = run_cli(capsys, tiny["gpt2"], "-f", text_file, "--ctx", 64, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert {"ppl", "ppl_err", "n_chunks", "n_ctx", "n_tokens_scored", "n_tokens"} <= set(d)
    assert d["n_ctx"] == 64 and d["n_tokens_scored"] == d["n_chunks"] * 31 and d["ppl"] > 1
    assert "mean_kl" not in d

    rc, out, err = run_cli(capsys, tiny["gpt2"], "-f", text_file, "--ctx", 64, "--json",
                           "--kl-base", tiny["gpt2b"], "--chunks", 2)
    assert rc == 0, err
    d = json.loads(out)
    assert d["n_chunks"] == 2 and d["mean_kl"] > 0 and 0 <= d["top1_agreement"] <= 1
    assert {"base_ppl", "kl_err", "top1_agreement_err", "ln_ppl_ratio"} <= set(d)


def test_cli_kl_base_report(tiny, text_file, capsys):
    rc, out, err = run_cli(capsys, tiny["gpt2"], "-f", text_file, "--ctx", 64, "--kl-base", tiny["gpt2"])
    assert rc == 0, err
    assert "Mean    KLD:   0.000000" in out and "Same top p: 100.000" in out
    assert out.strip().splitlines()[-1].startswith("Final estimate: PPL = ")


@pytest.mark.parametrize("case, message", [
    ("missing", "text file not found"),
    ("not_utf8", "is not UTF-8 text"),
    ("short", "shorter than one chunk of --ctx 64"),
    ("ctx_small", "--ctx must be an integer >= 3"),
    ("ctx_train", "longer than the model's training context (512 tokens)"),
    ("vocab", "KL divergence needs the same tokenizer"),
    ("base_missing", "model file not found"),
])
def test_cli_errors_are_one_line(tiny, text_file, tmp_path, capsys, case, message):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time", encoding="utf-8")
    args = {
        "missing": ["-f", tmp_path / "nope.txt"],
        "not_utf8": ["-f", bad],
        "short": ["-f", short, "--ctx", 64],
        "ctx_small": ["-f", text_file, "--ctx", 2],
        "ctx_train": ["-f", text_file, "--ctx", 1024],
        "vocab": ["-f", text_file, "--ctx", 64, "--kl-base", tiny["llama"]],
        "base_missing": ["-f", text_file, "--ctx", 64, "--kl-base", tmp_path / "nope.gguf"],
    }[case]
    rc, out, err = run_cli(capsys, tiny["gpt2"], *args)
    assert rc == 1
    assert err.startswith("kiln: error: ") and err.count("\n") == 1 and message in err, err
    assert out == ""
