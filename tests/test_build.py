"""The C extension builds with every ISA variant of this architecture linked in, and run-time
detection offers exactly the variants this CPU can run (as the operating system reports
them in /proc/cpuinfo)."""
import os
import subprocess
import sys

import pytest

import ckernels
from cpu_isas import expected_isas


def test_extension_imports():
    assert ckernels._ext is not None


def test_detection_offers_every_variant_the_cpu_runs():
    assert ckernels.supported_isas() == expected_isas()
    assert ckernels.active_isa() == expected_isas()[-1]  # the best one by default


@pytest.mark.parametrize("isa", expected_isas())
def test_kiln_isa_forces_a_variant(isa):
    code = "import ckernels; print(ckernels.active_isa())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "KILN_ISA": isa})
    assert r.returncode == 0 and r.stdout.strip() == isa, r.stderr


def test_kiln_isa_refuses_a_variant_the_cpu_lacks():
    missing = [v for v in ckernels.ISA_NAMES if v not in expected_isas()]  # x86 lacks neon, ARM avx2
    r = subprocess.run([sys.executable, "-c", "import ckernels"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "KILN_ISA": missing[0]})
    assert r.returncode != 0 and f"KILN_ISA={missing[0]!r}" in r.stderr


def test_isa_names_are_the_variants_setup_py_builds_from():
    import os
    import re
    header = os.path.join(os.path.dirname(ckernels.__file__), "src", "isa_variants.h")
    with open(header) as f:
        names = re.findall(r"^KILN_VARIANT\(\w+, (\w+), \"[^\"]*\"\)$", f.read(), re.M)
    assert ckernels.ISA_NAMES == tuple(dict.fromkeys(names))
    assert set(ckernels.supported_isas()) <= set(ckernels.ISA_NAMES)
