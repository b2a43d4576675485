"""Running the outside oracles (llama-cpp-python, transformers) in tests.

An oracle that dies is a failure, never a skip: a file kiln writes that makes llama.cpp
abort or crash is exactly what the oracle tests exist to catch. Under KILN_REQUIRE_ORACLES=1
(set by .ci/run, which installs every oracle) any skipped test fails (tests/conftest.py)."""
import ctypes
import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest


def run_oracle(argv, timeout: float) -> subprocess.CompletedProcess:
    """Run an oracle subprocess; it must exit 0. A death by signal fails the test with the
    signal's name (SIGILL usually means a llama.cpp build for instructions this CPU lacks:
    .ci/run builds it for the CPU at hand)."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        pytest.fail(f"the oracle process died of {name}: {proc.stderr[-1500:]}", pytrace=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


# One llama.cpp process for a tiny model's runs: teacher-forced logits of each file (default
# and flash-attention paths; n_ctx = the tokens, which llama.cpp rounds up to 256), and the
# tokenization of texts with the vocabulary of one file, without and with special tokens.
LLAMA_RUNS_CHILD = """
import json, sys
import numpy as np
from llama_cpp import Llama
jobs = json.load(open(sys.argv[1], encoding="utf-8"))
for path, flash, n, out in jobs["logits"]:
    ids = np.load(jobs["ids"])[:n].tolist()
    llm = Llama(path, n_ctx=n, n_batch=n, n_threads=2, logits_all=True,
                flash_attn=flash, verbose=False)
    llm.eval(ids)
    np.save(out, np.asarray(llm.scores[:len(ids)], dtype=np.float32))
    llm.close()
llm = Llama(jobs["vocab"], vocab_only=True, verbose=False)
json.dump([[llm.tokenize(t.encode("utf-8"), add_bos=False, special=s) for s in (False, True)]
           for t in jobs["texts"]], open(jobs["tokens"], "w"))
"""


def llama_cpp_runs(files: dict, ids, runs, texts, vocab: str, d) -> dict:
    """{(type, flash, n): llama.cpp's logits of files[type] over ids[:n]} for each run
    (type, flash, n), and {"tokens": the ids of texts without and with special-token
    parsing, by vocab's file}; d is a scratch directory (a pathlib.Path)."""
    import numpy as np
    np.save(d / "ids.npy", np.asarray(ids))
    jobs = {"ids": str(d / "ids.npy"), "vocab": str(vocab), "texts": list(texts),
            "tokens": str(d / "tokens.json"),
            "logits": [(str(files[t]), flash, n, str(d / f"{t}-{int(flash)}-{n}.npy"))
                       for t, flash, n in runs]}
    (d / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    run_oracle([sys.executable, "-c", LLAMA_RUNS_CHILD, str(d / "jobs.json")], timeout=600)
    out = {(t, flash, n): np.load(d / f"{t}-{int(flash)}-{n}.npy") for t, flash, n in runs}
    out["tokens"] = json.loads((d / "tokens.json").read_text())
    return out


def ggml_base_library() -> ctypes.CDLL:
    """ggml's C library (its reference codecs among its exports) from the libggml-base that
    llama-cpp-python ships; skips the test when the package is absent."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        pytest.skip("llama-cpp-python (ships ggml's reference codecs) is not installed")
    libs = glob.glob(os.path.join(os.path.dirname(spec.origin), "lib", "libggml-base.so*"))
    if not libs:
        pytest.skip("libggml-base not found in the llama_cpp package")
    return ctypes.CDLL(sorted(libs)[0])


def ggml_quantizer() -> ctypes.CDLL:
    """ggml_base_library() with ggml_quantize_chunk's signature declared: (type, src, dst,
    start_row, nrows, n_per_row, imatrix or None) -> bytes written."""
    lib = ggml_base_library()
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    return lib
