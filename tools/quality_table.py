"""The README's calibrated-quantization table: files made from one float GGUF by `kiln
convert` (plain, --imatrix rounding, --method gptq, --type auto), each scored against the
float file by `kiln perplexity --kl-base` on held-out text.

    python tools/quality_table.py F16.gguf CALIBRATION.txt HELD_OUT.txt [--dir DIR]
        [--chunks 20] [--eval-chunks 8] [--only q4_0-gptq ...]

kiln's --imatrix rounding is bit-identical to llama.cpp's quantizer given the same
importance matrix (tests/test_imatrix.py), so its rows are also llama.cpp's imatrix files.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

KILN = [sys.executable, "-m", "engine"]

# name -> kiln convert arguments after SRC -o OUT (CAL: the calibration flags)
VARIANTS = {
    "f16": ["--type", "f16"],
    "q8_0": ["--type", "q8_0"],
    "q4_0": ["--type", "q4_0"],
    "q4_0-imatrix": ["--type", "q4_0", "CAL"],
    "q4_0-gptq": ["--type", "q4_0", "CAL", "--method", "gptq"],
    "q4_k_m": ["--type", "q4_k_m"],
    "q4_k_m-imatrix": ["--type", "q4_k_m", "CAL"],
    "q4_k_m-gptq": ["--type", "q4_k_m", "CAL", "--method", "gptq"],
    "auto-4.5-gptq": ["--type", "auto", "--target-bpw", "4.5", "CAL", "--method", "gptq"],
    "auto-q4_k_m-gptq": ["--type", "auto", "--target-bpw", "BPW(q4_k_m)", "CAL",
                         "--method", "gptq"],
}


def bpw_of(path) -> float:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numpy as np

    import formats
    with formats.read_gguf(path) as f:
        n = sum(int(np.prod(t.shape)) for t in f.tensors.values())
        nbytes = sum(int(np.asarray(t.data).nbytes) for t in f.tensors.values())
    return 8.0 * nbytes / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("f16")
    ap.add_argument("calibration")
    ap.add_argument("held_out")
    ap.add_argument("--dir", default=".", help="where the files go")
    ap.add_argument("--chunks", type=int, default=20, help="calibration chunks of 512")
    ap.add_argument("--eval-chunks", type=int, default=8, help="held-out chunks of 512")
    ap.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)
    cal = ["--calibration", args.calibration, "--calibration-chunks", str(args.chunks)]
    rows = []
    for name in args.only:
        out = os.path.join(args.dir, f"{name}.gguf")
        conv = []
        for a in VARIANTS[name]:
            if a == "CAL":
                conv += cal
            elif a.startswith("BPW("):
                conv.append(f"{bpw_of(os.path.join(args.dir, a[4:-1] + '.gguf')):.4f}")
            else:
                conv.append(a)
        t0 = time.perf_counter()
        subprocess.run([*KILN, "convert", args.f16, "-o", out, "--quiet", *conv], check=True,
                       stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        r = subprocess.run([*KILN, "perplexity", out, "-f", args.held_out, "--ctx", "512",
                            "--chunks", str(args.eval_chunks), "--kl-base", args.f16, "--json"],
                           check=True, capture_output=True, text=True)
        d = json.loads(r.stdout)
        rows.append((name, os.path.getsize(out) / 2**20, bpw_of(out), d, seconds))
        print(f"{name}: {json.dumps({k: d[k] for k in ('mean_kl', 'kl_p99', 'top1_agreement', 'ppl')})}"
              f" in {seconds:.0f} s", file=sys.stderr, flush=True)
    print("| file | size MiB | bits per weight | mean KL | p99 KL | top-1 | perplexity | convert s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, mib, bpw, d, seconds in rows:
        print(f"| {name} | {mib:.1f} | {bpw:.3f} | {d['mean_kl']:.4f} | {d['kl_p99']:.3f} | "
              f"{100 * d['top1_agreement']:.1f}% | {d['ppl']:.2f} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
