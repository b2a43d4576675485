"""kiln against llama.cpp on quantized SmolLM2 files, bounded by llama.cpp's own envelope.

With 8-bit activation quantization, a last-bit difference anywhere flips roundings that
compound over 30 layers, so two correct engines do not agree exactly. How far apart two
correct computations land is measured in the same run: llama.cpp's flash-attention path
against its default path on the same file and tokens. kiln is held to that distance: its
mean KL from llama.cpp's default and its top-1 agreement with it must be within a small
factor of llama.cpp-vs-itself."""
import math
import os
import sys

import numpy as np
import pytest

from engine import LLM
from engine.perplexity import log_softmax
from oracles import run_oracle

N_TOKENS = 512
KL_FACTOR = 1.5       # kiln's KL may be at most this multiple of llama.cpp's self-distance


def top1_floor(env_top1: float, n: int) -> float:
    """The lowest top-1 agreement kiln may have when llama.cpp agrees with itself at
    env_top1 over n positions: below it by at most 2 points or three standard errors of
    the difference of two agreement rates over n positions, whichever is more. Top-1
    counts the near-ties that flip, so on 511 positions it moves by a couple of points
    between llama.cpp builds for different CPUs while the mean KL barely moves (on an
    AVX512 build, Q3_K_M: kiln 93.3% at KL 8.5e-3, llama.cpp flash 96.1% at KL 8.3e-3;
    on the AVX2 build kiln led it, 95.7% against 94.9%)."""
    p = min(max(env_top1, 0.0), 1.0)
    return env_top1 - max(0.02, 3.0 * math.sqrt(2.0 * p * (1.0 - p) / n))

LLAMA_CHILD = """
import sys, numpy as np
from llama_cpp import Llama
path, ids_path, out_path, flash = sys.argv[1:5]
ids = np.load(ids_path).tolist()
llm = Llama(path, n_ctx=len(ids) + 8, n_batch=len(ids), n_threads=2, logits_all=True,
            flash_attn=flash == "1", verbose=False)
llm.eval(ids)
np.save(out_path, np.asarray(llm.scores[:len(ids)], dtype=np.float32))
"""


def llama_cpp_logits(path, ids, tmp_path, flash: bool):
    ids_path, out = tmp_path / "ids.npy", tmp_path / f"scores-{int(flash)}.npy"
    np.save(ids_path, np.asarray(ids))
    run_oracle([sys.executable, "-c", LLAMA_CHILD, path, str(ids_path), str(out),
                "1" if flash else "0"], timeout=600)
    return np.load(out)


def distance(base, other):
    """(mean KL(base || other), top-1 agreement) over next-token distributions."""
    lp, lq = log_softmax(base[:-1]), log_softmax(other[:-1])
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return float(kl.mean()), float((base[:-1].argmax(-1) == other[:-1].argmax(-1)).mean())


def check_envelope(name, path, botchan, tmp_path):
    with LLM(path, n_ctx=N_TOKENS + 8) as llm:
        ids = llm.tokenize(botchan.read_text(encoding="utf-8"), add_bos=True)[:N_TOKENS]
        ours = llm.logits(ids)
    default = llama_cpp_logits(path, ids, tmp_path, flash=False)
    flash = llama_cpp_logits(path, ids, tmp_path, flash=True)
    env_kl, env_top1 = distance(default, flash)
    kl, top1 = distance(default, ours)
    print(f"{name}: kiln KL {kl:.2e} top-1 {top1:.3f}; llama.cpp flash-attn vs default "
          f"KL {env_kl:.2e} top-1 {env_top1:.3f}")
    assert env_kl > 0  # the envelope is a real distance, not a copy of the same numbers
    assert kl <= KL_FACTOR * env_kl, (kl, env_kl)
    assert top1 >= top1_floor(env_top1, len(ids) - 1), (top1, env_top1)


@pytest.mark.oracle
@pytest.mark.parametrize("variant", ["q4_1", "q4_0", "q8_0"])
def test_kiln_is_as_close_to_llama_cpp_as_llama_cpp_is_to_itself(variant, smollm2_variant,
                                                                 botchan, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the outside oracle")
    check_envelope(variant, smollm2_variant(variant), botchan, tmp_path)


# The mixes llama.cpp's quantizer makes from the F16 file: K types where a row is a
# multiple of 256 wide (ffn_down here), their 32-wide fallbacks elsewhere.
LLAMA_CPP_MIXES = ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_XS",
                   "Q5_0", "Q5_1"]


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", LLAMA_CPP_MIXES)
def test_kiln_runs_llama_cpp_mixes_within_its_envelope(ftype, llamacpp_quantized, botchan,
                                                       tmp_path):
    check_envelope(ftype, llamacpp_quantized(ftype), botchan, tmp_path)
