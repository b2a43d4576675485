"""Greedy generation on SmolLM2 equals llama.cpp's on the same file.

The reference tokens were recorded from llama.cpp (llama-cpp-python 0.3.36) into
tests/fixtures/greedy_smollm2_{q4_1,f16}.json, so the check runs without it; where
llama_cpp is importable the same comparison also runs live. The F16 file is made from the
shipped Q4_1 file deterministically (conftest.make_smollm2_variant), so its recorded ids
stay valid. llama.cpp runs in a child process: a llama.cpp build whose instructions this
CPU lacks dies of SIGILL, which must not take pytest down with it.
tools/greedy_vs_llamacpp.py uses these helpers to measure how far llama.cpp agrees with
itself under other settings.

Re-record with:  .venv/bin/python tests/test_llm_greedy.py --record [q4_1] [f16]
"""
import json
import sys
from pathlib import Path

import pytest

from oracles import run_oracle

FIXTURES = {v: Path(__file__).parent / "fixtures" / f"greedy_smollm2_{v}.json"
            for v in ("q4_1", "f16")}
FIXTURE = FIXTURES["q4_1"]
N_TOKENS = 16
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "Here is a list of fruits: apple, banana,",
    "The quick brown fox",
    "In 1969, the first humans",
    "To make a cup of tea, you",
    "Photosynthesis is the process by which",
]


# The settings the fixtures were recorded with; llama_kwargs override them (the tool
# varies n_batch, n_threads and flash_attn).
LLAMACPP_SETTINGS = {"n_ctx": 256, "n_threads": 2}


def llamacpp_greedy(path, prompts, n_tokens=N_TOKENS, **llama_kwargs):
    """Prompt ids and the first n_tokens greedy ids (argmax of llama.cpp's logits,
    end tokens included) for each prompt."""
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), verbose=False, **{**LLAMACPP_SETTINGS, **llama_kwargs})
    n_vocab = llm.n_vocab()
    add_bos = llm._model.add_bos_token()  # the file's tokenizer.ggml.add_bos_token
    cases = []
    for prompt in prompts:
        ids = llm.tokenize(prompt.encode(), add_bos=add_bos, special=True)
        llm.reset()
        llm.eval(ids)
        out = []
        for i in range(n_tokens):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
            out.append(int(np.argmax(logits)))
            if i < n_tokens - 1:
                llm.eval([out[-1]])
        cases.append({"prompt": prompt, "prompt_tokens": ids, "tokens": out,
                      "text": llm.detokenize(out).decode("utf-8", "replace")})
    llm.close()
    return cases


def llamacpp_greedy_in_child(path, prompts, **llama_kwargs):
    code = ("import json, sys; sys.path.insert(0, %r); import test_llm_greedy as t; "
            "print(json.dumps(t.llamacpp_greedy(%r, %r, **%r)))"
            % (str(Path(__file__).parent), str(path), prompts, llama_kwargs))
    proc = run_oracle([sys.executable, "-c", code], timeout=600)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_cases(variant="q4_1", key="cases"):
    """Recorded llama.cpp cases: "cases" with its default settings, "flash_attn_cases"
    with flash attention switched on (the same computation, summed in another order)."""
    return json.loads(FIXTURES[variant].read_text())[key]


def count_equal(tokens_a, tokens_b, n_tokens=N_TOKENS):
    """How many prompts' token lists agree on their first n_tokens."""
    return sum(a[:n_tokens] == b[:n_tokens] for a, b in zip(tokens_a, tokens_b, strict=True))


def kiln_greedy(llm, prompts, n_tokens=N_TOKENS):
    return [llm.generate(p, max_tokens=n_tokens, temperature=0, ignore_eos=True).tokens for p in prompts]


def assert_mostly_equal(kiln_tokens, cases, min_equal=9, n_tokens=N_TOKENS):
    equal = [k[:n_tokens] == c["tokens"][:n_tokens] for k, c in zip(kiln_tokens, cases)]
    detail = "\n".join(f"{c['prompt']!r}: llama.cpp {c['tokens']} kiln {k}"
                       for k, c, e in zip(kiln_tokens, cases, equal) if not e)
    assert sum(equal) >= min_equal, f"{sum(equal)}/{len(cases)} equal:\n{detail}"


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from engine import LLM
    with LLM(smollm2_path, n_ctx=256, n_threads=2) as llm:
        yield llm


@pytest.mark.parametrize("variant", sorted(FIXTURES))
def test_fixture_is_complete(variant):
    for key in ("cases", "flash_attn_cases"):
        cases = load_cases(variant, key)
        assert [c["prompt"] for c in cases] == PROMPTS
        assert all(len(c["tokens"]) == N_TOKENS for c in cases)
    # both files carry the same tokenizer
    assert [c["prompt_tokens"] for c in cases] == [c["prompt_tokens"] for c in load_cases()]


def test_prompts_tokenize_like_llamacpp(smollm2):
    cases = load_cases()
    assert [smollm2.tokenize(c["prompt"], special=True) for c in cases] == \
        [c["prompt_tokens"] for c in cases]


# With Q4/Q8 weights both engines quantize activations to 8 bits on the fly, and which side
# of a rounding step a value lands on depends on the last bits of the value; over 30 layers
# such flips compound. tools/greedy_vs_llamacpp.py measures it (teacher-forced over 512
# tokens of botchan; greedy prompts agreeing for 16 tokens): kiln vs llama.cpp on Q4_1 has
# a mean KL of 5e-3, top-1 96%, 5/10 prompts (7/10 on Q4_0, 8/10 on Q8_0) -- and llama.cpp
# vs itself with only flash_attn switched on is just as far apart: KL 5e-3, 5/10 (Q4_1),
# 6/10 (Q4_0, Q8_0); with the prompt evaluated token by token, KL 4-5e-3, 8/10 on Q4_0 and
# Q8_0. (kiln's own logits are identical batched or token by token, on any ISA.) So on the
# quantized file kiln is held to agree with llama.cpp's default at least as often as
# llama.cpp's flash-attention path does; on F16 (no activation quantization) everything
# agrees 10/10 at KL < 1e-5, and the F16 tests below hold kiln to 9/10.

@pytest.fixture(scope="module")
def greedy_tokens(smollm2):
    return kiln_greedy(smollm2, PROMPTS)


def assert_as_close_as_llamacpp_to_itself(kiln_tokens, default, flash_attn):
    baseline = count_equal([c["tokens"] for c in flash_attn], [c["tokens"] for c in default])
    assert_mostly_equal(kiln_tokens, default, min_equal=baseline)


def test_greedy_agrees_with_recorded_llamacpp_as_llamacpp_with_itself(greedy_tokens):
    assert_as_close_as_llamacpp_to_itself(greedy_tokens, load_cases(),
                                          load_cases(key="flash_attn_cases"))


def test_greedy_follows_recorded_llamacpp_for_8_tokens(greedy_tokens):
    # a broken engine, sampler, tokenizer or cache reuse would agree on no prompt at all
    assert_mostly_equal(greedy_tokens, load_cases(), min_equal=8, n_tokens=8)


@pytest.mark.oracle
def test_greedy_agrees_with_llamacpp_live_as_llamacpp_with_itself(smollm2_path, greedy_tokens):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run builds it)")
    assert_as_close_as_llamacpp_to_itself(
        greedy_tokens, llamacpp_greedy_in_child(smollm2_path, PROMPTS),
        llamacpp_greedy_in_child(smollm2_path, PROMPTS, flash_attn=True))


# -- F16: no activation quantization on either side, so the two engines' logits agree to a
# mean KL of ~1e-6 and greedy paths should not part at all.

@pytest.fixture(scope="module")
def f16_greedy_tokens(smollm2_variant):
    from engine import LLM
    with LLM(smollm2_variant("f16"), n_ctx=256, n_threads=2) as llm:
        return kiln_greedy(llm, PROMPTS)


def test_f16_greedy_matches_recorded_llamacpp(f16_greedy_tokens):
    assert_mostly_equal(f16_greedy_tokens, load_cases("f16"))


@pytest.mark.oracle
def test_f16_greedy_matches_llamacpp_live(smollm2_variant, f16_greedy_tokens):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run builds it)")
    assert_mostly_equal(f16_greedy_tokens,
                        llamacpp_greedy_in_child(smollm2_variant("f16"), PROMPTS))


def record(variants):
    """Write the fixtures of `variants` from llama.cpp (run in this process)."""
    import tempfile
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from conftest import make_smollm2_variant
    from engine.cli.pull import pull
    import llama_cpp
    FIXTURE.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            name = f"SmolLM2-135M-Instruct.{variant.upper()}.gguf"
            path = pull() if variant == "q4_1" else \
                make_smollm2_variant(pull(), variant, Path(tmp) / name)
            made = "" if variant == "q4_1" else ", made by conftest.make_smollm2_variant"
            data = {"source": f"llama-cpp-python {llama_cpp.__version__}, argmax of logits, "
                              f"n_ctx 256",
                    "model": name + made, "n_tokens": N_TOKENS,
                    "cases": llamacpp_greedy(path, PROMPTS),
                    "flash_attn_cases": llamacpp_greedy(path, PROMPTS, flash_attn=True)}
            FIXTURES[variant].write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
            for c in data["cases"]:
                print(variant, repr(c["prompt"]), "->", repr(c["text"]))


if __name__ == "__main__" and "--record" in sys.argv:
    record([a for a in sys.argv[1:] if a != "--record"] or sorted(FIXTURES))
