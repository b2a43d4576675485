"""kiln convert and export_hf: Hugging Face checkpoints <-> GGUF.

The real SmolLM2 weights give a realistic checkpoint without any download: the shipped
GGUF is exported to a Hugging Face directory (dequantized, Q/K permuted back, tokenizer
files written) and converted again. Tiny random Llamas cover sharding, fallbacks and bad
inputs cheaply. transformers/torch and llama-cpp-python are outside oracles: their tests
skip when those are not installed.
"""
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import formats
from engine import convert
from engine.cli import convert as convert_cli
from engine.convert import streaming
from engine.convert.export_hf import export
from engine.convert.vocab import detect_pre
from engine.errors import ConvertError
from formats import GGMLType
from oracles import run_oracle

REPO = Path(__file__).resolve().parent.parent
TEXT = ("The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four "
        "papers that changed physics: on the photoelectric effect, Brownian motion, special "
        "relativity and the equivalence of mass and energy. def main():\n    print('hi')\n"
        "Residents of Paris enjoy croissants, café au lait and long walks along the Seine; "
        "the city has about 2.1 million inhabitants and more than 130 museums. ")


def _engine():
    import engine
    return engine


def run_convert(*argv):
    return convert_cli.main([str(a) for a in argv])


def tensors_of(path):
    with formats.read_gguf(path) as f:
        return {n: (t.type, tuple(t.shape), np.array(t.data)) for n, t in f.tensors.items()}


def metadata_of(path):
    with formats.read_gguf(path) as f:
        md = f.metadata
        return {k: (md[k], tuple(md.types[k])) for k in md}


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_hf(smollm2_path, tmp_path_factory):
    """SmolLM2 exported as an F32 Hugging Face checkpoint directory."""
    return export(smollm2_path, tmp_path_factory.mktemp("smol") / "hf", dtype="f32")


@pytest.fixture(scope="module")
def smol_requantized(smollm2_path, tmp_path_factory):
    """smol_requantized(typ) -> the shipped file converted by `kiln convert --type typ`,
    made once per module (several tests check the same conversion)."""
    made = {}

    def convert(typ):
        if typ not in made:
            out = tmp_path_factory.mktemp("smol-requant") / f"smol-{typ}.gguf"
            assert run_convert(smollm2_path, "-o", out, "--type", typ, "--quiet") == 0
            made[typ] = out
        return made[typ]
    return convert


@pytest.fixture(scope="module")
def smol_f32(smol_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smolf32") / "smol-f32.gguf"
    assert run_convert(smol_hf, "-o", out, "--type", "f32", "--quiet") == 0
    return out


def make_tiny_gguf(path, vocab_md, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128,
                   tied=False, seed=0):
    """A tiny random-weight llama GGUF carrying a real tokenizer's metadata."""
    rng = np.random.default_rng(seed)
    n_vocab = len(vocab_md["tokenizer.ggml.tokens"])
    hd = n_embd // n_head
    shapes = {"token_embd.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,)}
    if not tied:
        shapes["output.weight"] = (n_vocab, n_embd)
    for i in range(n_layer):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (n_embd,), f"blk.{i}.ffn_norm.weight": (n_embd,),
            f"blk.{i}.attn_q.weight": (n_head * hd, n_embd),
            f"blk.{i}.attn_k.weight": (n_head_kv * hd, n_embd),
            f"blk.{i}.attn_v.weight": (n_head_kv * hd, n_embd),
            f"blk.{i}.attn_output.weight": (n_embd, n_head * hd),
            f"blk.{i}.ffn_gate.weight": (n_ff, n_embd), f"blk.{i}.ffn_up.weight": (n_ff, n_embd),
            f"blk.{i}.ffn_down.weight": (n_embd, n_ff)})
    VT = formats.GGUFValueType
    with formats.GGUFWriter(path) as w:
        w.add_key("general.architecture", "llama")
        w.add_key("general.name", "tiny")
        for key, value in [("block_count", n_layer), ("context_length", 256),
                           ("embedding_length", n_embd), ("feed_forward_length", n_ff),
                           ("attention.head_count", n_head), ("attention.head_count_kv", n_head_kv),
                           ("rope.dimension_count", hd), ("vocab_size", n_vocab)]:
            w.add_key(f"llama.{key}", value, VT.UINT32)
        w.add_key("llama.attention.layer_norm_rms_epsilon", 1e-5, VT.FLOAT32)
        w.add_key("llama.rope.freq_base", 10000.0, VT.FLOAT32)
        for key in vocab_md:
            if key.startswith("tokenizer."):
                w.add_key(key, vocab_md[key], *vocab_md.types[key])
        for name, shape in shapes.items():
            w.add_tensor_info(name, GGMLType.F32, shape)
        w.write_header()
        for name, shape in shapes.items():
            if len(shape) == 1:
                w.write_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            else:
                w.write_tensor(name, (0.05 * rng.standard_normal(shape)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def smol_vocab(smollm2_path):
    with formats.read_gguf(smollm2_path) as f:
        md = f.metadata
        md["tokenizer.ggml.tokens"]  # decode the lazy arrays while the file is open
        md["tokenizer.ggml.merges"]
        return md


@pytest.fixture(scope="module")
def tiny_hf(smol_vocab, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_gguf(d / "tiny.gguf", smol_vocab)
    return export(d / "tiny.gguf", d / "hf", dtype="f32")


# -- round trip on the real weights -------------------------------------------------------

def test_smollm2_round_trip_f32_is_exact(smollm2_path, smol_f32):
    got = tensors_of(smol_f32)
    with formats.read_gguf(smollm2_path) as f:
        assert sorted(got) == sorted(f.tensors)
        for name, t in f.tensors.items():
            gtype, gshape, gdata = got[name]
            assert gtype == GGMLType.F32 and gshape == tuple(t.shape), name
            want = formats.dequantize(t.data, t.type, t.shape)
            assert np.array_equal(gdata, want), name
        orig = {k: (f.metadata[k], tuple(f.metadata.types[k])) for k in f.metadata}
    conv = metadata_of(smol_f32)
    for key, value in orig.items():
        if key.startswith("tokenizer.") or key.startswith("llama."):
            assert conv.get(key) == value, key
    assert conv["general.architecture"][0] == "llama"
    assert conv["general.file_type"][0] == 0


def test_smollm2_round_trip_requantized_is_identical_to_the_original(smollm2_path, smol_hf,
                                                                        tmp_path):
    # Q4_1 (and the Q8_0 embedding) re-quantized from their own dequantized values give
    # back the original blocks, so kiln's logits are those of the shipped file.
    out = tmp_path / "smol-q4_1.gguf"
    assert run_convert(smol_hf, "-o", out, "--type", "q4_1", "--quiet") == 0
    got = tensors_of(out)
    with formats.read_gguf(smollm2_path) as f:
        for name, t in f.tensors.items():
            assert got[name][0] == t.type, name
            assert np.array_equal(got[name][2].reshape(-1).view(np.uint8),
                                  np.asarray(t.data).reshape(-1).view(np.uint8)), name
    engine = _engine()
    tokens = list(range(1, 60))
    a = engine.LLM(str(smollm2_path), n_ctx=128).logits(tokens)
    b = engine.LLM(str(out), n_ctx=128).logits(tokens)
    np.testing.assert_array_equal(a, b)


def test_smollm2_f32_logits_match_the_original(smollm2_path, smol_f32):
    engine = _engine()
    orig = engine.LLM(str(smollm2_path), n_ctx=256)
    tokens = orig.tokenize(TEXT)[:96]
    conv = engine.LLM(str(smol_f32), n_ctx=256)
    assert conv.tokenize(TEXT)[:96] == tokens
    a, b = orig.logits(tokens), conv.logits(tokens)
    # Same weights; the Q4_1 file runs with Q8_1-quantized activations, F32 does not.
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
    assert np.abs(a - b).max() <= 0.1 * np.abs(a).max()


# -- transformers as the oracle ----------------------------------------------------------

def _torch():
    torch = pytest.importorskip("torch", reason="torch not installed (optional oracle)")
    pytest.importorskip("transformers", reason="transformers not installed (optional oracle)")
    torch.set_num_threads(2)
    return torch


def _assert_logits_close(kiln_logits, hf_logits):
    diff = np.abs(kiln_logits - hf_logits).max()
    assert diff <= 1e-3 * np.abs(hf_logits).max(), (diff, np.abs(hf_logits).max())


def kiln_tokenizer(path):
    from engine.tokenizer import load_tokenizer
    with formats.read_gguf(path) as f:
        return load_tokenizer(f.metadata)


@pytest.mark.oracle
def test_exported_tokenizer_tokenizes_like_the_gguf(smollm2_path, smol_hf, smol_f32):
    _torch()
    from transformers import AutoTokenizer
    text = TEXT + " <|im_start|>user\nHi 🦙 你好<|im_end|>\n\n  x = 1_000_000  "
    hf = AutoTokenizer.from_pretrained(smol_hf)
    want = kiln_tokenizer(smollm2_path).encode(text, special=True)
    assert kiln_tokenizer(smol_f32).encode(text, special=True) == want
    assert hf(text, add_special_tokens=True)["input_ids"] == want
    assert hf.decode(want) == text


@pytest.mark.oracle
def test_transformers_agrees_with_kiln_on_smollm2(smol_hf, smol_f32):
    torch = _torch()
    engine = _engine()
    from transformers import LlamaForCausalLM
    llm = engine.LLM(str(smol_f32), n_ctx=256)
    ids = llm.tokenize(TEXT * 2, add_bos=False)[:128]
    assert len(ids) == 128
    model = LlamaForCausalLM.from_pretrained(smol_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].numpy()
    _assert_logits_close(llm.logits(ids), hf)


@pytest.mark.oracle
def test_transformers_agrees_with_kiln_on_a_tiny_sentencepiece_llama(botchan, tmp_path):
    torch = _torch()
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM
    src = tmp_path / "hf"
    src.mkdir()
    spm.SentencePieceTrainer.train(input=str(botchan), model_prefix=str(src / "tokenizer"),
                                   vocab_size=800, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, num_threads=1, minloglevel=2,
                                   # Llama's settings: llama.cpp normalizes nothing
                                   normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True)
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    (src / "tokenizer.vocab").unlink()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=sp.vocab_size(), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the default init, so attention is not uniform
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(src)
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
         "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False}))
    out = tmp_path / "tiny-f32.gguf"
    assert run_convert(src, "-o", out, "--type", "f32", "--quiet") == 0
    md = metadata_of(out)
    assert md["tokenizer.ggml.model"][0] == "llama"
    assert md["tokenizer.ggml.add_bos_token"][0] is True
    assert md["tokenizer.ggml.bos_token_id"][0] == sp.bos_id() == 1
    assert md["tokenizer.ggml.tokens"][0][:sp.vocab_size()] == [
        sp.id_to_piece(i) for i in range(sp.vocab_size())]
    # and back: GGUF -> export_hf (tokenizer.model rebuilt) -> GGUF keeps the vocabulary
    again = tmp_path / "again.gguf"
    assert run_convert(export(out, tmp_path / "hf2"), "-o", again, "--type", "f32",
                       "--quiet") == 0
    md2 = metadata_of(again)
    assert {k: v for k, v in md.items() if k.startswith("tokenizer.")} == {
        k: v for k, v in md2.items() if k.startswith("tokenizer.")}
    text = botchan.read_text(encoding="utf-8")[5000:7000]
    ids = kiln_tokenizer(out).encode(text)[:128]
    assert ids == ([sp.bos_id()] + sp.encode(text))[:128]
    engine = _engine()
    llm = engine.LLM(str(out), n_ctx=256)
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].numpy()
    _assert_logits_close(llm.logits(ids), hf)


# -- sharded BF16 checkpoints ------------------------------------------------------------

def test_three_bf16_shards_convert_like_one_file(smol_vocab, tmp_path):
    make_tiny_gguf(tmp_path / "t.gguf", smol_vocab, seed=3)
    one = export(tmp_path / "t.gguf", tmp_path / "one", dtype="bf16")
    three = export(tmp_path / "t.gguf", tmp_path / "three", dtype="bf16", shards=3)
    index = json.loads((three / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (three / "model.safetensors").exists()
    for d in (one, three):
        assert run_convert(d, "-o", tmp_path / f"{d.name}.gguf", "--type", "q8_0", "--quiet") == 0
    a, b = tensors_of(tmp_path / "one.gguf"), tensors_of(tmp_path / "three.gguf")
    assert list(a) == list(b)
    for name in a:
        assert a[name][:2] == b[name][:2] and np.array_equal(a[name][2], b[name][2]), name
    ma, mb = metadata_of(tmp_path / "one.gguf"), metadata_of(tmp_path / "three.gguf")
    ma.pop("general.name"), mb.pop("general.name")
    assert ma == mb
    # BF16 weights widened exactly: the F32 conversion equals the bf16-rounded original
    assert run_convert(three, "-o", tmp_path / "f32.gguf", "--type", "f32", "--quiet") == 0
    src = tensors_of(tmp_path / "t.gguf")["blk.1.ffn_up.weight"][2]
    got = tensors_of(tmp_path / "f32.gguf")["blk.1.ffn_up.weight"][2]
    want = formats.dequantize(formats.quantize(src, GGMLType.BF16), GGMLType.BF16, src.shape)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("typ", ["f32", "bf16", "q4_0"])
def test_tensors_are_streamed_in_row_chunks(tiny_hf, tmp_path, monkeypatch, typ):
    """No tensor is ever handed to the writer whole (peak memory is a chunk, not the
    largest tensor), and the chunking does not change a byte of the output."""
    assert run_convert(tiny_hf, "-o", tmp_path / "whole.gguf", "--type", typ, "--quiet") == 0
    n_embd = 64  # make_tiny_gguf's default: each chunk is at most 3 rows of float32
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 3 * 4 * n_embd)
    chunks, wholes = [], []
    chunk, whole = formats.GGUFWriter.write_tensor_chunk, formats.GGUFWriter.write_tensor
    monkeypatch.setattr(formats.GGUFWriter, "write_tensor_chunk",
                        lambda w, name, data: (chunks.append((name, np.asarray(data).nbytes)),
                                               chunk(w, name, data))[1])
    monkeypatch.setattr(formats.GGUFWriter, "write_tensor",
                        lambda w, name, data: (wholes.append(name), whole(w, name, data))[1])
    assert run_convert(tiny_hf, "-o", tmp_path / "chunked.gguf", "--type", typ, "--quiet") == 0
    assert wholes == []
    row_bytes = formats.row_nbytes(convert.OUT_TYPES[typ], n_embd)
    assert max(n for _, n in chunks) <= 3 * max(row_bytes, 4 * n_embd)
    assert sum(1 for name, _ in chunks if name == "token_embd.weight") > 10
    assert (tmp_path / "chunked.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()


# -- types, fallbacks, output lines ------------------------------------------------------

def test_type_rules_notes_and_output_lines(smol_vocab, tmp_path, capsys):
    # n_ff = 48: ffn_down rows (length 48) cannot be blocked by 32 -> F16 with a note
    make_tiny_gguf(tmp_path / "t.gguf", smol_vocab, n_ff=48, tied=True)
    hf = export(tmp_path / "t.gguf", tmp_path / "hf")
    assert "lm_head.weight" not in (hf / "model.safetensors").read_bytes()[:4096].decode(
        "utf-8", "replace")
    capsys.readouterr()
    assert run_convert(hf, "-o", tmp_path / "q4.gguf", "--type", "q4_0") == 0
    out, err = capsys.readouterr()
    # one line for both layers' ffn_down (grouped notes)
    assert ("note: 2 tensors (blk.0.ffn_down.weight, ...): row length 48 is not a multiple "
            "of 32; stored as F16 instead of Q4_0") in err
    assert err.count("note:") == 1
    line = next(ln for ln in out.splitlines() if "blk.0.attn_q.weight" in ln and "->" in ln)
    assert "64x64" in line and "F32 -> Q4_0" in line and "rmse" in line
    assert "bits per weight" in out and "MiB" in out
    t = tensors_of(tmp_path / "q4.gguf")
    assert "output.weight" not in t  # tied: written once
    assert t["token_embd.weight"][0] == GGMLType.Q8_0  # --embed-type default for 4-bit
    assert t["blk.0.attn_norm.weight"][0] == GGMLType.F32
    assert t["blk.0.ffn_down.weight"][0] == GGMLType.F16
    assert t["blk.0.ffn_up.weight"][0] == GGMLType.Q4_0
    assert metadata_of(tmp_path / "q4.gguf")["general.file_type"][0] == 2

    assert run_convert(hf, "-o", tmp_path / "q4e.gguf", "--type", "q4_1", "--embed-type",
                       "q4_1", "--quiet") == 0
    out, err = capsys.readouterr()
    assert "rmse" not in out + err and "->" not in out + err and "bits per weight" in out
    assert tensors_of(tmp_path / "q4e.gguf")["token_embd.weight"][0] == GGMLType.Q4_1


def test_gguf_requantization_keeps_metadata(smollm2_path, smol_requantized):
    out = smol_requantized("q8_0")
    a, b = metadata_of(smollm2_path), metadata_of(out)
    assert b.pop("general.file_type")[0] == 7
    a.pop("general.file_type")
    assert a == b
    t = tensors_of(out)
    assert {t[n][0] for n in t if len(t[n][1]) == 2} == {GGMLType.Q8_0}


def test_tools_script_is_the_same_program(tiny_hf, tmp_path):
    out = tmp_path / "s.gguf"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert.py"), str(tiny_hf),
                           "-o", str(out), "--type", "f16", "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert tensors_of(out)["blk.0.attn_q.weight"][0] == GGMLType.F16


# -- bad inputs: one exact line, nothing written -----------------------------------------

def _write_raw_safetensors(path, header, data):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _case_architecture(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    return (f"error: {d}/config.json: unsupported architecture 'GPT2LMHeadModel'; "
            f"supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
            f"Qwen3ForCausalLM, Phi3ForCausalLM, Gemma3ForCausalLM, "
            f"Gemma3ForConditionalGeneration")


def _case_tokenizer(d):
    (d / "tokenizer.json").unlink()
    return (f"error: {d}: no tokenizer found; supported: tokenizer.model (SentencePiece) "
            f"or tokenizer.json (byte-level BPE)")


def _case_missing_shard(d):
    with formats.safetensors.SafetensorsFile(d / "model.safetensors") as st:
        names = list(st.tensors)
    index = {"metadata": {}, "weight_map": {
        n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}}
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return (f"error: {d}/model.safetensors.index.json lists shard "
            f"model-00002-of-00002.safetensors but {d}/model-00002-of-00002.safetensors "
            f"is missing")


def _case_dtype(d):
    with formats.safetensors.SafetensorsFile(d / "model.safetensors") as st:
        header, blobs, off = {}, [], 0
        for name, info in st.tensors.items():
            if name == "model.norm.weight":  # stored as float64: not readable
                data = st.tensor(name).astype(np.float64).tobytes()
                dtype = "F64"
            else:
                data = st.tensor(name).tobytes()
                dtype = info.dtype
            header[name] = {"dtype": dtype, "shape": list(info.shape),
                            "data_offsets": [off, off + len(data)]}
            blobs.append(data)
            off += len(data)
    _write_raw_safetensors(d / "model.safetensors", header, b"".join(blobs))
    return (f"error: {d}/model.safetensors: tensor 'model.norm.weight' has dtype F64; "
            f"supported: F32, F16, BF16")


@pytest.mark.parametrize("case", [_case_architecture, _case_tokenizer, _case_missing_shard,
                                  _case_dtype, "output_is_weights"])
def test_bad_inputs_fail_with_one_line_and_write_nothing(tiny_hf, tmp_path, capsys, case):
    d = tmp_path / "src"
    shutil.copytree(tiny_hf, d)
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    if case == "output_is_weights":
        out = d / "model.safetensors"
        expected = (f"error: output {out} is a file of the source ({out}); kiln never "
                    f"writes over its inputs: give another output path")
    else:
        expected = case(d)
    before = {p: p.stat().st_mtime_ns for p in d.iterdir()}
    capsys.readouterr()
    assert run_convert(d, "-o", out, "--type", "q4_0") == 1
    captured = capsys.readouterr()
    assert captured.err == expected + "\n"
    assert captured.out == ""
    if out.parent != d:
        assert list(out.parent.iterdir()) == []
    assert {p: p.stat().st_mtime_ns for p in d.iterdir()} == before


# -- llama.cpp as the oracle -------------------------------------------------------------

_LLAMA_CPP_SCRIPT = """
import json, sys
import llama_cpp
path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ref = llama_cpp.Llama(path, n_ctx=128, n_threads=2, verbose=False)
toks = ref.tokenize(prompt.encode(), add_bos=False, special=False)
out = []
for t in ref.generate(toks, temp=0.0, top_k=1, reset=True):
    out.append(t)
    if len(out) == n:
        break
print(json.dumps({"tokens": out, "text": ref.detokenize(out).decode("utf-8", "replace")}))
"""


def llama_cpp_greedy(path, prompt, n=16):
    """llama.cpp's greedy tokens, run in a child process: a llama.cpp build made for another
    CPU dies of SIGILL, which must skip this check rather than kill the test run."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    proc = run_oracle([sys.executable, "-c", _LLAMA_CPP_SCRIPT, str(path), prompt, str(n)],
                      timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROMPT = "The capital of France is"


@pytest.mark.oracle
@pytest.mark.parametrize("typ", ["q4_0", "q4_1", "q8_0", "f16"])
def test_llama_cpp_generates_what_kiln_generates(smol_requantized, typ):
    out = smol_requantized(typ)
    want = llama_cpp_greedy(out, PROMPT)["tokens"]
    engine = _engine()
    llm = engine.LLM(str(out), n_ctx=128)
    got = llm.generate(PROMPT, max_tokens=16, temperature=0, ignore_eos=True).tokens
    if got != want:
        # Two engines that round differently (Q8 activations, summation order) may break a
        # near-tie differently; anything else is a real disagreement about the file.
        n = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        logits = llm.logits(llm.tokenize(PROMPT) + got[:n])[-1]
        gap = abs(float(logits[got[n]] - logits[want[n]]))
        assert gap <= 0.01 * float(np.abs(logits).max()), (n, got, want, gap)


@pytest.mark.oracle
def test_llama_cpp_runs_a_converted_hf_checkpoint(smol_hf, smol_requantized, tmp_path):
    out = tmp_path / "from-hf-q8.gguf"
    assert run_convert(smol_hf, "-o", out, "--type", "q8_0", "--quiet") == 0
    got = llama_cpp_greedy(out, PROMPT, 8)
    assert "Paris" in got["text"]
    # through the HF directory, llama.cpp gets the same model as the shipped file requantized
    ref = smol_requantized("q8_0")
    assert llama_cpp_greedy(ref, PROMPT, 8) == got


def test_gguf_source_errors(smol_vocab, tmp_path, capsys):
    src = make_tiny_gguf(tmp_path / "t.gguf", smol_vocab)
    capsys.readouterr()
    assert run_convert(src, "-o", src, "--type", "q8_0") == 1
    assert capsys.readouterr().err == (f"error: output {src} is a file of the source ({src}); "
                                       f"kiln never writes over its inputs: give another output "
                                       f"path\n")
    assert run_convert(tmp_path / "nope", "-o", tmp_path / "o.gguf") == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: no such file or directory\n"
    (tmp_path / "junk.bin").write_bytes(b"not a model")
    assert run_convert(tmp_path / "junk.bin", "-o", tmp_path / "o.gguf") == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'junk.bin'}: not a GGUF file or a "
                                       f"Hugging Face model directory\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.bin", "t.gguf"]


@pytest.mark.oracle
def test_llama3_rope_scaling_writes_rope_freqs_like_transformers(tiny_hf, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(tiny_hf, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (d / "config.json").write_text(json.dumps(cfg))
    assert run_convert(d, "-o", tmp_path / "r.gguf", "--type", "f32", "--quiet") == 0
    factors = tensors_of(tmp_path / "r.gguf")["rope_freqs.weight"][2]
    hd = cfg["head_dim"]
    inv = cfg["rope_theta"] ** (-np.arange(0, hd, 2) / hd) / factors
    assert factors.shape == (hd // 2,) and factors[0] == 1.0 and factors[-1] == 8.0
    assert ((factors > 1.0) & (factors < 8.0)).any()  # the blended middle band
    _torch()
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    want = LlamaRotaryEmbedding(LlamaConfig(**{k: v for k, v in cfg.items()
                                               if k != "architectures"})).inv_freq.numpy()
    np.testing.assert_allclose(inv, want, rtol=1e-5)


def test_merges_in_pair_format_read_like_strings(tiny_hf, tmp_path):
    # transformers >= 4.45 saves merges as [left, right] pairs
    d = tmp_path / "hf"
    shutil.copytree(tiny_hf, d)
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    tj["model"]["merges"] = [m.split(" ") for m in tj["model"]["merges"]]
    (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    assert run_convert(tiny_hf, "-o", tmp_path / "a.gguf", "--type", "f16", "--quiet") == 0
    assert run_convert(d, "-o", tmp_path / "b.gguf", "--type", "f16", "--quiet") == 0
    a, b = metadata_of(tmp_path / "a.gguf"), metadata_of(tmp_path / "b.gguf")
    assert len(a["tokenizer.ggml.merges"][0]) == 48900
    assert a["tokenizer.ggml.merges"] == b["tokenizer.ggml.merges"]
    assert a["tokenizer.ggml.pre"] == b["tokenizer.ggml.pre"] == ("smollm", a["tokenizer.ggml.pre"][1])


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt-2"])
def test_pre_tokenizer_named_by_structure_when_the_vocabulary_is_new(pre):
    # A vocabulary of just the 256 byte symbols: no known hash, so the structure decides.
    from tokenizers.pre_tokenizers import ByteLevel
    from engine.convert.export_hf import bpe_tokenizer_json
    md = {"tokenizer.ggml.tokens": sorted(ByteLevel.alphabet()), "tokenizer.ggml.pre": pre,
          "tokenizer.ggml.token_type": [1] * 256, "tokenizer.ggml.merges": []}
    tj = bpe_tokenizer_json(md)
    assert detect_pre(tj, Path("tokenizer.json")) == pre
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}
    with pytest.raises(ConvertError, match=r"tokenizer.json: unrecognized BPE "
                       r"pre-tokenizer \(check hash [0-9a-f]{16}\); supported: smollm, "
                       r"llama-bpe, qwen2, gpt-2"):
        detect_pre(tj, Path("tokenizer.json"))


def test_a_failure_mid_write_leaves_no_file(tiny_hf, tmp_path, monkeypatch):
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    out.write_bytes(b"previous")
    calls = []

    def failing_encode(x, t, imatrix=None):
        calls.append(t)
        if len(calls) == 5:
            raise MemoryError("simulated")
        return formats.quantize(x, t)
    monkeypatch.setattr(streaming, "encode_rows", failing_encode)
    with pytest.raises(MemoryError):
        run_convert(tiny_hf, "-o", out, "--type", "q8_0", "--quiet")
    assert out.read_bytes() == b"previous"  # the old file is untouched, no temp file left
    assert [p.name for p in out.parent.iterdir()] == ["m.gguf"]


def test_tools_export_hf_script_round_trips(tmp_path):
    """`python tools/export_hf.py GGUF OUTDIR --dtype --shards` as a user runs it: the
    directory converts back to the same tensors, and bad input is one line, exit 1."""
    from tiny_models import make_tiny_llama
    src = make_tiny_llama(tmp_path / "tiny.gguf", ftype="f32", tied=False)
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), src, str(out),
                        "--dtype", "f32", "--shards", "2"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob("model-*.safetensors"))) == 2
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    back = tmp_path / "back.gguf"
    assert run_convert(out, "-o", back, "--type", "f32", "--quiet") == 0
    want, got = tensors_of(src), tensors_of(back)
    assert sorted(got) == sorted(want)
    with formats.read_gguf(src) as a, formats.read_gguf(back) as b:
        for name in want:
            np.testing.assert_array_equal(np.asarray(b.tensors[name].data),
                                          np.asarray(a.tensors[name].data), err_msg=name)
    r = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"),
                        str(tmp_path / "missing.gguf"), str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
