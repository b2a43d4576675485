"""qwen2 and qwen3, end to end: tiny random-weight models built here with transformers
(Qwen2Config with its Q/K/V biases and a tied output; Qwen3Config with Q/K norms and a
head size other than hidden / heads), saved as safetensors with a Qwen-style byte-level
BPE tokenizer.json, converted by kiln and run by kiln, transformers and llama.cpp.

- F32: kiln's logits match transformers' within 1e-3 x max|logit| at every position, and
  the same check fails when any of the family's variations (NEOX RoPE, the biases, the
  Q/K norms) is dropped from the reference: the comparison sees each of them;
- F16: llama.cpp loads kiln's file and agrees with kiln (mean KL < 1e-4); Q8_0 and
  Q4_K_M: kiln is within llama.cpp's own flash-attention-vs-default envelope;
- quantized: the NumPy reference reproduces the C engine bit for bit, on the converted
  files and (every ISA variant, 1 and 2 threads, batched, chunked and token by token) on
  tiny_models' qwen2/qwen3 files, which need no oracle;
- the qwen2 pre-tokenizer tokenizes a varied corpus as llama.cpp does, and chat renders
  the file's ChatML template and stops at <|im_end|>.
"""
import copy
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

import ckernels
import formats
from cpu_isas import expected_isas
from engine import LLM
from engine.arch import ROPE_NORM
from engine.cli import convert as convert_cli
from engine.config import ModelConfig
from engine.errors import ModelError
from engine.model import Model
from engine.reference import ReferenceModel
from oracles import run_oracle
from test_agreement_llamacpp import KL_FACTOR, distance, top1_floor
from test_tokenizer import CORPUS, fuzz_texts
from tiny_models import SUPER_BLOCK_SHAPE, make_tiny_llama, mean_kl, needs_super_blocks

# Qwen2's tokenizer.json pre-tokenizer regex (what llama.cpp calls the qwen2 pre-tokenizer)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2-Instruct's template: a default system prompt, ChatML turns
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TRAIN_TEXT = "\n".join(CORPUS) * 3
N_TOKENS = 160

# Widths in whole super-blocks of 256 for Q4_K_M, but for qwen3's attn_output (4 heads
# of 96 = 384 wide: llama.cpp's Q5_0 fallback); qwen3's head of 96 is not hidden / heads
# (64), so key_length is written and read.
SHAPES = {
    "qwen2": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=96,
                  tie_word_embeddings=False),
}


def _oracles():
    torch = pytest.importorskip("torch", reason="torch not installed (optional oracle)")
    pytest.importorskip("transformers", reason="transformers not installed (optional oracle)")
    pytest.importorskip("tokenizers", reason="tokenizers not installed")
    torch.set_num_threads(2)
    return torch


def write_qwen_tokenizer(d):
    """A Qwen-style tokenizer.json (byte-level BPE learned from the corpus, Qwen2's split
    regex, ChatML special tokens after the vocabulary) and tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TRAIN_TEXT], trainer)
    tok.add_special_tokens(SPECIALS)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "add_prefix_space": False, "chat_template": QWEN_TEMPLATE}))
    return tok.get_vocab_size()


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def qwen(request, tmp_path_factory):
    """(arch, HF model, directory of the checkpoint, {type: converted GGUF path})."""
    torch = _oracles()
    import transformers
    arch = request.param
    d = tmp_path_factory.mktemp(arch) / "hf"
    d.mkdir()
    n_vocab = write_qwen_tokenizer(d)
    cls = {"qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    ids = {t: n_vocab - len(SPECIALS) + i for i, t in enumerate(SPECIALS)}
    cfg = getattr(transformers, cls + "Config")(
        vocab_size=n_vocab, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=10000.0, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        **SHAPES[arch])
    torch.manual_seed(0)
    model = getattr(transformers, cls + "ForCausalLM")(cfg).eval()
    with torch.no_grad():  # larger than the default init, so attention is not uniform;
        for name, p in model.named_parameters():  # biases and norms far from 0 and 1
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(d, safe_serialization=True)
    out = {}
    for typ in ("f32", "f16", "q8_0", "q4_k_m"):
        out[typ] = d.parent / f"{arch}-{typ}.gguf"
        assert convert_cli.main([str(d), "-o", str(out[typ]), "--type", typ, "--quiet"]) == 0
    return arch, model, d, out


def tokens_for(path, n=N_TOKENS):
    return np.random.default_rng(3).integers(0, ReferenceModel(path).config.n_vocab, n)


@pytest.mark.oracle
def test_converted_metadata_is_what_llama_cpp_reads(qwen):
    arch, model, _, files = qwen
    with formats.read_gguf(files["f32"]) as f:
        md, names = f.metadata, set(f.tensors)
        assert md["general.architecture"] == arch
        c = model.config
        for key, want in [("context_length", 512), ("embedding_length", c.hidden_size),
                          ("block_count", 2), ("feed_forward_length", c.intermediate_size),
                          ("attention.head_count", 4), ("attention.head_count_kv", 2)]:
            assert md[f"{arch}.{key}"] == want, key
        assert md[f"{arch}.rope.freq_base"] == 10000.0
        assert md[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
        assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "qwen2"
        assert md["tokenizer.chat_template"] == QWEN_TEMPLATE
        if arch == "qwen3":
            assert md["qwen3.attention.key_length"] == md["qwen3.attention.value_length"] == 96
            assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight",
                    "output.weight"} <= names
            assert f.tensors["blk.0.attn_q_norm.weight"].shape == (96,)
        else:
            assert "qwen2.attention.key_length" not in md and "output.weight" not in names
            assert {"blk.1.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"} <= names
            assert f.tensors["blk.0.attn_k.bias"].type == formats.GGMLType.F32
        # NEOX: Q rows exactly as the checkpoint has them, not permuted
        q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
        np.testing.assert_array_equal(np.asarray(f.tensors["blk.0.attn_q.weight"].data), q)


def without(ref, config=None, **layer_fields):
    """A copy of the reference model with another config or other layer fields."""
    new = copy.copy(ref)
    new.config = config or ref.config
    new.layers = []
    for L in ref.layers:
        new.layers.append(copy.copy(L))
        for k, v in layer_fields.items():
            setattr(new.layers[-1], k, v)
    return new


@pytest.mark.oracle
def test_kiln_matches_transformers_in_f32(qwen):
    torch = _oracles()
    arch, model, _, files = qwen
    tokens = tokens_for(files["f32"])
    with torch.no_grad():
        hf = model(torch.from_numpy(tokens)[None]).logits[0].numpy()
    with Model(files["f32"], n_ctx=N_TOKENS, n_threads=2) as m:
        ours = m.eval(tokens, 0, logits_all=True)
    bound = 1e-3 * np.abs(hf).max()
    assert np.abs(ours - hf).max() <= bound, (np.abs(ours - hf).max(), bound)

    # Each variation matters: the reference without it is far outside that bound.
    ref = ReferenceModel(files["f32"], emulate_q8=False)
    np.testing.assert_allclose(ref(tokens), hf, rtol=0, atol=bound)
    c = ref.config
    broken = {"interleaved RoPE": without(ref, config=dataclasses.replace(
        c, arch=dataclasses.replace(c.arch, rope=ROPE_NORM)))}
    if c.attn_qkv_bias:
        broken["no Q/K/V bias"] = without(ref, q_bias=0, k_bias=0, v_bias=0)
    if c.attn_qk_norm:
        broken["no Q/K norm"] = without(ref, q_norm=None, k_norm=None)
    assert len(broken) == 2
    for what, wrong in broken.items():
        assert np.abs(wrong(tokens) - hf).max() > 20 * bound, what


QWEN_TEXTS = CORPUS + fuzz_texts(60, seed=99) + [
    "0123456789 9876543210 3.14 1,234,567 ٣٤٥ ２０２４", "我想在apple工作1314151天～",
    "emoji 🦙🦙 🚀 (normal) 😶‍🌫️", "   \n\n\t  x\r\n\r\n    y   ", "I've 'RE 'M We'Ve a'lL",
    "def f(x):\n\treturn [i**2 for i in range(x)]  # 2 spaces\n",
]


# One llama.cpp process per model for all its runs: teacher-forced logits of the F16 file
# and of the quantized files (default and flash-attention paths), and the tokenization
# of QWEN_TEXTS with the file's vocabulary alone.
LLAMA_CHILD = """
import json, sys
import numpy as np
from llama_cpp import Llama
jobs = json.load(open(sys.argv[1], encoding="utf-8"))
for path, flash, n, out in jobs["logits"]:
    ids = np.load(jobs["ids"])[:n].tolist()
    llm = Llama(path, n_ctx=len(ids) + 8, n_batch=len(ids), n_threads=2, logits_all=True,
                flash_attn=flash, verbose=False)
    llm.eval(ids)
    np.save(out, np.asarray(llm.scores[:len(ids)], dtype=np.float32))
    llm.close()
llm = Llama(jobs["vocab"], vocab_only=True, verbose=False)
json.dump([[llm.tokenize(t.encode("utf-8"), add_bos=False, special=s) for s in (False, True)]
           for t in jobs["texts"]], open(jobs["tokens"], "w"))
"""
QUANTIZED = {"q8_0": 256, "q4_k_m": 256}  # type -> tokens of the envelope check


@pytest.fixture(scope="module")
def llama_cpp(qwen, tmp_path_factory):
    """{(type, flash): llama.cpp's logits} over tokens_for(...) and {"tokens": ids of
    QWEN_TEXTS without and with special-token parsing}."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the outside oracle")
    files = qwen[3]
    d = tmp_path_factory.mktemp("llamacpp")
    np.save(d / "ids.npy", tokens_for(files["f16"], max(N_TOKENS, *QUANTIZED.values())))
    runs = [("f16", False, N_TOKENS)] + [(t, flash, n) for t, n in QUANTIZED.items()
                                         for flash in (False, True)]
    jobs = {"ids": str(d / "ids.npy"), "vocab": str(files["f32"]), "texts": QWEN_TEXTS,
            "tokens": str(d / "tokens.json"),
            "logits": [(str(files[t]), flash, n, str(d / f"{t}-{int(flash)}.npy"))
                       for t, flash, n in runs]}
    (d / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    run_oracle([sys.executable, "-c", LLAMA_CHILD, str(d / "jobs.json")], timeout=600)
    out = {(t, flash): np.load(d / f"{t}-{int(flash)}.npy") for t, flash, _ in runs}
    out["tokens"] = json.loads((d / "tokens.json").read_text())
    return out


def kiln_logits(path, tokens):
    with Model(path, n_ctx=len(tokens), n_threads=2) as m:
        return m.eval(tokens, 0, logits_all=True)


@pytest.mark.oracle
def test_llama_cpp_runs_the_f16_file_as_kiln_does(qwen, llama_cpp):
    arch, _, _, files = qwen
    kl = mean_kl(llama_cpp["f16", False], kiln_logits(files["f16"], tokens_for(files["f16"])))
    print(f"{arch} F16: kiln vs llama.cpp mean KL {kl:.2e}")
    assert kl < 1e-4


@pytest.mark.oracle
@pytest.mark.parametrize("typ", QUANTIZED)
def test_quantized_files_within_llama_cpps_envelope(qwen, llama_cpp, typ):
    arch, _, _, files = qwen
    default, flash = llama_cpp[typ, False], llama_cpp[typ, True]
    env_kl, env_top1 = distance(default, flash)
    kl, top1 = distance(default, kiln_logits(files[typ], tokens_for(files[typ], QUANTIZED[typ])))
    print(f"{arch} {typ}: kiln KL {kl:.2e} top-1 {top1:.3f}; llama.cpp flash-attn vs "
          f"default KL {env_kl:.2e} top-1 {env_top1:.3f}")
    assert env_kl > 0
    assert kl <= KL_FACTOR * env_kl, (kl, env_kl)
    assert top1 >= top1_floor(env_top1, len(default) - 1), (top1, env_top1)


def check_bit_exact(path, tokens, isas):
    """The reference's logits = the engine's, bit for bit, under each ISA variant, 1 and 2
    threads, the prompt in one call, in chunks of 16, and token by token."""
    want = ReferenceModel(path)(tokens)
    for isa in isas:
        ckernels.set_isa(isa)
        for n_threads in (1, 2):
            with Model(path, n_ctx=len(tokens), n_threads=n_threads, n_batch=16) as m:
                chunked = m.eval(tokens, 0, logits_all=True)
                single = np.stack([m.eval(tokens[i:i + 1], i) for i in range(len(tokens))])
            with Model(path, n_ctx=len(tokens), n_threads=n_threads) as m:
                batched = m.eval(tokens, 0, logits_all=True)
            for got in (batched, chunked, single):
                np.testing.assert_array_equal(got, want, err_msg=f"{isa} {n_threads}")


@pytest.mark.oracle
@pytest.mark.parametrize("typ", ["q8_0", "q4_k_m"])
def test_reference_reproduces_the_engine_on_converted_files(qwen, typ, isa_restored):
    path = qwen[3][typ]
    check_bit_exact(path, tokens_for(path, 37), [ckernels.active_isa()])


# arch, weight type, n_head, n_head_kv, head_dim (tiny_models files: no oracle needed)
TINY = [("qwen2", "q8_0", 4, 2, 16), ("qwen2", "q4_k", 4, 1, 64), ("qwen3", "q4_1", 6, 2, 48),
        ("qwen3", "q6_k", 4, 2, 128)]


@pytest.mark.parametrize("arch,ftype,n_head,n_head_kv,head_dim", TINY,
                         ids=lambda v: str(v))
def test_every_isa_thread_count_and_split_is_bit_exact(tmp_path, arch, ftype, n_head,
                                                       n_head_kv, head_dim, isa_restored):
    shape = (SUPER_BLOCK_SHAPE if needs_super_blocks(ftype) else dict(n_embd=64, n_ff=96))
    path = make_tiny_llama(tmp_path / "m.gguf", arch=arch, ftype=ftype, seed=5,
                           **dict(shape, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim))
    assert ReferenceModel(path).config.arch.name == arch
    tokens = np.random.default_rng(1).integers(0, 400, 37)
    check_bit_exact(path, tokens, expected_isas())


def test_a_missing_variation_tensor_is_named(tmp_path):
    path = make_tiny_llama(tmp_path / "m.gguf", arch="qwen3")
    with formats.read_gguf(path) as f:
        tensors = [(t.name, t.type, tuple(t.shape), np.array(t.data)) for t in f.tensors.values()
                   if t.name != "blk.1.attn_k_norm.weight"]
        formats.write_gguf(tmp_path / "bad.gguf", f.metadata, tensors)
    with pytest.raises(ModelError, match="blk.1.attn_k_norm.weight"):
        Model(tmp_path / "bad.gguf")


def test_config_reads_the_prefixed_keys_and_the_variations():
    md = {"general.architecture": "qwen3", "qwen3.block_count": 28,
          "qwen3.context_length": 40960, "qwen3.embedding_length": 1024,
          "qwen3.feed_forward_length": 3072, "qwen3.attention.head_count": 16,
          "qwen3.attention.head_count_kv": 8, "qwen3.attention.key_length": 128,
          "qwen3.attention.value_length": 128, "qwen3.rope.freq_base": 1e6,
          "qwen3.attention.layer_norm_rms_epsilon": 1e-6, "tokenizer.ggml.tokens": ["a"] * 9}
    c = ModelConfig.from_metadata(md, ["token_embd.weight"])
    assert (c.head_dim, c.n_embd_q, c.rope_dim, c.n_ctx_train, c.n_vocab) == (
        128, 2048, 128, 40960, 9)
    assert c.rope_neox and c.attn_qk_norm and not c.attn_qkv_bias and c.tied_output
    md2 = dict({k.replace("qwen3", "qwen2"): v for k, v in md.items()},
               **{"general.architecture": "qwen2"})
    c2 = ModelConfig.from_metadata(md2)
    assert c2.rope_neox and c2.attn_qkv_bias and not c2.attn_qk_norm
    with pytest.raises(ModelError, match="'mamba'.*'llama'.*'qwen2'.*'qwen3'"):
        ModelConfig.from_metadata(dict(md, **{"general.architecture": "mamba"}))




@pytest.mark.oracle
def test_qwen2_pre_tokenizer_matches_llama_cpp(qwen, llama_cpp):
    from engine.tokenizer import load_tokenizer
    want = llama_cpp["tokens"]
    with formats.read_gguf(qwen[3]["f32"]) as f:
        tok = load_tokenizer(f.metadata)
    bad = [(t, s) for t, w in zip(QWEN_TEXTS, want) for s in (False, True)
           if tok.encode(t, add_bos=False, special=s) != w[s]]
    assert bad == []
    # digits are split one by one (the qwen2 regex), CJK and emoji survive as bytes
    assert len(tok.encode("12345", add_bos=False)) == 5
    assert tok.decode(tok.encode("我想 🦙", add_bos=False)) == "我想 🦙"


@pytest.mark.oracle
def test_tokenizer_kinds_and_end_of_turn(qwen):
    arch, _, _, files = qwen
    with LLM(str(files["q8_0"]), n_ctx=64, n_threads=1) as llm:
        tok = llm.tokenizer
        im_end = tok.encode("<|im_end|>", add_bos=False, special=True)
        assert len(im_end) == 1 and im_end[0] in tok.eog_ids and not tok.add_bos


@pytest.mark.oracle
def test_chat_renders_the_file_template_and_stops_at_im_end(qwen, tmp_path):
    """A copy of the F32 model whose every next token is <|im_end|> (one embedding
    dimension constant and large, read most by <|im_end|>'s output row): the chat prompt
    is the file's template, and the reply ends at once with finish_reason "stop"."""
    from engine.chat import template_for, tokenize_prompt
    arch, _, _, files = qwen
    src, path = files["f32"], tmp_path / "ends-turns.gguf"
    with formats.read_gguf(src) as f:
        md = f.metadata
        im_end = list(md["tokenizer.ggml.tokens"]).index("<|im_end|>")
        out_name = "output.weight" if "output.weight" in f.tensors else "token_embd.weight"
        tensors = []
        for t in f.tensors.values():
            data = np.array(t.data)
            if t.name == "token_embd.weight":
                data[:, 0] = 30.0
            if t.name == out_name:
                data[im_end] = 0.0
                data[im_end, 0] = 90.0  # 3x the other rows' 30 when tied
            tensors.append((t.name, t.type, tuple(t.shape), data))
        formats.write_gguf(path, md, tensors)
    messages = [{"role": "user", "content": "Hi there"}]
    with LLM(str(path), n_ctx=128, n_threads=2) as llm:
        template = template_for(llm)
        text = template.render(messages, add_generation_prompt=True)
        assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
        ids = tokenize_prompt(llm, template, text)
        im_start = list(llm.tokenizer.encode("<|im_start|>", add_bos=False, special=True))
        assert len(im_start) == 1 and ids[0] == im_start[0]  # no BOS: the file adds none
        assert ids.count(im_start[0]) == 3 and ids.count(im_end) == 2
        out = llm.chat(messages, max_tokens=8, temperature=0)
        assert out.finish_reason == "stop" and out.tokens == [] and out.text == ""
    # `kiln chat`, piped: one (empty) reply per line, then a clean exit at end of input
    r = subprocess.run([sys.executable, "-m", "engine", "chat", str(path), "--ctx", "128",
                        "--threads", "1"], input="Hi there\nAgain\n", capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "\n\n"


def test_kiln_info_describes_the_file(tmp_path):
    from engine.cli.info import model_info
    path = make_tiny_llama(tmp_path / "m.gguf", arch="qwen3", head_dim=48, ftype="q8_0")
    info = model_info(path)
    assert info["architecture"] == "qwen3"
    assert (info["hparams"]["head_dim"], info["hparams"]["n_embd"]) == (48, 64)


@pytest.mark.oracle
def test_every_type_converts_and_runs(qwen, tmp_path):
    """Every --type of the converter on the checkpoint: kiln runs the file, and its next-
    token distributions stay near the F32 file's: the float types within rounding, 8 bits
    close, and further with each step down in bits."""
    from engine import convert
    _, _, src, files = qwen
    tokens = tokens_for(files["f32"], 48)
    f32 = kiln_logits(files["f32"], tokens)
    kls = {}
    for typ in convert.MIXES:
        out = tmp_path / f"{typ}.gguf"
        assert convert_cli.main([str(src), "-o", str(out), "--type", typ, "--quiet"]) == 0
        kls[typ] = mean_kl(f32, kiln_logits(out, tokens))
    print("mean KL from the F32 file:", kls)
    assert max(kls["f16"], kls["bf16"]) < 1e-4 and kls["q8_0"] < 2e-3
    ladder = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k"]  # fewer bits, further
    assert [kls[t] for t in ladder] == sorted(kls[t] for t in ladder)
    assert kls["q8_0"] < kls["q5_0"] < kls["q4_0"]
