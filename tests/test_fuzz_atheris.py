"""The coverage-guided fuzzer (tools/fuzz_atheris.py) on a CI-sized run over the seed
models, and a planted failure that it must catch and save."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris (the coverage-guided fuzzer, extra dev) is not installed")

from gguf_fuzz import make_seeds  # noqa: E402

TOOL = Path(__file__).resolve().parent.parent / "tools" / "fuzz_atheris.py"


def run(tmp_path, *flags, env=None):
    corpus = tmp_path / "corpus"
    if not corpus.is_dir():
        corpus.mkdir()
        make_seeds(corpus)
    return subprocess.run([sys.executable, str(TOOL), str(corpus), "-rss_limit_mb=3072",
                           "-timeout=20", *flags], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_ci_sized_run_finds_nothing(tmp_path):
    r = run(tmp_path, "-runs=4000", "-seed=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done 4000 runs" in r.stderr
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))


PLANTED = '''
def planted(path):
    """A loader with a bug: a foreign exception on files whose version field is odd
    (the seeds' version, 3, is: the first input catches it)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) == 8 and head[:4] == b"GGUF" and head[4] % 2:
        raise KeyError("planted")
'''


def test_a_planted_failure_is_caught_and_saved(tmp_path):
    (tmp_path / "planted_loader.py").write_text(PLANTED)
    r = run(tmp_path, "-runs=20000", env={"KILN_ATHERIS_TARGET": "planted_loader:planted",
                                          "PYTHONPATH": str(tmp_path)})
    out = r.stdout + r.stderr  # atheris prints the Python traceback on stdout
    assert r.returncode != 0 and "KeyError: 'planted'" in out, out[-2000:]
    crashes = list(tmp_path.glob("crash-*"))
    assert len(crashes) == 1
    blob = crashes[0].read_bytes()
    assert blob[:4] == b"GGUF" and blob[4] % 2
