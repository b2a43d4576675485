"""formats.write_gguf / GGUFWriter: round trips through kiln and gguf-py, metadata types,
the call-order state machine, atomic replacement and cleanup after a killed writer."""
import glob
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import formats
from formats import GGMLType, GGUFValue, GGUFWriter, GGUFWriterError
from formats import GGUFValueType as VT
from oracles import run_oracle


def _sample(rng):
    md = {
        "general.architecture": "llama",
        "general.name": "tiny ünïcode",
        "llama.block_count": 2,
        "llama.context_length": 128,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.tokens": ["<s>", "</s>", "a", "b\u00e9"],
        "tokenizer.ggml.scores": [0.0, -1.5, -2.25, 3.0],
        "tokenizer.ggml.token_type": [3, 3, 1, 1],
        "test.forced_u64": GGUFValue(5, VT.UINT64),
        "test.forced_u8_array": GGUFValue([1, 2, 255], VT.ARRAY, VT.UINT8),
        "test.negative": -7,
        "test.f64": GGUFValue(0.1, VT.FLOAT64),
    }
    tensors = [
        ("a.f32", GGMLType.F32, (3, 5), rng.standard_normal((3, 5)).astype(np.float32)),
        ("b.f16", GGMLType.F16, (64,), rng.standard_normal(64).astype(np.float32)),
        ("c.bf16", GGMLType.BF16, (2, 32), rng.standard_normal((2, 32)).astype(np.float32)),
        ("d.q4_0", GGMLType.Q4_0, (4, 64), rng.standard_normal((4, 64)).astype(np.float32)),
        ("e.q4_1", GGMLType.Q4_1, (2, 96), rng.standard_normal((2, 96)).astype(np.float32)),
        ("f.q8_0", GGMLType.Q8_0, (3, 32), rng.standard_normal((3, 32)).astype(np.float32)),
        ("g.q8_0raw", GGMLType.Q8_0, (1, 32),
         formats.quantize(rng.standard_normal((1, 32)).astype(np.float32), GGMLType.Q8_0)),
    ]
    return md, tensors


def _expected_bytes(type_, data):
    if data.dtype == np.uint8:
        return data.reshape(-1)
    return formats.quantize(data, type_).reshape(-1)


EXPECTED_TYPES = {
    "general.architecture": (VT.STRING, None),
    "llama.block_count": (VT.UINT32, None),
    "llama.attention.layer_norm_rms_epsilon": (VT.FLOAT32, None),
    "tokenizer.ggml.add_bos_token": (VT.BOOL, None),
    "tokenizer.ggml.tokens": (VT.ARRAY, VT.STRING),
    "tokenizer.ggml.scores": (VT.ARRAY, VT.FLOAT32),
    "tokenizer.ggml.token_type": (VT.ARRAY, VT.INT32),
    "test.forced_u64": (VT.UINT64, None),
    "test.forced_u8_array": (VT.ARRAY, VT.UINT8),
    "test.negative": (VT.INT32, None),
    "test.f64": (VT.FLOAT64, None),
}


def test_round_trip_kiln(tmp_path):
    md, tensors = _sample(np.random.default_rng(1))
    path = tmp_path / "m.gguf"
    formats.write_gguf(path, md, tensors)
    with formats.read_gguf(path) as f:
        for key, t in EXPECTED_TYPES.items():
            assert f.metadata.types[key] == t, key
        assert f.metadata["general.name"] == "tiny ünïcode"
        assert f.metadata["tokenizer.ggml.scores"] == [0.0, -1.5, -2.25, 3.0]
        assert f.metadata["test.forced_u8_array"] == [1, 2, 255]
        assert f.metadata["test.f64"] == 0.1
        assert list(f.tensors) == [t[0] for t in tensors]
        for name, type_, shape, data in tensors:
            t = f.tensors[name]
            assert t.type == type_ and t.shape == shape
            assert t.offset % 32 == 0
            assert np.array_equal(t.data.reshape(-1).view(np.uint8), _expected_bytes(type_, data))
        assert np.array_equal(f.tensors["a.f32"].data, tensors[0][3])


def test_gguf_py_reads_what_kiln_writes(tmp_path):
    gguf = pytest.importorskip("gguf")
    md, tensors = _sample(np.random.default_rng(2))
    path = tmp_path / "m.gguf"
    formats.write_gguf(path, md, tensors, alignment=64)
    ref = gguf.GGUFReader(path)
    mine = formats.read_gguf(path)
    fields = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(mine.metadata)
    for key, field in fields.items():
        t, sub = mine.metadata.types[key]
        assert field.types[0] == t and (sub is None or field.types[-1] == sub), key
        assert field.contents() == mine.metadata[key], key
    assert ref.alignment == 64
    assert [t.name for t in ref.tensors] == [t[0] for t in tensors]
    for rt, (name, type_, shape, data) in zip(ref.tensors, tensors):
        assert int(rt.tensor_type) == int(type_)
        assert tuple(reversed(rt.shape.tolist())) == shape
        assert np.array_equal(rt.data.reshape(-1).view(np.uint8), _expected_bytes(type_, data)), name


def test_smollm2_rewrites_byte_identical(smollm2_path, tmp_path):
    out = tmp_path / "copy.gguf"
    with formats.read_gguf(smollm2_path) as f:
        formats.write_gguf(out, f.metadata,
                           ((t.name, t.type, t.shape, t.data) for t in f.tensors.values()))
    with open(smollm2_path, "rb") as a, open(out, "rb") as b:
        while True:
            x, y = a.read(1 << 22), b.read(1 << 22)
            assert x == y
            if not x:
                break


def test_metadata_types_survive_edit_and_explicit_type(smollm2_path, tmp_path):
    with formats.read_gguf(smollm2_path) as f:
        md = f.metadata.copy()
    md["llama.context_length"] = 4096          # still fits UINT32: type kept
    md["general.file_type"] = GGUFValue(3, VT.UINT64)
    md.set_typed("test.u16", 9, VT.UINT16)
    md["general.name"] = 17                     # a new kind of value: type re-inferred
    assert md.type_of("llama.context_length") == (VT.UINT32, None)
    assert md.type_of("general.name") == (VT.UINT32, None)
    out = tmp_path / "m.gguf"
    formats.write_gguf(out, md, [])
    with formats.read_gguf(out) as g:
        assert g.metadata["llama.context_length"] == 4096
        assert g.metadata.types["general.file_type"] == (VT.UINT64, None)
        assert g.metadata.types["test.u16"] == (VT.UINT16, None)
        assert g.metadata["tokenizer.ggml.tokens"] == md["tokenizer.ggml.tokens"]


def test_bad_values_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        formats.write_gguf(tmp_path / "x.gguf", {"k": GGUFValue(-1, VT.UINT32)}, [])
    with pytest.raises(ValueError, match="multiple"):
        formats.write_gguf(tmp_path / "x.gguf", {}, [("t", GGMLType.Q4_0, (2, 33), np.zeros((2, 33), np.float32))])
    with pytest.raises(ValueError, match="shape"):
        formats.write_gguf(tmp_path / "x.gguf", {}, [("t", GGMLType.F32, (2, 4), np.zeros((4, 2), np.float32))])
    with pytest.raises(ValueError, match="duplicate tensor"):
        formats.write_gguf(tmp_path / "x.gguf", {}, [("t", GGMLType.F32, (1,), np.zeros(1, np.float32))] * 2)
    assert os.listdir(tmp_path) == []


def test_call_order_is_enforced(tmp_path):
    w = GGUFWriter(tmp_path / "x.gguf")
    w.add_tensor_info("a", GGMLType.F32, (2,))
    w.add_tensor_info("b", GGMLType.F32, (2,))
    with pytest.raises(GGUFWriterError):
        w.write_tensor("a", np.zeros(2, np.float32))  # header first
    w.write_header()
    with pytest.raises(GGUFWriterError):
        w.add_key("late", 1)
    with pytest.raises(GGUFWriterError):
        w.add_tensor_info("c", GGMLType.F32, (2,))
    with pytest.raises(GGUFWriterError):
        w.write_tensor("b", np.zeros(2, np.float32))  # declaration order
    w.write_tensor("a", np.zeros(2, np.float32))
    with pytest.raises(GGUFWriterError):
        w.finish()  # "b" missing
    w.write_tensor("b", np.ones(2, np.float32))
    w.finish()
    with pytest.raises(GGUFWriterError):
        w.write_header()
    with formats.read_gguf(tmp_path / "x.gguf") as f:
        assert f.tensors["b"].data.tolist() == [1.0, 1.0]


def test_exception_leaves_existing_file_and_no_temp(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old contents")

    def boom():
        raise RuntimeError("converter failed")

    with pytest.raises(RuntimeError, match="converter failed"):
        formats.write_gguf(target, {"a": 1}, [("x", GGMLType.F32, (4,), np.zeros(4, np.float32)),
                                              ("y", GGMLType.F32, (4,), boom)])
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_abandoned_writer_removes_its_temp_file(tmp_path):
    w = GGUFWriter(tmp_path / "m.gguf")
    w.add_tensor_info("a", GGMLType.F32, (4,))
    w.write_header()
    assert len(os.listdir(tmp_path)) == 1
    del w
    assert os.listdir(tmp_path) == []


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, numpy as np, formats
    from formats import GGMLType
    w = formats.GGUFWriter(sys.argv[1])
    w.add_tensor_info("a", GGMLType.F32, (1024,))
    w.add_tensor_info("b", GGMLType.F32, (1024,))
    w.write_header()
    w.write_tensor("a", np.zeros(1024, np.float32))
    w._fh.flush()
    print("written", flush=True)
    sys.stdin.read()  # wait here until killed
""")


def test_sigkill_mid_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "m.gguf"
    p = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "written"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not target.exists()
    assert len(glob.glob(str(target) + ".tmp-*")) == 1  # the dead writer's temp file
    formats.write_gguf(target, {"ok": True}, [])
    assert os.listdir(tmp_path) == ["m.gguf"]
    with formats.read_gguf(target) as f:
        assert f.metadata["ok"] is True


def test_strided_and_chunked_data_is_written_in_order(tmp_path, monkeypatch):
    from formats import writer
    monkeypatch.setattr(writer, "_ENCODE_CHUNK_ELEMENTS", 96)  # many pieces per tensor
    rng = np.random.default_rng(4)
    big_rows = rng.standard_normal((3, 256)).astype(np.float32)    # rows larger than a piece
    transposed = rng.standard_normal((64, 6)).astype(np.float32).T  # non-contiguous view
    flat = rng.standard_normal(320).astype(np.float32)              # 1-D, cut at block multiples
    raw = formats.quantize(rng.standard_normal((5, 64)).astype(np.float32), GGMLType.Q4_1)[:, ::-1][:, ::-1]
    tensors = [("big", GGMLType.Q8_0, big_rows.shape, big_rows),
               ("tr", GGMLType.Q4_0, transposed.shape, transposed),
               ("tr16", GGMLType.F16, transposed.shape, transposed),
               ("flat", GGMLType.Q4_1, flat.shape, flat),
               ("raw", GGMLType.Q4_1, (5, 64), raw)]
    formats.write_gguf(tmp_path / "m.gguf", {}, tensors)
    with formats.read_gguf(tmp_path / "m.gguf") as f:
        for name, type_, shape, data in tensors:
            want = data if data.dtype == np.uint8 else formats.quantize(np.ascontiguousarray(data), type_)
            assert np.array_equal(f.tensors[name].data.reshape(-1).view(np.uint8), want.reshape(-1)), name


def _chunks_of(type_, data, rng):
    """`data` cut into uneven pieces of whole rows (float/typed) or odd byte counts (raw)."""
    if data.dtype == np.uint8:
        flat = data.reshape(-1)
        cuts = sorted(set(rng.integers(0, flat.size, 3).tolist()) | {0, flat.size})
        return [flat[a:b] for a, b in zip(cuts, cuts[1:])]
    if data.ndim == 1:
        block = formats.GGML_QUANT_SIZES[type_][0]
        return [data[:block], data[block:]] if data.size > block else [data]
    if data.shape[0] < 2:
        return [data]  # a zero-byte tensor is complete with its first (empty) piece
    return [data[:1], data[1:1], data[1:]]  # an empty piece in the middle is harmless


def test_chunked_writes_are_identical_to_one_shot(tmp_path):
    """write_tensor_chunk and write_tensor(iterator) give the same file, byte for byte."""
    rng = np.random.default_rng(5)
    md, tensors = _sample(rng)
    tensors.append(("h.bf16bits", GGMLType.BF16, (3, 32),
                    formats.quantize(rng.standard_normal((3, 32)).astype(np.float32),
                                     GGMLType.BF16).view(np.uint16)))
    tensors.append(("i.empty", GGMLType.F32, (0, 8), np.zeros((0, 8), np.float32)))
    formats.write_gguf(tmp_path / "one.gguf", md, tensors)
    for mode in ("chunk", "iterator"):
        with GGUFWriter(tmp_path / f"{mode}.gguf") as w:
            w.add_metadata(md)
            for name, type_, shape, _ in tensors:
                w.add_tensor_info(name, type_, shape)
            w.write_header()
            for name, type_, _, data in tensors:
                pieces = _chunks_of(type_, data, rng)
                if mode == "iterator":
                    w.write_tensor(name, iter(pieces))
                else:
                    for piece in pieces:
                        w.write_tensor_chunk(name, piece)
        assert (tmp_path / f"{mode}.gguf").read_bytes() == (tmp_path / "one.gguf").read_bytes(), mode


def test_chunked_gguf_py_reads_it(tmp_path):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, 64)).astype(np.float32)
    with GGUFWriter(tmp_path / "c.gguf") as w:
        w.add_key("general.architecture", "llama")
        w.add_tensor_info("q", GGMLType.Q4_0, x.shape)
        w.add_tensor_info("f", GGMLType.F32, (3, 5))  # 60 bytes: padding follows it
        w.add_tensor_info("g", GGMLType.F16, x.shape)
        w.write_header()
        for i in range(0, 40, 7):
            w.write_tensor_chunk("q", x[i:i + 7])
        w.write_tensor_chunk("f", np.arange(15, dtype=np.float32).reshape(3, 5)[:2])
        w.write_tensor_chunk("f", np.arange(10, 15, dtype=np.float32).reshape(1, 5))
        w.write_tensor("g", (x[i:i + 16] for i in range(0, 40, 16)))
    ref = gguf.GGUFReader(tmp_path / "c.gguf")
    q, f, g = ref.tensors
    assert np.array_equal(q.data.reshape(-1).view(np.uint8),
                          formats.quantize(x, GGMLType.Q4_0).reshape(-1))
    assert np.array_equal(f.data.reshape(3, 5), np.arange(15, dtype=np.float32).reshape(3, 5))
    assert g.data_offset % 32 == 0
    assert np.array_equal(g.data.reshape(40, 64), x.astype(np.float16))


def _chunk_writer(tmp_path):
    w = GGUFWriter(tmp_path / "x.gguf")
    w.add_tensor_info("a", GGMLType.F32, (4, 8))
    w.add_tensor_info("b", GGMLType.Q8_0, (2, 32))
    w.write_header()
    return w


def test_chunked_write_state_machine(tmp_path):
    rows = np.ones((2, 8), np.float32)
    # too many bytes: rejected before anything is written, the tensor stays where it was
    w = _chunk_writer(tmp_path)
    w.write_tensor_chunk("a", rows)
    with pytest.raises(GGUFWriterError, match="exceeds the declared 128"):
        w.write_tensor_chunk("a", np.ones((3, 8), np.float32))
    with pytest.raises(GGUFWriterError, match="exceeds"):
        w.write_tensor_chunk("a", np.zeros(65, np.uint8))
    w.write_tensor_chunk("a", rows)  # exactly complete now
    with pytest.raises(GGUFWriterError, match="expected data for tensor 'b'"):
        w.write_tensor_chunk("a", rows)  # a is done: more of it is too many
    # too few: the next tensor or finish() before the declared size
    w.write_tensor_chunk("b", np.ones((1, 32), np.float32))
    with pytest.raises(GGUFWriterError, match="while 'b' is incomplete \\(34 of 68 bytes"):
        w.write_tensor_chunk("a", rows)
    with pytest.raises(GGUFWriterError, match="34 of its 68 bytes written"):
        w.finish()
    with pytest.raises(GGUFWriterError, match="partly written"):
        w.write_tensor("b", np.ones((2, 32), np.float32))  # a one-shot write cannot restart it
    w.abort()
    assert os.listdir(tmp_path) == []
    # out of order: a chunk of a later tensor, or before the header
    w = GGUFWriter(tmp_path / "x.gguf")
    w.add_tensor_info("a", GGMLType.F32, (4, 8))
    with pytest.raises(GGUFWriterError, match="allowed only while writing tensor data"):
        w.write_tensor_chunk("a", rows)
    w.add_tensor_info("b", GGMLType.Q8_0, (2, 32))
    w.write_header()
    with pytest.raises(GGUFWriterError, match="expected data for tensor 'a'"):
        w.write_tensor_chunk("b", np.ones((1, 32), np.float32))
    # pieces that are not whole rows
    with pytest.raises(ValueError, match="not whole rows"):
        w.write_tensor_chunk("a", np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="cannot store a int32"):
        w.write_tensor_chunk("a", np.ones((2, 8), np.int32))
    # an iterator that falls short leaves the tensor incomplete and raises
    with pytest.raises(GGUFWriterError, match="chunks gave 64 bytes.*needs 128"):
        w.write_tensor("a", iter([rows]))
    w.abort()
    assert os.listdir(tmp_path) == []


def test_failed_chunked_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.gguf"
    target.write_bytes(b"old")
    with pytest.raises(GGUFWriterError):
        with GGUFWriter(target) as w:
            w.add_tensor_info("a", GGMLType.F32, (4, 8))
            w.write_header()
            w.write_tensor_chunk("a", np.ones((3, 8), np.float32))
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.gguf"]


def test_raw_blocks_of_any_ggml_type_round_trip(tmp_path):
    gguf = pytest.importorskip("gguf")
    raw_k = np.arange(2 * 144, dtype=np.uint8) % 251  # two Q4_K blocks, bytes passed through
    formats.write_gguf(tmp_path / "k.gguf", {}, [("k", GGMLType.Q4_K, (1, 512), raw_k)])
    with formats.read_gguf(tmp_path / "k.gguf") as f:
        assert f.tensors["k"].data.shape == (1, 288)
        assert np.array_equal(f.tensors["k"].data.reshape(-1), raw_k)
    ref = gguf.GGUFReader(tmp_path / "k.gguf")
    assert np.array_equal(ref.tensors[0].data.reshape(-1), raw_k)


def test_alignment_sources(tmp_path):
    formats.write_gguf(tmp_path / "a.gguf", {"general.alignment": GGUFValue(64, VT.UINT32)},
                       [("x", GGMLType.F32, (3,), np.ones(3, np.float32)),
                        ("y", GGMLType.F32, (3,), np.ones(3, np.float32))])
    with formats.read_gguf(tmp_path / "a.gguf") as f:
        assert f.alignment == 64 and f.tensors["y"].offset % 64 == 0
    formats.write_gguf(tmp_path / "b.gguf", {}, [], alignment=128)
    with formats.read_gguf(tmp_path / "b.gguf") as f:
        assert f.metadata["general.alignment"] == 128 and f.data_offset % 128 == 0
    with pytest.raises(ValueError, match="conflicts"):
        formats.write_gguf(tmp_path / "c.gguf", {"general.alignment": GGUFValue(64, VT.UINT32)}, [], alignment=32)
    with pytest.raises(ValueError, match="power of two"):
        GGUFWriter(tmp_path / "d.gguf", alignment=13)


_STREAMING = textwrap.dedent("""
    import resource, sys, numpy as np, formats
    from formats import GGMLType
    n, rows = 8, 4096 * 1024 // 1024   # 8 tensors of 16 MiB float32 each = 128 MiB in total
    def make(i):
        return lambda: np.full((rows, 1024), i, np.float32)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    formats.write_gguf(sys.argv[1], {}, [(f"t{i}", GGMLType.Q8_0, (rows, 1024), make(i)) for i in range(n)])
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
""")


def test_streaming_keeps_memory_bounded(tmp_path):
    out = subprocess.run([sys.executable, "-c", _STREAMING, str(tmp_path / "s.gguf")],
                         capture_output=True, text=True, check=True)
    grew_mib = int(out.stdout.strip())
    assert grew_mib < 80, f"peak RSS grew by {grew_mib} MiB while writing 128 MiB of tensors"
    with formats.read_gguf(tmp_path / "s.gguf") as f:
        assert len(f.tensors) == 8
        assert np.allclose(formats.dequantize(f.tensors["t7"].data[:1], GGMLType.Q8_0, (1, 1024)), 7.0, rtol=1e-3)


_LLAMA_CPP_LOAD = textwrap.dedent("""
    import sys, llama_cpp
    seen = []
    for path in sys.argv[1:]:
        llm = llama_cpp.Llama(path, n_ctx=32, n_threads=1, verbose=False)
        md = {k: v for k, v in llm.metadata.items() if k not in ("general.name", "general.alignment")}
        seen.append((llm.n_vocab(), llm.tokenize(b"The kiln fires clay"), md))
    print("same" if seen[0] == seen[1] else "different")
""")

_LLAMA_CPP_EVAL = textwrap.dedent("""
    import sys, numpy as np, llama_cpp
    out = []
    for path in sys.argv[1:]:
        llm = llama_cpp.Llama(path, n_ctx=32, n_threads=1, logits_all=True, verbose=False)
        toks = llm.tokenize(b"The kiln fires clay")
        llm.eval(toks)
        out.append(np.array(llm.scores[: len(toks)]))
    print("same" if np.array_equal(out[0], out[1]) else "different")
""")


@pytest.fixture(scope="module")
def kiln_rewrite(smollm2_path, tmp_path_factory):
    """SmolLM2 rewritten by kiln with 64-byte alignment and an edited name."""
    import importlib.util
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python (the outside oracle) is not installed")
    out = tmp_path_factory.mktemp("rewrite") / "kiln.gguf"
    with formats.read_gguf(smollm2_path) as f:
        md = f.metadata.copy()
        md["general.name"] = "rewritten by kiln"
        formats.write_gguf(out, md, [(t.name, t.type, t.shape, t.data) for t in f.tensors.values()],
                           alignment=64)
    return str(out)


def _run_llama_cpp(script, *paths):
    r = run_oracle([sys.executable, "-c", script, *paths], timeout=300)
    return r.stdout.strip()


@pytest.mark.oracle
def test_llama_cpp_loads_what_kiln_writes(smollm2_path, kiln_rewrite):
    """llama.cpp loads the kiln-written file: same vocabulary, tokens and metadata."""
    assert _run_llama_cpp(_LLAMA_CPP_LOAD, smollm2_path, kiln_rewrite) == "same"


@pytest.mark.oracle
def test_llama_cpp_computes_the_same_logits_from_kiln_file(smollm2_path, kiln_rewrite):
    assert _run_llama_cpp(_LLAMA_CPP_EVAL, smollm2_path, kiln_rewrite) == "same"
