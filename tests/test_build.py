"""The C extension builds with every ISA variant of this architecture linked in."""
import ckernels


def test_extension_imports():
    assert ckernels._ext is not None
