"""Every file kiln writes appears whole or not at all, and the converter never writes
over its inputs.

Each writer is made to fail at its last step (the flush to disk): the file it was
replacing must be byte for byte what it was, and no temporary may be left beside it."""
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import formats
from formats.atomic import atomic_path, atomic_write, remove_stale_temps

ROOT = Path(__file__).resolve().parent.parent


def digest(p) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def listing(d) -> list[str]:
    return sorted(os.listdir(d))


@pytest.fixture
def failing_fsync(monkeypatch):
    """os.fsync raising EIO: the disk failed just before the rename."""
    def arm():
        def boom(fd):
            raise OSError(5, "Input/output error (planted)")
        monkeypatch.setattr(os, "fsync", boom)
    return arm


# --- the helpers ------------------------------------------------------------------------

def test_atomic_write_replaces_only_on_success(tmp_path, failing_fsync):
    target = tmp_path / "f.txt"
    with atomic_write(target, "w", encoding="utf-8") as f:
        f.write("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w", encoding="utf-8") as f:
            f.write("second, half")
            raise RuntimeError("the producer failed")
    assert target.read_text() == "first" and listing(tmp_path) == ["f.txt"]
    failing_fsync()
    with pytest.raises(OSError, match="planted"):
        with atomic_write(target, "w", encoding="utf-8") as f:
            f.write("third")
    assert target.read_text() == "first" and listing(tmp_path) == ["f.txt"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(target, "a"):
            pass


def test_atomic_path_and_stale_temporaries(tmp_path):
    target = tmp_path / "history"
    with atomic_path(target) as tmp:
        Path(tmp).write_text("one\n")  # a writer that opens the file itself
    assert target.read_text() == "one\n"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            Path(tmp).write_text("two\n")
            raise KeyboardInterrupt
    assert target.read_text() == "one\n" and listing(tmp_path) == ["history"]
    # a dead writer's leftover goes at the next write; a live one's (ours) stays
    dead = tmp_path / "history.tmp-999999999-abcd"
    dead.write_text("x")
    live = tmp_path / f"history.tmp-{os.getpid()}-abcd"
    live.write_text("y")
    remove_stale_temps(target)
    assert not dead.exists() and live.exists()


# --- every writer -----------------------------------------------------------------------

def _gguf(path, value):
    formats.write_gguf(path, {"general.architecture": "llama", "x.value": value},
                       [("t", formats.GGMLType.F32, (4,), np.full(4, value, np.float32))])


def _safetensors(path, value):
    from formats.safetensors import write_safetensors
    write_safetensors(path, [("t", "F32", (4,), lambda: np.full(4, value, np.float32))])


def _imatrix(path, value):
    from formats.imatrix import Imatrix, write_imatrix
    im = Imatrix({"blk.0.ffn_up.weight": np.full(8, value, np.float32)},
                 {"blk.0.ffn_up.weight": np.array([1.0], np.float32)}, ["text"], 1, 4)
    write_imatrix(path, im)


def _hf_json(path, value):
    from engine.convert.export_hf import _write_json
    _write_json(Path(path), {"value": value})


def _conversation(path, value):
    from engine.chat import ChatSession

    class Stub:  # what save() touches of an LLM: nothing; the session needs an object
        pass
    s = ChatSession.__new__(ChatSession)
    s.messages, s.settings = [{"role": "user", "content": f"message {value}"}], {"temperature": value}
    try:
        s.save(path)
    except Exception as e:  # the session turns OSError into its own error
        from engine.errors import KilnError
        assert isinstance(e, KilnError) and "cannot save the conversation" in str(e)
        raise OSError(str(e)) from None


WRITERS = {"gguf": _gguf, "safetensors": _safetensors, "imatrix": _imatrix,
           "hf_json": _hf_json, "conversation": _conversation}


@pytest.mark.parametrize("kind", WRITERS)
def test_a_failed_write_leaves_the_old_file(kind, tmp_path, failing_fsync):
    write = WRITERS[kind]
    target = tmp_path / f"out.{kind}"
    write(target, 1.0)
    before = digest(target)
    write(target, 2.0)  # a second write replaces the file
    assert digest(target) != before
    second = digest(target)
    failing_fsync()
    with pytest.raises(OSError):
        write(target, 3.0)
    assert digest(target) == second, "a failed write changed the file"
    assert listing(tmp_path) == [target.name], "a failed write left a temporary behind"


def test_no_write_outside_the_atomic_helpers():
    """A scan of the package's sources: files are only written through formats.atomic
    (atomic_write, atomic_path, or create_temp's descriptor + commit). The one other open-for-writing is
    the model download, which writes inside a private temporary directory and renames the
    verified file into place."""
    allowed = {("engine/cli/kiln.py", "os.devnull"), ("engine/cli/pull.py", "open(part, \"wb\")")}
    writing = re.compile(r"""(?<!fd)open\([^)]*["'](?:w|wb|a|ab|x|xb|w\+|r\+|r\+b|wb\+)["']|\.write_text\(|"""
                         r"""\.write_bytes\(|os\.open\([^)]*O_(?:WRONLY|RDWR)|tempfile\.mkstemp""")
    found = []
    for sub in ("engine", "formats"):
        for f in sorted((ROOT / sub).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            if rel == "formats/atomic.py":
                continue
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if writing.search(line) and not any(rel == a and s in line for a, s in allowed):
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "files written outside formats.atomic:\n" + "\n".join(found)


# --- the converter never writes over its inputs --------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    import tiny_models
    d = tmp_path_factory.mktemp("atomic")
    return Path(tiny_models.make_tiny_llama(d / "tiny.gguf"))


@pytest.fixture(scope="module")
def tiny_hf_dir(tiny_gguf):
    from engine.convert.export_hf import export
    return export(tiny_gguf, tiny_gguf.parent / "hf", dtype="f32")


def _snapshot(paths):
    return {str(p): digest(p) for p in paths}


def run_cli(argv):
    from engine.cli import convert as convert_cli
    return convert_cli.main([str(a) for a in argv])


@pytest.mark.parametrize("case", ["gguf_itself", "gguf_symlink", "gguf_hardlink", "hf_config",
                                  "hf_tokenizer", "hf_weights"])
def test_convert_refuses_to_write_over_its_source(case, tiny_gguf, tiny_hf_dir, tmp_path, capsys):
    if case.startswith("gguf"):
        src = tmp_path / "src.gguf"
        src.write_bytes(tiny_gguf.read_bytes())
        out = src
        if case == "gguf_symlink":
            out = tmp_path / "link.gguf"
            out.symlink_to(src)
        elif case == "gguf_hardlink":
            out = tmp_path / "hard.gguf"
            os.link(src, out)
        watched = [src]
    else:
        src = tmp_path / "hf"
        src.mkdir()
        for f in tiny_hf_dir.iterdir():
            (src / f.name).write_bytes(f.read_bytes())
        name = {"hf_config": "config.json", "hf_tokenizer": "tokenizer.json",
                "hf_weights": "model.safetensors"}[case]
        out = src / name
        watched = list(src.iterdir())
    before, names = _snapshot(watched), listing(src if src.is_dir() else tmp_path)
    capsys.readouterr()
    assert run_cli([src, "-o", out, "--type", "q8_0", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"output {out} is a file of the source" in err and "never writes over its inputs" in err
    assert _snapshot(watched) == before
    assert listing(src if src.is_dir() else tmp_path) == names


def test_convert_into_the_hf_directory_is_allowed_and_repeatable(tiny_hf_dir, tmp_path):
    """A GGUF written into the checkpoint's own directory is an output, not an input: a
    second run replaces it."""
    src = tmp_path / "hf"
    src.mkdir()
    for f in tiny_hf_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    inputs = _snapshot(list(src.iterdir()))
    for _ in range(2):
        assert run_cli([src, "-o", src / "model.gguf", "--type", "q8_0", "--quiet"]) == 0
    assert _snapshot([Path(p) for p in inputs]) == inputs


@pytest.mark.parametrize("flag", ["--imatrix", "--calibration"])
def test_convert_refuses_to_write_over_its_calibration_input(flag, tiny_gguf, tmp_path, capsys):
    side = tmp_path / ("imatrix.gguf" if flag == "--imatrix" else "text.txt")
    side.write_bytes(b"calibration input that must survive\n")
    before = digest(side)
    capsys.readouterr()
    assert run_cli([tiny_gguf, "-o", side, "--type", "q4_0", flag, side, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"is the {flag} file" in err
    assert digest(side) == before


@pytest.mark.parametrize("which", ["model", "text"])
def test_imatrix_refuses_to_write_over_its_inputs(which, tiny_gguf, tmp_path):
    import subprocess
    import sys
    model = tmp_path / "m.gguf"
    model.write_bytes(tiny_gguf.read_bytes())
    text = tmp_path / "t.txt"
    text.write_text("a calibration text " * 50, encoding="utf-8")
    out = model if which == "model" else text
    before = _snapshot([model, text])
    r = subprocess.run([sys.executable, "-m", "engine", "imatrix", str(model), "-f", str(text),
                        "-o", str(out), "--ctx", "16", "--quiet"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode != 0
    assert f"output {out} is an input" in r.stderr and "Traceback" not in r.stderr
    assert _snapshot([model, text]) == before
