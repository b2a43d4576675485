"""phi3, end to end: a tiny random-weight Phi3Config model built here with transformers
(LongRoPE with short and long factors, original context 256 of 1024), saved as
safetensors with a SentencePiece tokenizer.model plus Phi-3's added tokens, converted by
kiln and run by kiln, transformers and llama.cpp.

- F32, below and above the original context (short and long factors): kiln's logits
  match transformers' within 1e-3 x max|logit| at every position, and the check fails
  when a variation is dropped from the reference (NEOX RoPE, the fused split order, the
  factors, the choice of factors, the attention factor);
- F16: llama.cpp agrees with kiln (mean KL < 1e-4); Q8_0 and Q4_K_M within llama.cpp's
  flash-attention-vs-default envelope;
- quantized: the NumPy reference reproduces the C engine bit for bit (tiny_models' phi3
  files on every ISA variant, 1 and 2 threads, batched, chunked and token by token);
- the vocabulary tokenizes as llama.cpp does, chat renders Phi-3's template and stops
  at <|end|>.
"""
import copy
import dataclasses
import io
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
from engine.convert.mixes import MIXES, ModelFacts, tensor_type
from engine.model import Model
from engine.reference import ReferenceModel
from oracles import llama_cpp_runs
from test_agreement_llamacpp import KL_FACTOR, distance, top1_floor
from test_tokenizer import CORPUS, fuzz_texts
from tiny_models import SUPER_BLOCK_SHAPE, make_tiny_llama, mean_kl, needs_super_blocks

ADDED = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
# Phi-3-mini-instruct's template, in its structure: role tag, newline, content, <|end|>
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
    "{% else %}{{ eos_token }}{% endif %}")
# llama.cpp rounds its context up to a multiple of 256 before choosing the factors (the
# long ones when it exceeds the original context), so the original context is a
# multiple of 256, as in the real models (4096): then both engines choose alike.
N_CTX_ORIG, N_CTX = 256, 1024
REGIMES = {"short": 128, "long": 288}   # tokens of the F32 check in each regime
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def _oracles():
    torch = pytest.importorskip("torch", reason="torch not installed (optional oracle)")
    pytest.importorskip("transformers", reason="transformers not installed (optional oracle)")
    torch.set_num_threads(2)
    return torch


def write_phi3_tokenizer(d):
    """tokenizer.model (SentencePiece BPE with byte fallback, learned from the corpus) and
    Phi-3's added tokens after its pieces, in tokenizer_config.json and added_tokens.json."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(("\n".join(CORPUS) * 3).splitlines()), model_writer=buf,
        vocab_size=700, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    n_spm = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()
    ids = {t: n_spm + i for i, t in enumerate(ADDED)}
    (d / "added_tokens.json").write_text(json.dumps(ids))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>",
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "rstrip": True}
                                 for t, i in ids.items()},
        "chat_template": PHI3_TEMPLATE}))
    return n_spm + len(ADDED), ids


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """(HF model, checkpoint directory, {type: converted GGUF path})."""
    torch = _oracles()
    import transformers
    d = tmp_path_factory.mktemp("phi3") / "phi3-tiny"   # general.name: llama.cpp's phi3 rules
    d.mkdir()
    n_vocab, ids = write_phi3_tokenizer(d)
    rng = np.random.default_rng(7)
    half = SHAPE["hidden_size"] // SHAPE["num_attention_heads"] // 2
    scaling = {"type": "longrope", "short_factor": rng.uniform(0.9, 1.5, half).tolist(),
               "long_factor": rng.uniform(1.0, 8.0, half).tolist()}
    cfg = transformers.Phi3Config(
        vocab_size=n_vocab, max_position_embeddings=N_CTX,
        original_max_position_embeddings=N_CTX_ORIG, rope_scaling=scaling, rms_norm_eps=1e-5,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"], sliding_window=2047, **SHAPE)
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(cfg).eval()
    # larger than the default init, so attention is not uniform; a little smaller than
    # test_arch_qwen's 0.08: LongRoPE's attention factor (1.13 here) sharpens the scores,
    # and the fp16 KV cache's rounding (kiln's and llama.cpp's) then reached 1.1e-3 of the
    # largest logit at 0.08 (2.5e-5 with an F32 cache)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.06)
            else:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(d, safe_serialization=True)
    out = {}
    for typ in ("f32", "f16", "q8_0", "q4_k_m"):
        out[typ] = d.parent / f"phi3-{typ}.gguf"
        assert convert_cli.main([str(d), "-o", str(out[typ]), "--type", typ, "--quiet"]) == 0
    return model, d, out


def tokens_for(path, n):
    return np.random.default_rng(3).integers(0, ReferenceModel(path).config.n_vocab, n)


@pytest.mark.oracle
def test_converted_metadata_is_what_llama_cpp_reads(phi3):
    model, _, files = phi3
    with formats.read_gguf(files["f32"]) as f:
        md, t = f.metadata, f.tensors
        assert md["general.architecture"] == "phi3"
        assert md["phi3.context_length"] == N_CTX
        assert md["phi3.rope.scaling.original_context_length"] == N_CTX_ORIG
        assert md["phi3.rope.dimension_count"] == 64
        assert md["phi3.attention.sliding_window"] == 2047
        scale = N_CTX / N_CTX_ORIG
        assert md["phi3.rope.scaling.attn_factor"] == pytest.approx(
            np.sqrt(1 + np.log(scale) / np.log(N_CTX_ORIG)))
        assert "phi3.rope.scaling.type" not in md
        assert t["blk.0.attn_qkv.weight"].shape == (256 + 2 * 128, 256)
        assert t["blk.1.ffn_up.weight"].shape == (1024, 256)
        assert not any(n in t for n in ("blk.0.attn_q.weight", "blk.0.ffn_gate.weight"))
        sa, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        np.testing.assert_array_equal(np.asarray(t["blk.0.attn_qkv.weight"].data),
                                      sa.qkv_proj.weight.detach().numpy())
        np.testing.assert_array_equal(np.asarray(t["blk.0.ffn_up.weight"].data),
                                      mlp.gate_up_proj.weight.detach().numpy())
        rp = model.config.to_dict().get("rope_parameters") or model.config.rope_scaling
        for kind in ("short", "long"):
            np.testing.assert_array_equal(np.asarray(t[f"rope_factors_{kind}.weight"].data),
                                          np.asarray(rp[f"{kind}_factor"], np.float32))
        assert md["tokenizer.ggml.model"] == "llama"
        assert md["tokenizer.chat_template"] == PHI3_TEMPLATE


def without(ref, config=None, inv_freq=None, **layer_fields):
    """A copy of the reference model with another config, RoPE table or layer fields."""
    new = copy.copy(ref)
    new.config = config or ref.config
    if inv_freq is not None:
        new._inv_freq = {k: inv_freq(k, v) for k, v in ref._inv_freq.items()}
    new.layers = []
    for L in ref.layers:
        new.layers.append(copy.copy(L))
        for k, v in layer_fields.items():
            setattr(new.layers[-1], k, v if not callable(v) else v(L))
    return new


@pytest.mark.oracle
@pytest.mark.parametrize("regime", REGIMES)
def test_kiln_matches_transformers_in_f32(phi3, regime):
    torch = _oracles()
    model, _, files = phi3
    n = REGIMES[regime]
    tokens = tokens_for(files["f32"], n)
    with torch.no_grad():
        hf = model(torch.from_numpy(tokens)[None]).logits[0].numpy()
    with Model(files["f32"], n_ctx=n, n_threads=2) as m:
        ours = m.eval(tokens, 0, logits_all=True)
    bound = 1e-3 * np.abs(hf).max()
    err = np.abs(ours - hf).max()
    print(f"{regime} ({n} tokens): max |kiln - transformers| {err:.2e}, bound {bound:.2e}")
    assert err <= bound, (err, bound)

    ref = ReferenceModel(files["f32"], emulate_q8=False)
    np.testing.assert_allclose(ref(tokens), hf, rtol=0, atol=bound)
    c = ref.config
    plain = c.rope_inv_freq()
    other = "rope_factors_short.weight" if regime == "long" else "rope_factors_long.weight"
    broken = {
        "interleaved RoPE": without(ref, config=dataclasses.replace(
            c, arch=dataclasses.replace(c.arch, rope=ROPE_NORM))),
        "gate and up swapped": without(ref, w1=lambda L: L.w3, w3=lambda L: L.w1),
        "K and V swapped": without(ref, wk=lambda L: L.wv, wv=lambda L: L.wk),
        "no frequency factors": without(ref, inv_freq=lambda k, v: plain),
        "the other regime's factors": without(
            ref, inv_freq=lambda k, v: ref._inv_freq[other] if k is not None else v),
        "no attention factor": without(ref, config=dataclasses.replace(c, rope_attn_factor=1.0)),
    }
    for what, wrong in broken.items():
        e = np.abs(wrong(tokens) - hf).max()
        print(f"  without {what}: {e:.2e}")
        assert e > 10 * bound, what


F16_RUNS = REGIMES   # llama.cpp's n_ctx = the tokens (rounded up to 256): same regime
QUANTIZED = {"q8_0": 256, "q4_k_m": 256}
N_IDS = max(*F16_RUNS.values(), *QUANTIZED.values())   # the token ids both engines read
TEXTS = CORPUS + fuzz_texts(60, seed=99) + [
    "<|user|>\nHello there<|end|>\n<|assistant|>\n", "<|system|>  \n\t sys<|end|>  x",
    "a<|end|><|end|> <|endoftext|>  b", "  leading spaces<|user|>", "emoji 🦙 <|end|>\n\n🚀",
]


@pytest.fixture(scope="module")
def llama_cpp(phi3, tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the outside oracle")
    files = phi3[2]
    d = tmp_path_factory.mktemp("llamacpp")
    runs = [("f16", False, n) for n in F16_RUNS.values()] + [
        (t, flash, n) for t, n in QUANTIZED.items() for flash in (False, True)]
    return llama_cpp_runs(files, tokens_for(files["f16"], N_IDS), runs, TEXTS, files["f32"], d)


def kiln_logits(path, tokens):
    with Model(path, n_ctx=len(tokens), n_threads=2) as m:
        return m.eval(tokens, 0, logits_all=True)


@pytest.mark.oracle
@pytest.mark.parametrize("regime", F16_RUNS)
def test_llama_cpp_runs_the_f16_file_as_kiln_does(phi3, llama_cpp, regime):
    path, n = phi3[2]["f16"], F16_RUNS[regime]
    kl = mean_kl(llama_cpp["f16", False, n], kiln_logits(path, tokens_for(path, N_IDS)[:n]))
    print(f"phi3 F16 {regime} ({n} tokens): kiln vs llama.cpp mean KL {kl:.2e}")
    assert kl < 1e-4


@pytest.mark.oracle
@pytest.mark.parametrize("typ", QUANTIZED)
def test_quantized_files_within_llama_cpps_envelope(phi3, llama_cpp, typ):
    path, n = phi3[2][typ], QUANTIZED[typ]
    default, flash = llama_cpp[typ, False, n], llama_cpp[typ, True, n]
    env_kl, env_top1 = distance(default, flash)
    kl, top1 = distance(default, kiln_logits(path, tokens_for(path, N_IDS)[:n]))
    print(f"phi3 {typ}: kiln KL {kl:.2e} top-1 {top1:.3f}; llama.cpp flash-attn vs default "
          f"KL {env_kl:.2e} top-1 {env_top1:.3f}")
    assert env_kl > 0
    assert kl <= KL_FACTOR * env_kl, (kl, env_kl)
    assert top1 >= top1_floor(env_top1, len(default) - 1), (top1, env_top1)


def check_bit_exact(path, tokens, isas):
    """The reference's logits = the engine's, bit for bit, under each ISA variant, 1 and 2
    threads, the prompt in one call, in chunks of 16, and token by token (n_ctx = the
    tokens, so the regime of the factors is the same for both)."""
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
def test_reference_reproduces_the_engine_on_converted_files(phi3, typ, isa_restored):
    path = phi3[2][typ]
    check_bit_exact(path, tokens_for(path, 37), [ckernels.active_isa()])


# weight type, n_head, n_head_kv, head_dim, rope_dim, tokens (tiny_models files, original
# context 32: 24 tokens use the short factors, 40 the long ones)
TINY = [("q8_0", 4, 2, 16, 16, 24), ("q8_0", 4, 2, 16, 16, 40), ("q4_k", 4, 1, 64, 48, 40),
        ("q4_1", 6, 2, 48, 48, 24)]


@pytest.mark.parametrize("ftype,n_head,n_head_kv,head_dim,rope_dim,n", TINY, ids=lambda v: str(v))
def test_every_isa_thread_count_and_split_is_bit_exact(tmp_path, ftype, n_head, n_head_kv,
                                                       head_dim, rope_dim, n, isa_restored):
    shape = (SUPER_BLOCK_SHAPE if needs_super_blocks(ftype) else dict(n_embd=64, n_ff=96))
    path = make_tiny_llama(tmp_path / "m.gguf", arch="phi3", ftype=ftype, seed=5,
                           longrope=(32, 1.17), rope_dim=rope_dim,
                           **dict(shape, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim))
    ref = ReferenceModel(path)
    assert ref.config.arch.name == "phi3" and ref.config.rope_attn_factor == pytest.approx(1.17)
    # the factors in force differ between the regimes, and from plain RoPE
    assert not np.array_equal(ref.inv_freq_for(24), ref.inv_freq_for(40))
    tokens = np.random.default_rng(1).integers(0, 400, n)
    check_bit_exact(path, tokens, expected_isas())


def test_attn_qkv_takes_llama_cpps_own_mix_rules():
    model = ModelFacts(32, 1, False)
    shape = (9216, 3072)
    want = {"q3_k_m": "Q4_K", "q3_k_l": "Q4_K", "q4_k_m": "Q5_K", "q5_k_m": "Q6_K",
            "q4_k_s": "Q4_K", "q2_k": "Q2_K", "q6_k": "Q6_K"}
    got = {m: tensor_type("blk.0.attn_qkv.weight", shape, 0, MIXES[m], model)[0].name
           for m in want}
    assert got == want


@pytest.mark.oracle
def test_tokenizer_matches_llama_cpp(phi3, llama_cpp):
    from engine.tokenizer import load_tokenizer
    want = llama_cpp["tokens"]
    with formats.read_gguf(phi3[2]["f32"]) as f:
        tok = load_tokenizer(f.metadata)
    bad = [(t, s) for t, w in zip(TEXTS, want) for s in (False, True)
           if tok.encode(t, add_bos=False, special=s) != w[s]]
    assert bad == []
    end = tok.encode("<|end|>", add_bos=False, special=True)
    assert len(end) == 1 and end[0] in tok.eog_ids and tok.add_bos


@pytest.mark.oracle
def test_chat_renders_the_file_template_and_stops_at_end(phi3, tmp_path):
    """A copy of the F32 model whose every next token is <|end|>: the chat prompt is the
    file's template, and the reply ends at once with finish_reason "stop"."""
    from engine.chat import template_for, tokenize_prompt
    src, path = phi3[2]["f32"], tmp_path / "ends-turns.gguf"
    with formats.read_gguf(src) as f:
        md = f.metadata
        end = list(md["tokenizer.ggml.tokens"]).index("<|end|>")
        tensors = []
        for t in f.tensors.values():
            data = np.array(t.data)
            if t.name == "token_embd.weight":
                data[:, 0] = 30.0
            if t.name == "output.weight":
                data[end] = 0.0
                data[end, 0] = 90.0
            tensors.append((t.name, t.type, tuple(t.shape), data))
        formats.write_gguf(path, md, tensors)
    messages = [{"role": "user", "content": "Hi there"}]
    with LLM(str(path), n_ctx=128, n_threads=2) as llm:
        template = template_for(llm)
        text = template.render(messages, add_generation_prompt=True)
        assert text == "<|user|>\nHi there<|end|>\n<|assistant|>\n"
        ids = tokenize_prompt(llm, template, text)
        user = llm.tokenizer.encode("<|user|>", add_bos=False, special=True)
        assert ids[0] == llm.tokenizer.bos_id and ids[1] == user[0] and ids.count(end) == 1
        out = llm.chat(messages, max_tokens=8, temperature=0)
        assert out.finish_reason == "stop" and out.tokens == [] and out.text == ""
    r = subprocess.run([sys.executable, "-m", "engine", "chat", str(path), "--ctx", "128",
                        "--threads", "1"], input="Hi there\nAgain\n", capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "\n\n"
