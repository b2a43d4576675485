"""`kiln generate` and model-loading errors through the real engine."""
import os
import subprocess
import sys

import pytest

import formats
from engine import LLM
from engine.cli import kiln as cli


def kiln(*args, input=None):
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          input=input, timeout=300, env=dict(os.environ))


def test_generate_streams_the_same_text_as_the_api(smollm2_path):
    prompt = "The capital of France is"
    r = kiln("generate", smollm2_path, "-p", prompt, "-n", "12", "--temp", "0", "--timings")
    assert r.returncode == 0, r.stderr
    with LLM(smollm2_path) as llm:
        expected = llm.generate(prompt, max_tokens=12, temperature=0).text
    assert r.stdout == expected + "\n"
    assert "[prompt: " in r.stderr and "reply: 12 tok" in r.stderr
    r = kiln("generate", smollm2_path, "-p", "-", "-n", "12", "--temp", "0", input=prompt)
    assert r.stdout == expected + "\n"


def test_prompt_too_long_is_one_line(smollm2_path):
    r = kiln("generate", smollm2_path, "-p", "word " * 200, "--ctx", "64")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("kiln: error: ") and r.stderr.count("\n") == 1
    assert "context" in r.stderr and "Traceback" not in r.stderr


def test_not_a_gguf_and_unsupported_architecture(smollm2_path, tmp_path, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 64)
    assert cli.main(["generate", str(junk), "-p", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kiln: error: ") and err.count("\n") == 1 and "internal" not in err

    with formats.read_gguf(smollm2_path) as f:
        md = {k: v for k, v in f.metadata.items() if not k.startswith("llama.")}
        md["general.architecture"] = "mamba"
        for k, v in f.metadata.items():
            if k.startswith("llama."):
                md["mamba." + k[len("llama."):]] = v
        path = tmp_path / "mamba.gguf"
        formats.write_gguf(path, md, [(t.name, t.type, t.shape, t.data) for t in f.tensors.values()])
    assert cli.main(["chat", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kiln: error: ") and "mamba" in err and err.count("\n") == 1
    assert "internal" not in err
