"""Running the outside oracles (llama-cpp-python, transformers) in tests.

An oracle that dies is a failure, never a skip: a file kiln writes that makes llama.cpp
abort or crash is exactly what the oracle tests exist to catch. Under KILN_REQUIRE_ORACLES=1
(set by .ci/run, which installs every oracle) any skipped test fails (tests/conftest.py)."""
import ctypes
import glob
import importlib.util
import os
import signal
import subprocess

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
