"""formats.read_gguf on the real SmolLM2 file, checked key by key and tensor by tensor
against gguf-py (the reference reader)."""

import numpy as np
import pytest

import formats
from formats import GGMLType, GGUFValueType


@pytest.fixture(scope="module")
def smol(smollm2_path):
    f = formats.read_gguf(smollm2_path)
    yield f
    f.close()


def _gguf_py_value(field):
    import gguf
    t = gguf.GGUFValueType(field.types[0])
    if t == gguf.GGUFValueType.ARRAY:
        sub = gguf.GGUFValueType(field.types[-1])
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if t == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "surrogateescape")
    return field.parts[field.data[0]].tolist()[0]


def test_smollm2_matches_gguf_py(smol, smollm2_path):
    gguf = pytest.importorskip("gguf")
    ref = gguf.GGUFReader(smollm2_path)
    ref_fields = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(smol.metadata.keys()) == list(ref_fields)
    for key, field in ref_fields.items():
        t, sub = smol.metadata.types[key]
        assert int(t) == field.types[0], key
        if t == GGUFValueType.ARRAY:
            assert int(sub) == field.types[-1], key
        assert smol.metadata[key] == _gguf_py_value(field), key
    assert len(smol.tensors) == len(ref.tensors) == 272
    for rt in ref.tensors:
        t = smol.tensors[rt.name]
        assert int(t.type) == int(rt.tensor_type)
        assert t.shape == tuple(int(d) for d in reversed(rt.shape.tolist()))
        assert t.nbytes == rt.n_bytes
        assert t.offset == rt.data_offset
        assert np.array_equal(t.data.reshape(-1).view(np.uint8), rt.data.reshape(-1).view(np.uint8)), rt.name


def test_smollm2_contents(smol):
    md = smol.metadata
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == 30
    toks = md["tokenizer.ggml.tokens"]
    assert isinstance(toks, list) and len(toks) == 49152 and toks[0] == "<|endoftext|>"
    assert len(md["tokenizer.ggml.merges"]) == 48900
    assert md.types["llama.context_length"] == (GGUFValueType.UINT32, None)
    emb = smol.tensors["token_embd.weight"]
    assert emb.type == GGMLType.Q8_0 and emb.shape == (49152, 576)
    assert emb.data.shape == (49152, 576 // 32 * 34) and emb.data.dtype == np.uint8
    norm = smol.tensors["output_norm.weight"]
    assert norm.type == GGMLType.F32 and norm.data.dtype == np.float32 and norm.data.shape == (576,)


def test_tensor_views_are_zero_copy_and_read_only(smol):
    t = smol.tensors["blk.0.attn_q.weight"]
    assert not t.data.flags.writeable
    assert not t.data.flags.owndata
    base = t.data
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert not isinstance(base, np.ndarray)  # ends at the memory map, not a copy


def test_lazy_metadata_survives_close(smollm2_path):
    # how fast opening is (the 50 ms target) is measured by tools/bench_formats.py
    with formats.read_gguf(smollm2_path) as f:
        md = f.metadata
        t = f.tensors["output_norm.weight"]
    assert md["tokenizer.ggml.tokens"][2] == "<|im_end|>"  # decoded after close
    assert dict(md)["tokenizer.ggml.merges"][0] == "Ġ t"
    assert np.isfinite(t.data).all()  # the view keeps the map alive


def test_reads_what_gguf_py_writes(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "ref.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_uint64("t.u64", 2**63 + 7)
    w.add_int64("t.i64", -(2**62))
    w.add_float32("t.f32", 0.1)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.strs", ["a", "", "ü"])
    w.add_array("t.floats", [0.5, -1.25])
    rng = np.random.default_rng(3)
    f32 = rng.standard_normal((3, 8)).astype(np.float32)
    f16 = rng.standard_normal((2, 16)).astype(np.float16)
    q8 = formats.quantize(rng.standard_normal((4, 64)).astype(np.float32), GGMLType.Q8_0)
    w.add_tensor("f32", f32)
    w.add_tensor("f16", f16)
    w.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with formats.read_gguf(path) as f:
        md = f.metadata
        assert md["general.architecture"] == "llama"
        assert [md[k] for k in ("t.u8", "t.i8", "t.u16", "t.i16", "t.u32", "t.i32", "t.u64", "t.i64")] == \
            [200, -5, 60000, -30000, 4_000_000_000, -2_000_000_000, 2**63 + 7, -(2**62)]
        assert md["t.f32"] == float(np.float32(0.1)) and md["t.f64"] == 0.1
        assert md["t.bool"] is True and md["t.str"] == "héllo"
        assert md["t.strs"] == ["a", "", "ü"] and md["t.floats"] == [0.5, -1.25]
        assert [md.types[k][0] for k in ("t.u8", "t.i16", "t.u64", "t.f64", "t.bool")] == \
            [GGUFValueType.UINT8, GGUFValueType.INT16, GGUFValueType.UINT64, GGUFValueType.FLOAT64,
             GGUFValueType.BOOL]
        assert np.array_equal(f.tensors["f32"].data, f32)
        assert np.array_equal(f.tensors["f16"].data, f16)
        assert f.tensors["q8"].type == GGMLType.Q8_0 and f.tensors["q8"].shape == (4, 64)
        assert np.array_equal(f.tensors["q8"].data, q8)
