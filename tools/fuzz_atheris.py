#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris, libFuzzer's engine for Python) of the GGUF reader,
the model configuration and the tokenizer loaders.

    python tools/fuzz_atheris.py [CORPUS_DIR ...] [-runs=N] [-max_total_time=S] [libFuzzer flags]

Each input is written as a file and opened as a user's file would be: read_gguf, then
ModelConfig.from_metadata and load_tokenizer on its metadata, then the tokenizer round
trip on a few strings. Coverage of kiln's Python code (formats, engine.config,
engine.tokenizer) steers the mutations, which the byte mutator of tools/fuzz_gguf.py
does not have; that fuzzer goes through the whole load and generation instead. A kiln
error (FormatError, KilnError) is a refusal; any other exception is a finding, and
libFuzzer saves the input as crash-* in the working directory (replay: pass the file).
Without corpus directories, the seeds of tools/fuzz_gguf.py (tiny models of every
architecture and tokenizer kind) are written to build/atheris-corpus first.
$KILN_ATHERIS_TARGET=module:function fuzzes that function of a path instead (the test
plants a failing one to see it caught).
"""
import atexit
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["formats", "engine"]):
    import formats  # noqa: E402
    from engine.config import ModelConfig  # noqa: E402
    from engine.errors import KilnError  # noqa: E402
    from engine.tokenizer import load_tokenizer  # noqa: E402

SAMPLES = ["Hello world", " <|im_end|> x", "日本語 text\n\t", ""]
# one file, rewritten for each input: in memory, where /dev/shm exists
SCRATCH = tempfile.NamedTemporaryFile(prefix="kiln-atheris-", suffix=".gguf",
                                      dir="/dev/shm" if os.path.isdir("/dev/shm") else None,
                                      delete=False).name
atexit.register(lambda: os.path.exists(SCRATCH) and os.unlink(SCRATCH))  # libFuzzer exits by exit()


def open_as_a_user_would(path: str) -> None:
    try:
        with formats.read_gguf(path) as f:
            md = f.metadata
            ModelConfig.from_metadata(md, f.tensors.keys())
            tok = load_tokenizer(md)
            for text in SAMPLES:
                ids = tok.encode(text)
                tok.decode(ids)
    except (formats.FormatError, KilnError):
        pass


def target():
    name = os.environ.get("KILN_ATHERIS_TARGET")
    if not name:
        return open_as_a_user_would
    mod, _, fn = name.rpartition(":")
    return getattr(__import__(mod, fromlist=[fn]), fn)


def one_input(data: bytes, _target=[]) -> None:
    if not _target:
        _target.append(target())
    with open(SCRATCH, "wb") as fh:
        fh.write(data)
    _target[0](SCRATCH)


def seed_corpus() -> str:
    from gguf_fuzz import make_seeds
    d = ROOT / "build" / "atheris-corpus"
    if not d.is_dir() or not any(d.iterdir()):
        d.mkdir(parents=True, exist_ok=True)
        make_seeds(d)
    return str(d)


def main(argv=None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        argv.append(seed_corpus())
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
