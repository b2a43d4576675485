"""Importance matrices end to end: llama.cpp's imatrix files (GGUF layout and legacy .dat),
`kiln imatrix` (checked against an independent transformers computation of every matrix's
inputs), and `kiln convert --imatrix` (tensor data bit-identical to ggml_quantize_chunk with
the same importance weights; llama.cpp loads the file)."""
import struct

import numpy as np
import pytest

import formats
from engine.cli import convert as convert_cli
from engine.cli import imatrix as imatrix_cli
from formats import GGMLType as T
from formats.imatrix import Imatrix, read_imatrix, write_imatrix
from oracles import ggml_quantizer
from tiny_models import CORPUS, make_tiny_llama


def _sample(n_cols=(64, 128), seed=0) -> Imatrix:
    rng = np.random.default_rng(seed)
    im = Imatrix(datasets=["calib.txt"], chunk_count=3, chunk_size=512)
    for i, n in enumerate(n_cols):
        im.sums[f"blk.{i}.attn_q.weight"] = rng.exponential(5.0, (1, n)).astype(np.float32)
        im.counts[f"blk.{i}.attn_q.weight"] = np.array([1536.0], np.float32)
    return im


# -- the file formats --------------------------------------------------------------------

def test_gguf_round_trip(tmp_path):
    im = _sample()
    write_imatrix(tmp_path / "a.gguf", im)
    back = read_imatrix(tmp_path / "a.gguf")
    assert back.names() == im.names()
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["calib.txt"], 3, 512)
    for name in im.names():
        assert np.array_equal(back.sums[name], im.sums[name])
        assert np.array_equal(back.counts[name], im.counts[name].reshape(-1))
        assert np.array_equal(back.importance(name), (im.sums[name] / np.float32(1536)).reshape(-1))
    with formats.read_gguf(tmp_path / "a.gguf") as f:
        md = f.metadata
        assert md["general.type"] == "imatrix"
        assert md.types["imatrix.chunk_count"][0] == formats.GGUFValueType.UINT32
        t = f.tensors["blk.1.attn_q.weight.in_sum2"]
        assert (t.type, tuple(t.shape)) == (T.F32, (1, 128))
        assert tuple(f.tensors["blk.1.attn_q.weight.counts"].shape) == (1, 1)


def test_reads_a_file_gguf_py_writes_in_llama_imatrix_layout(tmp_path):
    gguf = pytest.importorskip("gguf", reason="gguf-py not installed (outside oracle)")
    rng = np.random.default_rng(3)
    path = tmp_path / "imatrix.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["wiki.train.raw"])
    w.add_uint32("imatrix.chunk_count", 10)
    w.add_uint32("imatrix.chunk_size", 512)
    sums = {"blk.0.ffn_down.weight": rng.exponential(1.0, (1, 96)).astype(np.float32),
            "blk.0.attn_k.weight": rng.exponential(1.0, (1, 32)).astype(np.float32),
            "blk.0.ffn_up_exps.weight": rng.exponential(1.0, (4, 32)).astype(np.float32)}
    counts = {"blk.0.ffn_down.weight": np.array([[5120.0]], np.float32),
              "blk.0.attn_k.weight": np.array([[5120.0]], np.float32),
              "blk.0.ffn_up_exps.weight": np.array([[100.0], [0.0], [7.0], [3.0]], np.float32)}
    for name in sorted(sums):
        w.add_tensor(name + ".in_sum2", sums[name])
        w.add_tensor(name + ".counts", counts[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = read_imatrix(path)
    assert im.names() == sorted(sums)
    assert (im.datasets, im.chunk_count, im.chunk_size) == (["wiki.train.raw"], 10, 512)
    imp = im.importance("blk.0.ffn_down.weight")
    assert imp.dtype == np.float32 and np.array_equal(imp, sums["blk.0.ffn_down.weight"][0] / np.float32(5120))
    # stacked experts: one count per matrix; a matrix that saw nothing gets 1 (llama-quantize)
    e = im.importance("blk.0.ffn_up_exps.weight").reshape(4, 32)
    s = sums["blk.0.ffn_up_exps.weight"]
    assert np.array_equal(e[0], s[0] / np.float32(100)) and np.all(e[1] == 1)
    assert np.array_equal(e[2], s[2] / np.float32(7))


def _legacy_bytes(entries, trailer=None) -> bytes:
    out = struct.pack("<i", len(entries))
    for name, ncall, vals in entries:
        b = name.encode()
        out += struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, len(vals))
        out += np.asarray(vals, "<f4").tobytes()
    if trailer is not None:
        chunks, dataset = trailer
        out += struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode()
    return out


def test_reads_legacy_dat(tmp_path):
    v = np.array([2.0, 4.0, 6.0, 0.0], np.float32)
    p = tmp_path / "imatrix.dat"
    p.write_bytes(_legacy_bytes([("blk.0.attn_q.weight", 4, v), ("blk.0.ffn_down.weight", 0, v)],
                                trailer=(17, "calib.txt")))
    im = read_imatrix(p)
    assert im.names() == ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"]
    assert np.array_equal(im.importance("blk.0.attn_q.weight"), v / np.float32(4))  # values / ncall
    assert np.array_equal(im.importance("blk.0.ffn_down.weight"), v)  # ncall 0: as stored
    assert (im.chunk_count, im.datasets) == (17, ["calib.txt"])
    p.write_bytes(_legacy_bytes([("blk.0.attn_q.weight", 4, v)]))  # oldest files: no trailer
    assert read_imatrix(p).chunk_count == 0


@pytest.mark.parametrize("case, message", [
    ("truncated_values", "truncated reading blk.0.attn_q.weight's 4 values"),
    ("no_entries", "not an imatrix file"),
    ("bad_name_length", "name length -5 is not plausible"),
    ("empty", "truncated reading the entry count"),
])
def test_malformed_legacy_files_are_named(tmp_path, case, message):
    good = _legacy_bytes([("blk.0.attn_q.weight", 4, np.ones(4))])
    data = {"truncated_values": good[:-3], "no_entries": struct.pack("<i", 0),
            "bad_name_length": struct.pack("<ii", 1, -5) + bytes(16), "empty": b""}[case]
    p = tmp_path / "bad.dat"
    p.write_bytes(data)
    with pytest.raises(formats.FormatError, match=message):
        read_imatrix(p)


def test_malformed_gguf_imatrix_files_are_named(tmp_path):
    p = tmp_path / "model.gguf"
    formats.write_gguf(p, {"general.architecture": "llama"},
                       [("blk.0.attn_q.weight", T.F32, (4, 4), np.ones((4, 4), np.float32))])
    with pytest.raises(formats.FormatError, match="not an imatrix file"):
        read_imatrix(p)
    formats.write_gguf(p, {"general.type": "imatrix"},
                       [("blk.0.attn_q.weight.in_sum2", T.F32, (1, 4), np.ones((1, 4), np.float32))])
    with pytest.raises(formats.FormatError, match=r"blk.0.attn_q.weight has no \.counts tensor"):
        read_imatrix(p)
    formats.write_gguf(p, {"general.type": "model"},
                       [("x.in_sum2", T.F32, (1, 4), np.ones((1, 4), np.float32))])
    with pytest.raises(formats.FormatError, match="not an imatrix"):
        read_imatrix(p)


# -- kiln imatrix --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-imatrix")
    path = make_tiny_llama(d / "tiny.gguf", n_layer=2, n_embd=64, n_ff=128, seed=5)
    text = d / "calib.txt"
    text.write_text(CORPUS * 3, encoding="utf-8")
    return d, path, text


def _hf_input_sums(hf_dir, chunks):
    """Per HF module, the sum of squares of its input columns and the row count, by
    forward pre-hooks on transformers' LlamaForCausalLM: an independent computation."""
    torch = pytest.importorskip("torch", reason="torch not installed (optional oracle)")
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    sums, counts = {}, {}

    def hook(name):
        def pre(module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return pre
    hf_to_gguf = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                  "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                  "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i, layer in enumerate(model.model.layers):
        for hf, gg in hf_to_gguf.items():
            layer.get_submodule(hf).register_forward_pre_hook(hook(f"blk.{i}.{gg}.weight"))
    with torch.no_grad():
        for chunk in chunks:
            model(torch.tensor(np.asarray(chunk)[None, :], dtype=torch.long))
    return sums, counts


@pytest.mark.oracle
def test_kiln_imatrix_sums_equal_an_independent_computation(tiny, tmp_path):
    from engine.convert.export_hf import export
    from engine.perplexity import split_chunks
    from engine.tokenizer import load_tokenizer
    d, path, text = tiny
    out = tmp_path / "tiny.imatrix.gguf"
    assert imatrix_cli.main([path, "-f", str(text), "-o", str(out), "--ctx", "64", "--chunks", "3",
                             "--quiet"]) == 0
    im = read_imatrix(out)
    assert (im.chunk_count, im.chunk_size, im.datasets) == (3, 64, [str(text)])
    with formats.read_gguf(path) as f:
        tok = load_tokenizer(f.metadata)
    chunks = split_chunks(tok.encode(text.read_text(encoding="utf-8")), 64,
                          tok.bos_id if tok.add_bos else None, 3)
    sums, counts = _hf_input_sums(export(path, d / "hf", dtype="f32"), chunks)
    assert im.names() == sorted(sums)  # every matrix of every layer, nothing else
    for name in sums:
        assert im.counts[name].tolist() == [counts[name]] == [3 * 64]
        # layer 0's attention inputs are the embeddings, normed: float rounding only; the
        # rest sees kiln's fp16 KV cache (llama.cpp's), which transformers does not round
        first = name.startswith("blk.0.attn_") and not name.endswith("output.weight")
        np.testing.assert_allclose(im.sums[name][0], sums[name], rtol=2e-5 if first else 3e-3,
                                   err_msg=name)
    # q/k/v share their input, as do gate/up
    assert np.array_equal(im.sums["blk.1.attn_q.weight"], im.sums["blk.1.attn_v.weight"])
    assert np.array_equal(im.sums["blk.0.ffn_gate.weight"], im.sums["blk.0.ffn_up.weight"])


def test_kiln_imatrix_refuses_a_text_shorter_than_a_chunk(tiny, tmp_path, capsys):
    from engine.cli.kiln import main
    d, path, _ = tiny
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time", encoding="utf-8")
    assert main(["imatrix", path, "-f", str(short), "-o", str(tmp_path / "x.gguf")]) == 1
    assert "shorter than one chunk" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


# -- kiln convert --imatrix ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny256(tmp_path_factory):
    """A tiny float model with rows of 256 (K-quants apply) and a random importance matrix
    over its blk matrices (the bytes test needs weights, not a calibration)."""
    d = tmp_path_factory.mktemp("tiny256")
    path = make_tiny_llama(d / "tiny256.gguf", n_layer=2, n_embd=256, n_ff=512, n_head=4,
                           n_head_kv=2, tied=True, seed=9)
    rng = np.random.default_rng(1)
    im = Imatrix(datasets=["synthetic"], chunk_count=1, chunk_size=512)
    with formats.read_gguf(path) as f:
        for name, t in f.tensors.items():
            if name.startswith("blk.") and len(t.shape) == 2:
                im.sums[name] = rng.lognormal(0, 1.5, (1, t.shape[1])).astype(np.float32)
                im.counts[name] = np.array([512.0], np.float32)
    write_imatrix(d / "imatrix.gguf", im)
    return path, d / "imatrix.gguf", im


@pytest.mark.oracle
@pytest.mark.parametrize("typ", ["q4_0", "q4_k_m", "q5_1", "iq4_xs"])
def test_convert_with_imatrix_writes_ggml_bytes_and_llama_cpp_loads_it(tiny256, tmp_path, typ):
    from test_convert import llama_cpp_greedy
    path, im_path, im = tiny256
    lib = ggml_quantizer()
    out = tmp_path / f"tiny-{typ}-imatrix.gguf"
    assert convert_cli.main([path, "-o", str(out), "--type", typ, "--imatrix", str(im_path),
                             "--quiet"]) == 0
    checked = 0
    with formats.read_gguf(out) as q, formats.read_gguf(path) as src:
        assert q.metadata["quantize.imatrix.entries_count"] == len(im)
        for name, t in q.tensors.items():
            if t.type not in formats.WEIGHTED_TYPES:
                continue
            x = np.ascontiguousarray(src.tensors[name].data, np.float32).reshape(t.shape)
            want = np.zeros((x.shape[0], formats.row_nbytes(t.type, x.shape[1])), np.uint8)
            w = im.importance(name)
            lib.ggml_quantize_chunk(int(t.type), x.ctypes.data, want.ctypes.data, 0, x.shape[0],
                                    x.shape[1], None if w is None else np.ascontiguousarray(w).ctypes.data)
            assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), name
            checked += w is not None
    assert checked == len(im)
    if typ in ("q4_0", "q4_k_m"):  # llama.cpp loads and runs it (a child process each: slow)
        assert len(llama_cpp_greedy(out, "Once upon a time", n=4)["tokens"]) == 4


def test_convert_with_a_bad_imatrix_writes_nothing(tiny256, tmp_path, capsys):
    path, _, im = tiny256
    out = tmp_path / "out.gguf"
    cases = {}
    wrong = Imatrix(sums={n: np.ones((1, s.shape[1] // 2), np.float32) for n, s in im.sums.items()},
                    counts=dict(im.counts))
    write_imatrix(tmp_path / "wrong.gguf", wrong)
    cases["wrong.gguf"] = "has 128 values but the tensor's rows have 256 columns"
    other = Imatrix(sums={"blk.9.attn_q.weight": np.ones((1, 256), np.float32)},
                    counts={"blk.9.attn_q.weight": np.ones(1, np.float32)})
    write_imatrix(tmp_path / "other.gguf", other)
    cases["other.gguf"] = "none of its 1 entries names a tensor"
    (tmp_path / "garbage.dat").write_bytes(b"\x07\x00")
    cases["garbage.dat"] = "is malformed"
    cases["missing.gguf"] = "no such file"
    for fname, message in cases.items():
        assert convert_cli.main([path, "-o", str(out), "--type", "q4_0", "--imatrix",
                                 str(tmp_path / fname), "--quiet"]) == 1
        assert message in capsys.readouterr().err, fname
        assert not out.exists()


def test_tensors_without_an_entry_are_quantized_plain_with_a_note(tiny256, tmp_path, capsys):
    path, _, im = tiny256
    part = Imatrix(sums={k: v for k, v in im.sums.items() if k.startswith("blk.0.")},
                   counts={k: v for k, v in im.counts.items() if k.startswith("blk.0.")})
    write_imatrix(tmp_path / "part.gguf", part)
    out = tmp_path / "out.gguf"
    assert convert_cli.main([path, "-o", str(out), "--type", "q4_0", "--imatrix",
                             str(tmp_path / "part.gguf")]) == 0
    assert "no importance-matrix entry" in capsys.readouterr().err
    with formats.read_gguf(out) as q, formats.read_gguf(path) as src:
        t = q.tensors["blk.1.ffn_down.weight"]
        x = np.asarray(src.tensors["blk.1.ffn_down.weight"].data, np.float32).reshape(t.shape)
        assert np.array_equal(np.asarray(t.data).reshape(t.shape[0], -1), formats.quantize(x, T.Q4_0))
        t0 = q.tensors["blk.0.ffn_down.weight"]
        x0 = np.asarray(src.tensors["blk.0.ffn_down.weight"].data, np.float32).reshape(t0.shape)
        assert np.array_equal(np.asarray(t0.data).reshape(t0.shape[0], -1),
                              formats.quantize_weighted(x0, T.Q4_0, im.importance("blk.0.ffn_down.weight")))


def test_convert_with_calibration_text_computes_the_imatrix_first(tiny, tmp_path):
    d, path, text = tiny
    out = tmp_path / "cal.gguf"
    assert convert_cli.main([path, "-o", str(out), "--type", "q4_0", "--calibration", str(text),
                             "--calibration-ctx", "32", "--calibration-chunks", "2", "--quiet"]) == 0
    imx = tmp_path / "cal.imatrix.gguf"
    assert imatrix_cli.main([path, "-f", str(text), "-o", str(imx), "--ctx", "32", "--chunks", "2",
                             "--quiet"]) == 0
    ref = tmp_path / "ref.gguf"
    assert convert_cli.main([path, "-o", str(ref), "--type", "q4_0", "--imatrix", str(imx), "--quiet"]) == 0
    with formats.read_gguf(out) as a, formats.read_gguf(ref) as b:
        for name, t in a.tensors.items():
            assert np.array_equal(np.asarray(t.data), np.asarray(b.tensors[name].data)), name
        assert a.metadata["quantize.imatrix.chunks_count"] == 2
