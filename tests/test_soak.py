"""The soak tool (tools/soak.py) on a CI-sized run: many cache-reusing calls of every
kind on one LLM, and its memory afterwards. The full run (200 calls, 20,000 tokens) is
`python tools/soak.py`; its figures are in the README."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_soak_keeps_the_resident_set_flat(smollm2_path):
    calls, tokens = 45, 30
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "soak.py"), str(smollm2_path),
                        "--calls", str(calls), "--tokens", str(tokens), "--threads", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    out = r.stdout.strip()
    m = re.search(r"(\d+) calls, (\d+) tokens generated, (\d+) evaluated .*: ([-+\d.]+) MB "
                  r"\(limit 5.0 MB\), of which anonymous ([-+\d.]+) MB and file-backed ([-+\d.]+) MB", out)
    assert m, (out, r.stderr[-2000:])
    assert int(m[1]) == calls and int(m[2]) == calls * tokens  # ignore_eos: every token made
    # the cache is reused: a streaming call after a blocking one evaluates only its
    # prompt's new topic (~6 tokens, not ~38); without reuse this would be ~3,540
    assert int(m[3]) < calls * (tokens + 45)
    # the resident set stays put: nothing allocated per call, no file page read again
    assert float(m[4]) < 5.0 and float(m[5]) < 5.0 and float(m[6]) < 5.0, out
    assert r.returncode == 0, out
