"""Atomic file writes: every file kiln writes appears whole or not at all.

The data goes to a temporary file beside the target (same directory, so same file
system), is flushed to disk, and is renamed over the target in one step: a reader sees
the old file or the new one, never a half-written one, and an error or a kill mid-write
leaves the target as it was. The temporary's name carries the writer's pid, so a later
write can tell a dead writer's leftovers from a live concurrent one and remove them.
"""
from __future__ import annotations

import contextlib
import glob
import os
import secrets
from typing import IO, Iterator

TEMP_MARK = ".tmp-"


def temp_path(path) -> str:
    """A fresh temporary name beside `path`: PATH.tmp-PID-RANDOM."""
    path = os.fspath(path)
    return f"{path}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def create_temp(path) -> tuple[int, str]:
    """Create a new temporary file beside `path`; returns (fd, its path). Mode 0o666
    before the umask (not mkstemp's 0o600), so the final file gets the usual mode."""
    tmp = temp_path(path)
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp


def commit(tmp: str, path) -> None:
    """Rename the finished (flushed and closed) temporary over `path`, make the rename
    durable, and remove temporaries that dead writers left beside `path`."""
    path = os.fspath(path)
    os.replace(tmp, path)
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    remove_stale_temps(path)


def discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _fsync_path(p: str) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yield a temporary path for a writer that opens files itself (readline's history,
    say); when the block ends without an error, the file written there replaces
    `path`; on an error it is removed and `path` is untouched."""
    tmp = temp_path(path)
    try:
        yield tmp
        _fsync_path(tmp)
        commit(tmp, path)
    except BaseException:
        discard(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """open(path, mode) that replaces `path` only once the block ends without an error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a new file: mode 'w' or 'wb', not {mode!r}")
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path) -> None:
    """Delete temporaries of earlier writes to `path` whose writer process is gone."""
    path = os.fspath(path)
    for tmp in glob.glob(glob.escape(path) + TEMP_MARK + "*"):
        pid = tmp[len(path) + len(TEMP_MARK):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            discard(tmp)
