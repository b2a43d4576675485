"""Resident memory after loading stays about one copy of the weights.

The kernels repack Q4/Q8 matrices at load time; the file pages they read while doing so
must not stay resident next to the repacked copy (two copies of the weights)."""
import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import sys
    def rss_bytes():
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) * 1024
    import numpy, formats, ckernels._ext, engine.model
    base = rss_bytes()
    m = engine.model.Model(sys.argv[1], n_ctx=256, n_threads=1)
    m.eval([1, 2, 3], 0)
    print(rss_bytes() - base)
""")


def test_resident_memory_is_about_one_copy_of_the_weights(smollm2_path):
    out = subprocess.run([sys.executable, "-c", PROBE, smollm2_path], check=True,
                         capture_output=True, text=True).stdout
    grown = int(out.split()[-1])
    size = os.path.getsize(smollm2_path)
    # One copy of SmolLM2's weights is the file (94 MiB) plus the repacked tied output
    # matrix (its Q8_0 embedding, 30 MiB, is both looked up and multiplied); two copies
    # would be over 190 MiB.
    assert grown < 1.45 * size, f"model load grew RSS by {grown / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"
