"""formats.safetensors: the memory-mapped reader and the streaming writer."""
import json
import struct

import numpy as np
import pytest

import formats
from formats.safetensors import SafetensorsFile, bf16_to_f32, f32_to_bf16, write_safetensors


def _entries(tensors):
    return [(n, dt, a.shape, (lambda a=a: a)) for n, dt, a in tensors]


def test_round_trip_all_float_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 7)).astype(np.float32)
    b = rng.standard_normal((3, 4, 2)).astype(np.float16)
    c = rng.standard_normal((64,)).astype(np.float32)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, _entries([("a", "F32", a), ("b", "F16", b), ("c", "BF16", c)]),
                      {"format": "pt"})
    with SafetensorsFile(path) as st:
        assert st.metadata == {"format": "pt"}
        assert set(st.tensors) == {"a", "b", "c"}
        assert st.tensors["b"].shape == (3, 4, 2) and st.tensors["c"].dtype == "BF16"
        np.testing.assert_array_equal(st.tensor("a"), a)
        np.testing.assert_array_equal(st.tensor_f32("b"), b.astype(np.float32))
        # BF16 keeps the top 16 bits of each float, rounded to nearest even
        got = st.tensor_f32("c")
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, c, rtol=2 ** -8)
        np.testing.assert_array_equal(got, bf16_to_f32(f32_to_bf16(c)))
        st.release("a")  # pages dropped; data still readable (page cache)
        np.testing.assert_array_equal(st.tensor("a"), a)


@pytest.mark.oracle
def test_reads_files_written_by_the_reference_library(tmp_path):
    st_lib = pytest.importorskip("safetensors.numpy", reason="safetensors not installed")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.arange(6, dtype=np.float16)
    st_lib.save_file({"a": a, "b": b}, str(tmp_path / "x.safetensors"))
    with SafetensorsFile(tmp_path / "x.safetensors") as st:
        np.testing.assert_array_equal(st.tensor("a"), a)
        np.testing.assert_array_equal(st.tensor("b"), b)
    write_safetensors(tmp_path / "y.safetensors", _entries([("a", "F32", a)]))
    np.testing.assert_array_equal(st_lib.load_file(str(tmp_path / "y.safetensors"))["a"], a)


def test_bf16_bits_match_torch_rounding():
    x = np.array([1.0, -2.5, 3.14159265, 1e-40, 65504.0, np.inf, -0.0], dtype=np.float32)
    bits = f32_to_bf16(x)
    assert bits.dtype == np.uint16
    # 3.14159265 = 0x40490FDB -> rounds up to 0x4049; 1.0 = 0x3F80
    assert bits[0] == 0x3F80 and bits[2] == 0x4049 and bits[5] == 0x7F80
    np.testing.assert_array_equal(bf16_to_f32(bits)[[0, 1, 5, 6]], x[[0, 1, 5, 6]])


def _raw_file(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header,data,needle", [
    (None, b"\x01\x02", "not a safetensors file"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "12 expected"),
    ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
])
def test_malformed_files_raise_format_error(tmp_path, header, data, needle):
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(data)
    else:
        _raw_file(path, header, data)
    with pytest.raises(formats.FormatError, match=needle):
        SafetensorsFile(path)


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(formats.FormatError, match="exceeds the file size"):
        SafetensorsFile(path)


def test_unreadable_dtype_is_refused_on_access(tmp_path):
    path = _raw_file(tmp_path / "i.safetensors",
                     {"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)
    with SafetensorsFile(path) as st:
        assert st.tensors["a"].dtype == "I64"
        with pytest.raises(formats.FormatError, match="dtype I64"):
            st.tensor("a")


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")

    def boom():
        raise RuntimeError("producer failed")
    with pytest.raises(RuntimeError):
        write_safetensors(path, [("a", "F32", (2,), boom)])
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
