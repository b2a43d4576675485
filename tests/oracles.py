"""Running the outside oracles (llama-cpp-python, transformers) in tests.

An oracle that dies is a failure, never a skip: a file kiln writes that makes llama.cpp
abort or crash is exactly what the oracle tests exist to catch. Under KILN_REQUIRE_ORACLES=1
(set by .ci/run, which installs every oracle) any skipped test fails (tests/conftest.py)."""
import signal
import subprocess

import pytest


def run_oracle(argv, timeout: float) -> subprocess.CompletedProcess:
    """Run an oracle subprocess; it must exit 0. A death by signal fails the test with the
    signal's name (SIGILL usually means a llama.cpp build for instructions this CPU lacks:
    .ci/run builds it for the CPU at hand)."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        pytest.fail(f"the oracle process died of {name}: {proc.stderr[-1500:]}", pytrace=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc
