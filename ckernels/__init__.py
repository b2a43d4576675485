"""kiln's compute layer: C kernels compiled once per ISA, run-time dispatch, thread
pool, the C forward pass. Knows nothing of files or tokenizers."""
from . import _ext  # noqa: F401
