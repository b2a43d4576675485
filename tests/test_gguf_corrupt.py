"""Malformed GGUF files raise formats.FormatError naming the problem: never a crash, a
hang, a huge allocation or an error from deep inside NumPy."""
import struct

import numpy as np
import pytest

import formats
from formats import FormatError, GGMLType
from formats import GGUFValueType as VT


def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key, t, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", t) + payload


def tinfo(name, ne, t, offset, n_dims=None) -> bytes:
    n_dims = len(ne) if n_dims is None else n_dims
    return _s(name) + struct.pack("<I", n_dims) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", t, offset)


def build(kvs=(), infos=(), data=b"", version=3, magic=b"GGUF", alignment=32, n_tensors=None, n_kv=None):
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    body += b"\0" * (-len(body) % alignment)
    return body + data


DEFAULT_KVS = [
    kv("general.architecture", VT.STRING, _s("llama")),
    kv("llama.block_count", VT.UINT32, struct.pack("<I", 2)),
    kv("tokenizer.ggml.tokens", VT.ARRAY, struct.pack("<IQ", VT.STRING, 3) + _s("a") + _s("bc") + _s("")),
    kv("tokenizer.ggml.scores", VT.ARRAY, struct.pack("<IQ", VT.FLOAT32, 3) + struct.pack("<3f", 0, 1, 2)),
]


def good(**kw):
    """Two tensors: F32 (4,) at 0 and Q8_0 (2, 32) at 32; the file ends at the last byte."""
    infos = [tinfo("a", [4], GGMLType.F32, 0), tinfo("b", [32, 2], GGMLType.Q8_0, 32)]
    data = np.arange(4, dtype=np.float32).tobytes() + b"\0" * 16 + bytes(range(68))
    args = dict(kvs=DEFAULT_KVS, infos=infos, data=data)
    args.update(kw)
    return build(**args)


def read(tmp_path, blob: bytes):
    p = tmp_path / "x.gguf"
    p.write_bytes(blob)
    with formats.read_gguf(p) as f:
        return f.metadata.copy(), {n: (t.type, t.shape, t.data.copy()) for n, t in f.tensors.items()}


def bad(tmp_path, blob: bytes, match: str):
    with pytest.raises(FormatError, match=match):
        read(tmp_path, blob)


def test_the_valid_file_reads(tmp_path):
    md, tensors = read(tmp_path, good())
    assert md["tokenizer.ggml.tokens"] == ["a", "bc", ""]
    assert md["tokenizer.ggml.scores"] == [0.0, 1.0, 2.0]
    assert tensors["a"][2].tolist() == [0, 1, 2, 3]
    assert tensors["b"][0] == GGMLType.Q8_0 and tensors["b"][1] == (2, 32)
    assert tensors["b"][2].reshape(-1).tolist() == list(range(68))


def test_version_2_reads(tmp_path):
    md, _ = read(tmp_path, good(version=2))
    assert md["llama.block_count"] == 2


def test_truncated_anywhere(tmp_path):
    blob = good()
    p = tmp_path / "x.gguf"
    for n in range(len(blob)):
        p.write_bytes(blob[:n])
        with pytest.raises(FormatError):
            formats.read_gguf(p)


def test_empty_and_foreign_files(tmp_path):
    bad(tmp_path, b"", "not a GGUF file")
    bad(tmp_path, b"GG", "not a GGUF file")
    bad(tmp_path, b"hello, this is a text file\n" * 4, "magic")
    bad(tmp_path, good(magic=b"GGML"), "magic")
    bad(tmp_path, b"GGUF", "version.*needs 4 bytes")


def test_message_names_the_file(tmp_path):
    with pytest.raises(FormatError, match=r"x\.gguf: GGUF version 99"):
        read(tmp_path, good(version=99))


def test_versions(tmp_path):
    bad(tmp_path, good(version=99), "version 99")
    bad(tmp_path, good(version=1), "version 1 ")
    bad(tmp_path, good(version=0x03000000), "big-endian")


def test_huge_counts(tmp_path):
    bad(tmp_path, good(n_kv=2**62), "key-value count")
    bad(tmp_path, good(n_tensors=2**62), "tensor count")
    bad(tmp_path, good(n_kv=len(DEFAULT_KVS) + 1), "at offset")


def test_string_lengths_past_the_end(tmp_path):
    bad(tmp_path, good(kvs=[struct.pack("<Q", 2**40) + b"key"]), "metadata key.*needs 1099511627776 bytes")
    bad(tmp_path, good(kvs=[_s("k") + struct.pack("<IQ", VT.STRING, 10**9) + b"abc"]), "string value of 'k'")
    arr = struct.pack("<IQ", VT.STRING, 2) + _s("ok") + struct.pack("<Q", 2**63) + b"x"
    bad(tmp_path, good(kvs=[kv("arr", VT.ARRAY, arr)]), "runs past the end")
    bad(tmp_path, good(kvs=[kv("arr", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2**61))]), "strings do not fit")
    bad(tmp_path, good(kvs=[kv("arr", VT.ARRAY, struct.pack("<IQ", VT.UINT32, 2**61))]), "does not fit")
    long_name = tinfo("n" * 64, [4], GGMLType.F32, 0)
    bad(tmp_path, good(infos=[long_name]), "longer than 63 bytes")


def test_bad_value_types(tmp_path):
    bad(tmp_path, good(kvs=[kv("k", 13, b"\0" * 8)]), "value type of 'k'.*unknown value type 13")
    bad(tmp_path, good(kvs=[kv("k", VT.ARRAY, struct.pack("<IQ", 99, 1) + b"\0" * 8)]), "unknown value type 99")
    nested = struct.pack("<IQ", VT.ARRAY, 1) + struct.pack("<IQ", VT.UINT8, 1) + b"\0"
    bad(tmp_path, good(kvs=[kv("k", VT.ARRAY, nested)]), "nested")


def test_duplicates(tmp_path):
    bad(tmp_path, good(kvs=DEFAULT_KVS + DEFAULT_KVS[:1]), "duplicate metadata key 'general.architecture'")
    infos = [tinfo("a", [4], GGMLType.F32, 0), tinfo("a", [4], GGMLType.F32, 32)]
    bad(tmp_path, good(infos=infos), "duplicate tensor name 'a'")


def test_dimensions(tmp_path):
    bad(tmp_path, good(infos=[tinfo("a", [4, 1, 1, 1, 1], GGMLType.F32, 0)]), "n_dims 5")
    bad(tmp_path, good(infos=[tinfo("a", [2**62], GGMLType.F32, 0)]), "past the end of the file")
    bad(tmp_path, good(infos=[tinfo("a", [2**63 + 5], GGMLType.F32, 0)]), "negative")
    bad(tmp_path, good(infos=[tinfo("a", [2**40, 2**40], GGMLType.F32, 0)]), "overflows")
    bad(tmp_path, good(infos=[tinfo("a", [31, 2], GGMLType.Q8_0, 0)]), "not a multiple of Q8_0's block size")
    bad(tmp_path, good(infos=[tinfo("a", [], GGMLType.Q4_0, 0)]), "row length 1")


def test_tensor_types(tmp_path):
    bad(tmp_path, good(infos=[tinfo("a", [4], 99, 0)]), "unknown ggml type id 99")
    bad(tmp_path, good(infos=[tinfo("a", [4], 4, 0)]), "unknown ggml type id 4")  # removed Q4_2


def test_offsets(tmp_path):
    bad(tmp_path, good(infos=[tinfo("a", [4], GGMLType.F32, 4)]), "not a multiple of the alignment 32")
    bad(tmp_path, good(infos=[tinfo("a", [4], GGMLType.F32, 2**40)]), "past the end of the file")
    overlap = [tinfo("a", [16], GGMLType.F32, 0), tinfo("b", [32, 2], GGMLType.Q8_0, 32)]
    bad(tmp_path, good(infos=overlap), "overlaps")


def test_alignment(tmp_path):
    def with_alignment(t, payload):
        return good(kvs=DEFAULT_KVS + [kv("general.alignment", t, payload)])
    bad(tmp_path, with_alignment(VT.UINT32, struct.pack("<I", 13)), "alignment is 13")
    bad(tmp_path, with_alignment(VT.UINT32, struct.pack("<I", 0)), "alignment is 0")
    bad(tmp_path, with_alignment(VT.UINT64, struct.pack("<Q", 32)), "must be UINT32")
    md, _ = read(tmp_path, with_alignment(VT.UINT32, struct.pack("<I", 32)))
    assert md["general.alignment"] == 32


def test_random_corruption_never_escapes_as_another_error(tmp_path):
    """Flip bytes of the header region: every result parses or raises FormatError."""
    blob = bytearray(good())
    header_len = len(good(data=b""))
    rng = np.random.default_rng(0)
    p = tmp_path / "x.gguf"
    for _ in range(500):
        b = bytearray(blob)
        for pos in rng.integers(4, header_len, rng.integers(1, 4)):
            b[pos] = rng.integers(0, 256)
        p.write_bytes(bytes(b))
        try:
            with formats.read_gguf(p) as f:
                f.metadata.items()  # decode everything lazy too
                for t in f.tensors.values():
                    t.data.tobytes()
        except FormatError:
            pass
