"""Benchmark the formats layer: NumPy Q4_0/Q8_0 quantization of 135M float32 parameters
(SmolLM2-135M's size) on one core, and opening the SmolLM2 GGUF (mmap, no copy).

    python tools/bench_formats.py [--model PATH] [--params N] [--repeat R] [--json]

Targets: quantize to Q4_0 in < 3 s, open in < 50 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import time

# one core: NumPy's element-wise kernels are single-threaded anyway; pin BLAS pools too
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402

import formats  # noqa: E402
from formats import GGMLType  # noqa: E402


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _bench_codecs(n_el: int, repeat: int) -> dict:
    results = {}
    x = np.random.default_rng(0).standard_normal((n_el // 576, 576), dtype=np.float32)
    for t in (GGMLType.Q4_0, GGMLType.Q8_0):
        s = _best(lambda: formats.quantize(x, t), repeat)
        results[f"quantize_{t.name.lower()}_s"] = round(s, 3)
    q = formats.quantize(x, GGMLType.Q4_0)
    s = _best(lambda: formats.dequantize(q, GGMLType.Q4_0, x.shape), repeat)
    results["dequantize_q4_0_s"] = round(s, 3)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(os.environ.get("KILN_HOME", os.path.expanduser("~/.cache/kiln")),
                                                    "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--params", type=int, default=135_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    n_el = args.params // 576 * 576  # whole rows of SmolLM2's width
    results = _bench_codecs(n_el, args.repeat)

    if os.path.exists(args.model):
        def open_close():
            formats.read_gguf(args.model).close()
        open_close()  # page cache warm, as for every open after the first
        results["open_smollm2_ms"] = round(_best(open_close, max(args.repeat, 5)) * 1000, 2)

        def open_tokens():
            with formats.read_gguf(args.model) as f:
                f.metadata["tokenizer.ggml.tokens"]
                f.metadata["tokenizer.ggml.merges"]
        results["open_and_decode_vocab_ms"] = round(_best(open_tokens, max(args.repeat, 5)) * 1000, 2)
    results["params"] = n_el

    if args.json:
        print(json.dumps(results))
    else:
        for k, v in results.items():
            print(f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
