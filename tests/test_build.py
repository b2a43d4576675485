"""The C extension builds with every ISA variant of this architecture linked in."""
import ckernels


def test_extension_imports():
    assert ckernels._ext is not None


def test_isa_names_are_the_variants_setup_py_builds_from():
    import os
    import re
    header = os.path.join(os.path.dirname(ckernels.__file__), "src", "isa_variants.h")
    with open(header) as f:
        names = re.findall(r"^KILN_VARIANT\(\w+, (\w+), \"[^\"]*\"\)$", f.read(), re.M)
    assert ckernels.ISA_NAMES == tuple(dict.fromkeys(names))
    assert set(ckernels.supported_isas()) <= set(ckernels.ISA_NAMES)
