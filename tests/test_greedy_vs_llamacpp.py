"""tools/greedy_vs_llamacpp.py runs end to end and prints one table row per comparison."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import make_tiny_llama

TOOL = Path(__file__).resolve().parent.parent / "tools" / "greedy_vs_llamacpp.py"


@pytest.mark.oracle
def test_tool_prints_the_table_on_a_tiny_model(tmp_path):
    path = make_tiny_llama(tmp_path / "tiny.gguf", ftype="f16")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    proc = subprocess.run([sys.executable, str(TOOL), path, "--text", str(text), "-n", "48"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| tiny")]
    assert [r[1:3] for r in rows] == [
        ["kiln", "llama.cpp"], ["llama.cpp prompt token by token", "llama.cpp"],
        ["llama.cpp 1 thread", "llama.cpp"], ["llama.cpp flash_attn", "llama.cpp"],
        ["kiln prompt token by token", "kiln"], ["kiln 1 thread", "kiln"]]
    if importlib.util.find_spec("llama_cpp"):
        assert not [r for r in rows if "failed" in r[3]], proc.stdout
    # kiln's results do not depend on the thread count, so this row is exact
    # whether or not llama.cpp is installed
    assert rows[-1][3:] == ["10/10", "10/10", "100.0%", "0.00e+00 |"]
