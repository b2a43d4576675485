"""kiln's compute layer: C kernels compiled once per ISA, run-time dispatch, thread
pool, the C forward pass. Knows nothing of files or tokenizers."""
import os as _os

from . import _ext  # noqa: F401
from ._ext import (MAX_THREADS, BlockType, Matrix, Pool, block_types,  # noqa: F401
                   matmul, matmul_multi, quantize_act_q8_0, quantize_act_q8_1, quantize_act_q8_K, set_isa,
                   stream_read, weight_types)

ISA_NAMES = tuple(_ext.known_isas())  # every variant, any architecture


def supported_isas() -> list[str]:
    """ISA variants this CPU (and this build) can run, best last."""
    return _ext.supported_isas()


def active_isa() -> str:
    """The variant the kernels use: the best supported one, or the one KILN_ISA forces."""
    return _ext.active_isa()


def _check_forced_isa() -> None:
    # Checked here so a bad KILN_ISA raises a clear Python error; the C dispatcher
    # would otherwise abort the process on first use.
    forced = _os.environ.get("KILN_ISA", "")
    if forced and forced not in supported_isas():
        raise RuntimeError(
            f"KILN_ISA={forced!r} is not available on this machine "
            f"(known variants: {', '.join(ISA_NAMES)}; this CPU and build support: "
            f"{', '.join(supported_isas())}); unset KILN_ISA or pick a supported one")


_check_forced_isa()
