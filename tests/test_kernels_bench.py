"""tools/bench_kernels.py runs and reports kernel and streaming-read GB/s side by side."""
import os
import subprocess
import sys

import numpy as np

import ckernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_kernels_reports_every_variant():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_kernels.py"), "--size", "256",
                        "--threads", "1", "2", "--seconds", "0.01", "--prompt", "5"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[2:]]
    assert len(rows) == 2 * 2 * len(ckernels.supported_isas())
    for name, isa, threads, kernel, read, ratio, batch in rows:
        assert name in ("q4_0", "q8_0") and isa in ckernels.supported_isas()
        assert min(float(kernel), float(read), float(batch)) >= 0  # timings: noisy here
        assert float(ratio) >= 0


def test_stream_read_checksums_the_bytes():
    pool = ckernels.Pool(2)
    buf = np.arange(1 << 16, dtype=np.uint32).view(np.uint8)
    want = int(buf.view(np.uint64).sum(dtype=np.uint64))  # the sum of 64-bit words, mod 2**64
    assert ckernels.stream_read(pool, buf) == want
    m = ckernels.Matrix(0, 4, 32, np.ones(128, np.float32))
    assert ckernels.stream_read(pool, m) == int(np.ones(128, np.float32).view(np.uint64).sum(dtype=np.uint64))
