"""The ISA variants this CPU can run, read from the operating system (/proc/cpuinfo), not
from the code under test: the per-ISA tests run over this list, and a test requires
ckernels.supported_isas() to equal it, so a broken cpuid check or a variant missing from
the build fails instead of quietly testing less."""
import os
import platform

# variant -> the /proc/cpuinfo flags it needs (x86 "flags", ARM "Features")
X86_NEEDS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avxvnni": {"avx2", "fma", "f16c", "avx_vnni"},
    "avx512vnni": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                   "avx512_vnni"},
    "amx": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
            "avx512_vnni", "amx_tile", "amx_int8"},
}
ARM_NEEDS = {"neon": {"asimdhp", "asimddp"}}


def cpu_flags() -> set:
    """The first CPU's feature flags from /proc/cpuinfo."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return set(value.split())
    return set()


def expected_isas() -> list:
    """The variants kiln must offer on this CPU, worst first (supported_isas()'s order)."""
    if os.environ.get("KILN_BUILD_SCALAR_ONLY"):
        return ["scalar"]
    machine = platform.machine().lower()
    needs = X86_NEEDS if machine in ("x86_64", "amd64") else \
        ARM_NEEDS if machine in ("aarch64", "arm64") else {}
    flags = cpu_flags()
    return ["scalar"] + [v for v, need in needs.items() if need <= flags]
