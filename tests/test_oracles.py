"""An oracle process that dies by a signal fails the test that ran it, naming the signal;
one that exits non-zero fails it too (tests/oracles.py)."""
import sys

import pytest

from oracles import run_oracle


def test_a_crashed_oracle_fails_with_its_signal():
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    with pytest.raises(pytest.fail.Exception, match="died of SIGSEGV"):
        run_oracle([sys.executable, "-c", crash], timeout=60)


def test_a_failing_oracle_fails():
    with pytest.raises(AssertionError):
        run_oracle([sys.executable, "-c", "import sys; sys.exit(3)"], timeout=60)
    assert run_oracle([sys.executable, "-c", "print('ok')"], timeout=60).stdout == "ok\n"
