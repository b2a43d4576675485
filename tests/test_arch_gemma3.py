"""gemma3, end to end: a tiny random-weight Gemma3ForCausalLM built here with
transformers (six layers: five sliding-window layers of a 32-token window and one global
layer, the two RoPE bases), saved as safetensors with a SentencePiece tokenizer.model in
Gemma's settings (byte fallback, no space prefix, <start_of_turn> / <end_of_turn>),
converted by kiln and run by kiln, transformers and llama.cpp.

- F32 over 160 tokens (five windows): kiln's logits match transformers' within
  1e-3 x max|logit| at every position, and the check fails when a variation is dropped
  from the reference (the embedding scale, GeGLU, the post-norms, the window, the local
  RoPE base, NEOX RoPE);
- F16: llama.cpp agrees with kiln (mean KL < 1e-4); Q8_0 and Q4_K_M within llama.cpp's
  flash-attention-vs-default envelope;
- quantized: the NumPy reference reproduces the C engine bit for bit (tiny_models'
  gemma3 files on every ISA variant, 1 and 2 threads, batched, chunked and token by
  token, with ring caches and without);
- the sliding-window layers' cache is a ring the window bounds, and prefix reuse
  re-evaluates from the start when the ring no longer holds the prefix;
- the converter reads transformers 4's and 5's config styles alike and refuses what
  llama.cpp's gemma3 cannot run;
- the vocabulary tokenizes as llama.cpp does, chat renders Gemma's template and stops
  at <end_of_turn>.
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
from engine.arch import FFN_SILU, ROPE_NORM
from engine.cli import convert as convert_cli
from engine.config import ModelConfig
from engine.errors import CacheRewindError, ModelError
from engine.convert.mixes import MIXES
from engine.model import Model
from engine.reference import ReferenceModel
from oracles import llama_cpp_runs
from test_agreement_llamacpp import KL_FACTOR, distance, top1_floor
from test_tokenizer import CORPUS, fuzz_texts
from tiny_models import SUPER_BLOCK_SHAPE, make_tiny_llama, mean_kl, needs_super_blocks

SPECIALS = ["<start_of_turn>", "<end_of_turn>"]
# Gemma 3's template, in its structure: BOS, then each turn as <start_of_turn>role\n
# content<end_of_turn>\n with the assistant named "model"
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
N_SWA = 32
N_F32 = 160   # tokens of the F32 check: five windows
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def _oracles():
    torch = pytest.importorskip("torch", reason="torch not installed (optional oracle)")
    pytest.importorskip("transformers", reason="transformers not installed (optional oracle)")
    torch.set_num_threads(2)
    return torch


def write_gemma_tokenizer(d):
    """tokenizer.model (SentencePiece BPE with byte fallback and no dummy prefix, learned
    from the corpus, Gemma's ids <pad>=0 <eos>=1 <bos>=2 <unk>=3, the turn markers as
    pieces) and tokenizer_config.json marking the markers special."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(("\n".join(CORPUS) * 3).splitlines()), model_writer=buf,
        vocab_size=700, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=SPECIALS,
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        normalization_rule_name="identity", hard_vocab_limit=False, minloglevel=2)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    ids = {t: sp.piece_to_id(t) for t in SPECIALS}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
        "pad_token": "<pad>",
        "added_tokens_decoder": {str(i): {"content": t, "special": True}
                                 for t, i in ids.items()},
        "chat_template": GEMMA_TEMPLATE}))
    return sp.get_piece_size(), ids


def hf_config(n_vocab):
    import transformers
    return transformers.Gemma3TextConfig(
        vocab_size=n_vocab, max_position_embeddings=2048, sliding_window=N_SWA,
        query_pre_attn_scalar=SHAPE["head_dim"], rms_norm_eps=1e-6, pad_token_id=0,
        eos_token_id=1, bos_token_id=2, attn_implementation="eager", **SHAPE)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """(HF model, checkpoint directory, {type: converted GGUF path})."""
    torch = _oracles()
    import transformers
    d = tmp_path_factory.mktemp("gemma3") / "gemma3-tiny"
    d.mkdir()
    n_vocab, _ = write_gemma_tokenizer(d)
    cfg = hf_config(n_vocab)
    assert cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    # larger than the default init, so attention is not uniform; Gemma's norms multiply
    # by 1 + w, so w near 0 is a gain near 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.06)
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(d, safe_serialization=True)
    out = {}
    for typ in ("f32", "f16", "q8_0", "q4_k_m"):
        out[typ] = d.parent / f"gemma3-{typ}.gguf"
        assert convert_cli.main([str(d), "-o", str(out[typ]), "--type", typ, "--quiet"]) == 0
    return model, d, out


def tokens_for(path, n):
    return np.random.default_rng(3).integers(0, ReferenceModel(path).config.n_vocab, n)


@pytest.mark.oracle
def test_converted_metadata_is_what_llama_cpp_reads(gemma3):
    model, _, files = gemma3
    with formats.read_gguf(files["f32"]) as f:
        md, t = f.metadata, f.tensors
        assert md["general.architecture"] == "gemma3"
        assert md["gemma3.context_length"] == 2048
        assert md["gemma3.block_count"] == 6
        assert md["gemma3.attention.sliding_window"] == N_SWA
        assert md["gemma3.attention.key_length"] == md["gemma3.attention.value_length"] == 64
        assert md["gemma3.rope.freq_base"] == 1e6
        assert md["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
        assert "gemma3.rope.scaling.type" not in md
        assert "output.weight" not in t
        layer = model.model.layers[0]
        for gguf, hf in (("attn_norm", layer.input_layernorm),
                         ("post_attention_norm", layer.post_attention_layernorm),
                         ("ffn_norm", layer.pre_feedforward_layernorm),
                         ("post_ffw_norm", layer.post_feedforward_layernorm),
                         ("attn_q_norm", layer.self_attn.q_norm),
                         ("attn_k_norm", layer.self_attn.k_norm)):
            np.testing.assert_array_equal(np.asarray(t[f"blk.0.{gguf}.weight"].data),
                                          hf.weight.detach().numpy() + np.float32(1))
        np.testing.assert_array_equal(np.asarray(t["output_norm.weight"].data),
                                      model.model.norm.weight.detach().numpy() + np.float32(1))
        # NEOX: Q and K rows in the checkpoint's order
        np.testing.assert_array_equal(np.asarray(t["blk.0.attn_q.weight"].data),
                                      layer.self_attn.q_proj.weight.detach().numpy())
        assert md["tokenizer.ggml.model"] == "llama"
        assert md["tokenizer.ggml.add_space_prefix"] is False or \
            md["tokenizer.ggml.add_space_prefix"] == 0
        assert md["tokenizer.ggml.add_bos_token"]
        assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"],
                md["tokenizer.ggml.padding_token_id"]) == (2, 1, 0)
        assert md["tokenizer.chat_template"] == GEMMA_TEMPLATE
    c = ReferenceModel(files["f32"]).config
    assert c.swa_layers == (True,) * 5 + (False,) and c.n_swa == N_SWA
    from engine.cli.info import model_info
    assert model_info(files["f32"])["hparams"]["n_swa"] == N_SWA
    assert c.attn_scale == 1 / 8 and c.embd_scale == 16.0


def _convert(d, out, typ="f32"):
    return convert_cli.main([str(d), "-o", str(out), "--type", typ, "--quiet"])


@pytest.mark.oracle
def test_transformers_4_config_style_converts_alike(gemma3, tmp_path):
    """rope_theta, rope_local_base_freq and sliding_window_pattern instead of
    rope_parameters and layer_types: the same file."""
    import shutil
    _, d, files = gemma3
    old = tmp_path / "gemma3-tiny"
    shutil.copytree(d, old)
    cfg = json.loads((old / "config.json").read_text())
    for key in ("rope_parameters", "layer_types"):
        cfg.pop(key, None)
    cfg.update(rope_theta=1e6, rope_local_base_freq=10000.0, sliding_window_pattern=6,
               rope_scaling=None)
    (old / "config.json").write_text(json.dumps(cfg))
    assert _convert(old, tmp_path / "old.gguf") == 0
    with formats.read_gguf(files["f32"]) as a, formats.read_gguf(tmp_path / "old.gguf") as b:
        assert {k: v for k, v in a.metadata.items() if k.startswith("gemma3.")} == \
            {k: v for k, v in b.metadata.items() if k.startswith("gemma3.")}
        for name, t in a.tensors.items():
            np.testing.assert_array_equal(np.asarray(t.data), np.asarray(b.tensors[name].data))


REFUSED = {
    "query_pre_attn_scalar": (dict(query_pre_attn_scalar=256), "query_pre_attn_scalar"),
    "local base": (dict(rope_local_base_freq=20000.0, rope_parameters=None), "sliding layers"),
    "layer pattern": (dict(layer_types=["sliding_attention", "full_attention"] * 3),
                      "layer_types"),
    "soft-capping": (dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
    "activation": (dict(hidden_activation="relu"), "hidden_activation"),
}


@pytest.mark.oracle
@pytest.mark.parametrize("case", REFUSED)
def test_converter_refuses_what_llama_cpps_gemma3_does_not_run(gemma3, tmp_path, case, capsys):
    import shutil
    _, d, _ = gemma3
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    cfg = json.loads((bad / "config.json").read_text())
    change, message = REFUSED[case]
    cfg.update({k: v for k, v in change.items() if v is not None})
    for k in [k for k, v in change.items() if v is None]:
        cfg.pop(k, None)
    (bad / "config.json").write_text(json.dumps(cfg))
    assert _convert(bad, tmp_path / "bad.gguf") != 0
    assert message in capsys.readouterr().err


@pytest.mark.oracle
@pytest.mark.parametrize("mix", [m for m in MIXES if m not in ("f32", "f16", "q8_0", "q4_k_m")])
def test_every_type_converts_and_runs(gemma3, tmp_path, mix):
    """Every --type of the mixes table: a file kiln loads, whose logits stay near the
    F32 file's (mean KL < 0.5 over 64 tokens, two windows; Q2_K, the
    coarsest, is near 0.2 on this random model)."""
    _, d, files = gemma3
    out = tmp_path / f"gemma3-{mix}.gguf"
    assert _convert(d, out, mix) == 0
    tokens = tokens_for(files["f32"], 64)
    kl = mean_kl(kiln_logits(files["f32"], tokens), kiln_logits(out, tokens))
    print(f"{mix}: mean KL vs F32 {kl:.2e}")
    assert np.isfinite(kl) and kl < 0.5


def without(ref, config=None, inv_freq_swa=None, **layer_fields):
    """A copy of the reference model with another config, local RoPE table or layer fields."""
    new = copy.copy(ref)
    new.config = config or ref.config
    if inv_freq_swa is not None:
        new._inv_freq_swa = inv_freq_swa
    new.layers = []
    for L in ref.layers:
        new.layers.append(copy.copy(L))
        for k, v in layer_fields.items():
            setattr(new.layers[-1], k, v if not callable(v) else v(L))
    return new


@pytest.mark.oracle
def test_kiln_matches_transformers_in_f32(gemma3):
    torch = _oracles()
    from engine.reference import swiglu
    model, _, files = gemma3
    tokens = tokens_for(files["f32"], N_F32)
    with torch.no_grad():
        hf = model(torch.from_numpy(tokens)[None]).logits[0].numpy()
    with Model(files["f32"], n_ctx=N_F32, n_threads=2) as m:
        ours = m.eval(tokens, 0, logits_all=True)
    bound = 1e-3 * np.abs(hf).max()
    err = np.abs(ours - hf).max()
    print(f"{N_F32} tokens: max |kiln - transformers| {err:.2e}, bound {bound:.2e}")
    assert err <= bound, (err, bound)
    with Model(files["f32"], n_ctx=1024, n_threads=2, n_batch=16) as m:   # ring caches
        assert m._rings
        ringed = m.eval(tokens, 0, logits_all=True)
    assert np.abs(ringed - hf).max() <= bound

    ref = ReferenceModel(files["f32"], emulate_q8=False)
    np.testing.assert_allclose(ref(tokens), hf, rtol=0, atol=bound)
    c = ref.config
    arch = c.arch
    broken = {
        "embedding scale": without(ref, config=dataclasses.replace(
            c, arch=dataclasses.replace(arch, embd_scale_sqrt=False))),
        "GeGLU (SiLU instead)": without(ref, glu=lambda L: swiglu),
        "Q/K norms": without(ref, q_norm=None, k_norm=None),
        "post-attention norm": without(ref, attn_post_norm=None),
        "post-FFN norm": without(ref, ffn_post_norm=None),
        "sliding window": without(ref, swa=False),
        "local RoPE base": without(ref, inv_freq_swa=ref.inv_freq_for(N_F32)),
        "NEOX RoPE (interleaved instead)": without(ref, config=dataclasses.replace(
            c, arch=dataclasses.replace(arch, rope=ROPE_NORM))),
    }
    for what, wrong in broken.items():
        e = np.abs(wrong(tokens) - hf).max()
        print(f"  without {what}: {e:.2e}")
        assert e > 10 * bound, what


F16_N = N_F32
QUANTIZED = {"q8_0": 256, "q4_k_m": 256}
N_IDS = max(F16_N, *QUANTIZED.values())   # the token ids both engines read
TEXTS = CORPUS + fuzz_texts(60, seed=99) + [
    "<start_of_turn>user\nHello there<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>  \n\t sys<end_of_turn>  x", "a<end_of_turn><end_of_turn> <eos>  b",
    "  leading spaces<start_of_turn>", "emoji 🦙 <end_of_turn>\n\n🚀", "12345 678.9",
]


@pytest.fixture(scope="module")
def llama_cpp(gemma3, tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the outside oracle")
    files = gemma3[2]
    d = tmp_path_factory.mktemp("llamacpp")
    runs = [("f16", False, F16_N)] + [
        (t, flash, n) for t, n in QUANTIZED.items() for flash in (False, True)]
    return llama_cpp_runs(files, tokens_for(files["f16"], N_IDS), runs, TEXTS, files["f32"], d)


def kiln_logits(path, tokens):
    with Model(path, n_ctx=len(tokens), n_threads=2) as m:
        return m.eval(tokens, 0, logits_all=True)


@pytest.mark.oracle
def test_llama_cpp_runs_the_f16_file_as_kiln_does(gemma3, llama_cpp):
    path = gemma3[2]["f16"]
    kl = mean_kl(llama_cpp["f16", False, F16_N], kiln_logits(path, tokens_for(path, N_IDS)[:F16_N]))
    print(f"gemma3 F16 ({F16_N} tokens): kiln vs llama.cpp mean KL {kl:.2e}")
    assert kl < 1e-4


@pytest.mark.oracle
@pytest.mark.parametrize("typ", QUANTIZED)
def test_quantized_files_within_llama_cpps_envelope(gemma3, llama_cpp, typ):
    path, n = gemma3[2][typ], QUANTIZED[typ]
    default, flash = llama_cpp[typ, False, n], llama_cpp[typ, True, n]
    env_kl, env_top1 = distance(default, flash)
    kl, top1 = distance(default, kiln_logits(path, tokens_for(path, N_IDS)[:n]))
    print(f"gemma3 {typ}: kiln KL {kl:.2e} top-1 {top1:.3f}; llama.cpp flash-attn vs default "
          f"KL {env_kl:.2e} top-1 {env_top1:.3f}")
    assert env_kl > 0
    assert kl <= KL_FACTOR * env_kl, (kl, env_kl)
    assert top1 >= top1_floor(env_top1, len(default) - 1), (top1, env_top1)


def check_bit_exact(path, tokens, isas, n_ctx=None):
    """The reference's logits = the engine's, bit for bit, under each ISA variant, 1 and 2
    threads, the prompt in one call, in chunks of 16 (ring caches when n_ctx leaves room
    for them), and token by token."""
    want = ReferenceModel(path)(tokens)
    n_ctx = n_ctx or len(tokens)
    for isa in isas:
        ckernels.set_isa(isa)
        for n_threads in (1, 2):
            with Model(path, n_ctx=n_ctx, n_threads=n_threads, n_batch=16) as m:
                chunked = m.eval(tokens, 0, logits_all=True)
                single = np.stack([m.eval(tokens[i:i + 1], i) for i in range(len(tokens))])
            with Model(path, n_ctx=n_ctx, n_threads=n_threads) as m:
                batched = m.eval(tokens, 0, logits_all=True)
            for got in (batched, chunked, single):
                np.testing.assert_array_equal(got, want, err_msg=f"{isa} {n_threads}")


@pytest.mark.oracle
@pytest.mark.parametrize("typ", ["q8_0", "q4_k_m"])
def test_reference_reproduces_the_engine_on_converted_files(gemma3, typ, isa_restored):
    path = gemma3[2][typ]
    check_bit_exact(path, tokens_for(path, 70), [ckernels.active_isa()], n_ctx=96)


# weight type, n_layer, n_head, n_head_kv, head_dim, window, tokens, n_ctx (tiny_models
# files; 7 layers: local, 5 x local, global, local)
TINY = [("q8_0", 7, 4, 2, 16, 8, 40, 40), ("q8_0", 7, 4, 2, 16, 8, 40, 96),
        ("q4_k", 6, 4, 1, 64, 12, 40, 80), ("q4_1", 7, 6, 2, 48, 5, 24, 64)]


@pytest.mark.parametrize("ftype,n_layer,n_head,n_head_kv,head_dim,n_swa,n,n_ctx", TINY,
                         ids=lambda v: str(v))
def test_every_isa_thread_count_and_split_is_bit_exact(tmp_path, ftype, n_layer, n_head,
                                                       n_head_kv, head_dim, n_swa, n, n_ctx,
                                                       isa_restored):
    shape = (SUPER_BLOCK_SHAPE if needs_super_blocks(ftype) else dict(n_embd=64, n_ff=96))
    path = make_tiny_llama(tmp_path / "m.gguf", arch="gemma3", ftype=ftype, seed=5,
                           n_layer=n_layer, n_swa=n_swa,
                           **dict(shape, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim))
    ref = ReferenceModel(path)
    assert ref.config.arch.name == "gemma3" and ref.config.swa_layers[5] is False
    assert all(ref.config.swa_layers[:5]) and ref.config.n_swa == n_swa
    tokens = np.random.default_rng(1).integers(0, 400, n)
    check_bit_exact(path, tokens, expected_isas(), n_ctx=n_ctx)


def test_split_attention_over_a_wrapped_ring_is_bit_exact(tmp_path):
    """Generation deep in a context splits one token's attention over the threads
    (256 keys or more): over a window that wraps around its ring, too."""
    path = make_tiny_llama(tmp_path / "m.gguf", arch="gemma3", ftype="q8_0", seed=4,
                           n_layer=6, n_swa=260)
    tokens = np.random.default_rng(2).integers(0, 400, 600)
    want = ReferenceModel(path)(tokens)
    with Model(path, n_ctx=640, n_threads=2, n_batch=16) as m:
        assert m._rings == [275] * 5
        got = [m.eval(tokens[:500], 0, logits_all=True)]
        got += [m.eval(tokens[i:i + 1], i)[None] for i in range(500, 600)]
    np.testing.assert_array_equal(np.concatenate(got), want)


def test_the_sliding_window_layers_cache_is_bounded_by_the_window(tmp_path):
    """At n_ctx 8192 a model of five local layers (window 512) and one global layer keeps
    n_ctx positions on the global layer and a ring of (window - 1 + n_batch) positions,
    stored twice, on each local one: under 40% of what six full layers take."""
    shape = dict(n_layer=6, n_embd=64, n_head=4, n_head_kv=2, head_dim=16, n_ff=96)
    windowed = make_tiny_llama(tmp_path / "w.gguf", arch="gemma3", n_swa=512, **shape)
    full = make_tiny_llama(tmp_path / "f.gguf", arch="gemma3", **shape)
    kv_dim, n_ctx, n_batch, half = 2 * 16, 8192, 512, 2   # halves of fp16 K and V
    with Model(full, n_ctx=n_ctx, n_threads=1) as m:
        assert m.kv_cache_bytes == 6 * n_ctx * 2 * kv_dim * half
    with Model(windowed, n_ctx=n_ctx, n_threads=1, n_batch=n_batch) as m:
        ring = 512 - 1 + n_batch
        assert [m._forward.cache_positions(i) for i in range(6)] == [ring] * 5 + [n_ctx]
        local = 2 * ring + 16 + 15    # the mirrored ring, a block of slack, rounded up
        assert m.kv_cache_bytes <= (n_ctx + 5 * local) * 2 * kv_dim * half
        assert m.kv_cache_bytes < 0.4 * 6 * n_ctx * 2 * kv_dim * half
    with Model(windowed, n_ctx=1024, n_threads=1) as m:   # no room for a ring: full caches
        assert m._rings == []   # (the local layers' key rows with a block of slack)
        assert m.kv_cache_bytes == (6 * 1024 * 2 + 5 * 16) * kv_dim * half


def test_the_context_check_knows_the_cache_size_before_allocating(tmp_path):
    """engine.model.kv_cache_bytes (what the n_ctx check refuses on, before anything is
    allocated) is the size the C engine then allocates, rings or not."""
    from engine.model import kv_cache_bytes
    shape = dict(n_layer=6, n_embd=64, n_head=4, n_head_kv=2, head_dim=16, n_ff=96)
    for n_swa in (0, 8, 512):
        path = make_tiny_llama(tmp_path / f"w{n_swa}.gguf", arch="gemma3", n_swa=n_swa, **shape)
        for n_ctx, n_batch, n_seq in ((8192, 512, 1), (1024, 512, 2), (100, 16, 3), (37, 64, 1)):
            with Model(path, n_ctx=n_ctx, n_threads=1, n_batch=n_batch, n_seq=n_seq) as m:
                assert kv_cache_bytes(m.config, n_ctx, n_seq, n_batch) == m.kv_cache_bytes, \
                    (n_swa, n_ctx, n_batch, n_seq)


def test_rewinding_past_the_ring_is_refused_and_restarting_is_exact(tmp_path):
    path = make_tiny_llama(tmp_path / "m.gguf", arch="gemma3", ftype="q8_0", seed=6,
                           n_layer=6, n_swa=8)
    tokens = np.random.default_rng(4).integers(0, 400, 60)
    want = ReferenceModel(path)(tokens)
    with Model(path, n_ctx=64, n_threads=2, n_batch=8) as m:   # rings of 15
        m.eval(tokens, 0)
        assert m.can_resume(59) and m.can_resume(53) and not m.can_resume(40)
        np.testing.assert_array_equal(m.eval(tokens[53:], 53, logits_all=True), want[53:])
        with pytest.raises(CacheRewindError, match="sliding-window cache"):
            m.eval(tokens[40:], 40)
        np.testing.assert_array_equal(m.eval(tokens[:45], 0, logits_all=True), want[:45])
        assert m.can_resume(40)   # after a restart the ring holds 30..44 again
        np.testing.assert_array_equal(m.eval(tokens[40:], 40, logits_all=True), want[40:])
        with pytest.raises(ValueError, match="span"):   # a chunk of rows beyond a ring
            m.eval_batch([1, 2], [0, 0], [0, 20])


def test_prefix_reuse_restarts_when_the_ring_cannot_resume(tmp_path):
    """LLM keeps the cached prefix of the last prompt; with ring caches a prefix the ring
    no longer holds is evaluated again, and generation is what a fresh LLM gives."""
    path = make_tiny_llama(tmp_path / "m.gguf", arch="gemma3", vocab="llama", ftype="q8_0",
                           seed=8, n_layer=6, n_swa=16)
    rng = np.random.default_rng(5)
    first = rng.integers(10, 300, 700).tolist()
    second = first[:100] + rng.integers(10, 300, 20).tolist()
    with LLM(path, n_ctx=2048, n_threads=2) as llm:
        assert llm.model._rings
        llm.generate(first, max_tokens=4, temperature=0, ignore_eos=True)
        assert not llm.model.can_resume(100)
        out = llm.generate(second, max_tokens=6, temperature=0, ignore_eos=True)
        assert llm.last_completion.timings.prompt_tokens_evaluated == len(second)
    with LLM(path, n_ctx=2048, n_threads=2) as fresh:
        assert fresh.generate(second, max_tokens=6, temperature=0, ignore_eos=True).tokens == \
            out.tokens


def test_config_reads_the_window_and_refuses_soft_capping(tmp_path):
    path = make_tiny_llama(tmp_path / "m.gguf", arch="gemma3", n_layer=13, n_swa=64)
    with formats.read_gguf(path) as f:
        md, names = dict(f.metadata), list(f.tensors.keys())
    c = ModelConfig.from_metadata(md, names)
    assert [i for i, s in enumerate(c.swa_layers) if not s] == [5, 11]
    assert c.ffn_gelu and c.rope_neox and c.attn_qk_norm and c.tied_output
    np.testing.assert_array_equal(c.rope_inv_freq_swa(),
                                  10000.0 ** (-np.arange(8) / 8.0))
    del md["gemma3.attention.sliding_window"]   # no window: every layer global (Rnj-1)
    assert not any(ModelConfig.from_metadata(md, names).swa_layers)
    with pytest.raises(ModelError, match="final_logit_softcapping"):
        ModelConfig.from_metadata(dict(md, **{"gemma3.final_logit_softcapping": 30.0}), names)
    assert dataclasses.replace(c.arch, ffn_act=FFN_SILU) != c.arch


@pytest.mark.oracle
def test_tokenizer_matches_llama_cpp(gemma3, llama_cpp):
    from engine.tokenizer import load_tokenizer
    want = llama_cpp["tokens"]
    with formats.read_gguf(gemma3[2]["f32"]) as f:
        tok = load_tokenizer(f.metadata)
    bad = [(t, s) for t, w in zip(TEXTS, want) for s in (False, True)
           if tok.encode(t, add_bos=False, special=s) != w[s]]
    assert bad == []
    end = tok.encode("<end_of_turn>", add_bos=False, special=True)
    assert len(end) == 1 and end[0] in tok.eog_ids and tok.add_bos


@pytest.mark.oracle
def test_chat_renders_the_file_template_and_stops_at_end_of_turn(gemma3, tmp_path):
    """A copy of the F32 model whose every next token is <end_of_turn>: the chat prompt is
    the file's template, and the reply ends at once with finish_reason "stop"."""
    from engine.chat import template_for, tokenize_prompt
    src, path = gemma3[2]["f32"], tmp_path / "ends-turns.gguf"
    with formats.read_gguf(src) as f:
        md = f.metadata
        end = list(md["tokenizer.ggml.tokens"]).index("<end_of_turn>")
        tensors = []
        for t in f.tensors.values():
            data = np.array(t.data)
            if t.name == "token_embd.weight":   # tied: the embeddings are the output too
                data[:, 0] = 30.0
                data[end] = 0.0
                data[end, 0] = 90.0
            tensors.append((t.name, t.type, tuple(t.shape), data))
        formats.write_gguf(path, md, tensors)
    messages = [{"role": "user", "content": "Hi there"}]
    with LLM(str(path), n_ctx=128, n_threads=2) as llm:
        template = template_for(llm)
        text = template.render(messages, add_generation_prompt=True)
        assert text == "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
        ids = tokenize_prompt(llm, template, text)
        start = llm.tokenizer.encode("<start_of_turn>", add_bos=False, special=True)
        assert ids[0] == llm.tokenizer.bos_id and ids[1] == start[0] and ids.count(end) == 1
        assert ids.count(llm.tokenizer.bos_id) == 1
        out = llm.chat(messages, max_tokens=8, temperature=0)
        assert out.finish_reason == "stop" and out.tokens == [] and out.text == ""
    r = subprocess.run([sys.executable, "-m", "engine", "chat", str(path), "--ctx", "128",
                        "--threads", "1"], input="Hi there\nAgain\n", capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "\n\n"


def test_server_slots_restart_a_prefix_the_ring_no_longer_holds(tmp_path):
    """The server's slot keeps its sequence's tokens for the next request; a shared
    prefix the slot's ring cannot resume is evaluated again (one that it can is reused),
    and each reply is what a fresh LLM gives."""
    import asyncio
    from engine.cli.serve.slots import Job, SlotPool
    path = make_tiny_llama(tmp_path / "m.gguf", arch="gemma3", vocab="llama", ftype="q8_0",
                           seed=8, n_layer=6, n_swa=16)
    rng = np.random.default_rng(6)
    first = rng.integers(10, 300, 700).tolist()
    second = first[:100] + rng.integers(10, 300, 20).tolist()
    params = dict(max_tokens=5, temperature=0, ignore_eos=True)
    pool = SlotPool(path, n_slots=1, n_ctx=2048, n_threads=2)

    async def run(ids):
        job = Job(ids, dict(params), asyncio.get_running_loop())
        pool.submit(job)
        while True:
            kind, value = await job.events.get()
            if kind == "done":
                return value
            assert kind != "error", value

    try:
        asyncio.run(run(first))
        out = asyncio.run(run(second))
        assert out.timings.prompt_tokens_evaluated == len(second)
        third = second + out.tokens + [11, 12]
        again = asyncio.run(run(third))
        assert again.timings.prompt_tokens_evaluated < 10   # the ring still holds it
    finally:
        pool.close()
    with LLM(path, n_ctx=2048, n_threads=2) as fresh:
        assert fresh.generate(second, **params).tokens == out.tokens
        assert fresh.generate(third, **params).tokens == again.tokens


@pytest.mark.oracle
def test_the_text_model_of_an_image_text_checkpoint_converts_alike(gemma3, tmp_path):
    """Gemma3ForConditionalGeneration (the 4b/12b/27b layout): its text_config and its
    language model's tensors give the text-only checkpoint's file; the vision tower and
    the projector are left out."""
    import transformers
    torch = _oracles()
    model, d, files = gemma3
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=model.config, vision_config=vision,
                                    mm_tokens_per_image=4)
    mm = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        mm.model.language_model.load_state_dict(model.model.state_dict())
    out = tmp_path / "gemma3-tiny"
    mm.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (out / name).write_bytes((d / name).read_bytes())
    assert _convert(out, tmp_path / "mm.gguf") == 0
    with formats.read_gguf(files["f32"]) as a, formats.read_gguf(tmp_path / "mm.gguf") as b:
        assert {k: v for k, v in a.metadata.items() if k.startswith("gemma3.")} == \
            {k: v for k, v in b.metadata.items() if k.startswith("gemma3.")}
        assert a.tensors.keys() == b.tensors.keys()
        for name, t in a.tensors.items():
            np.testing.assert_array_equal(np.asarray(t.data), np.asarray(b.tensors[name].data))


# Gemma 3 instruct's template, in its structure: a leading system message folded into the
# first user turn, contents as a string or a list of typed parts, roles that must
# alternate (raise_exception otherwise), the assistant as "model"
GEMMA3_IT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
  {%- if messages[0]['content'] is string -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
  {%- else -%}
    {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
  {%- endif -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set first_user_prefix = "" -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
  {%- endif -%}
  {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
  {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
  {%- if message['content'] is string -%}
    {{ message['content'] | trim }}
  {%- elif message['content'] is iterable -%}
    {%- for item in message['content'] -%}
      {%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"""


def test_gemma3_instruct_template_renders_in_the_sandbox():
    from engine.chat_template import ChatTemplate, ChatTemplateError
    t = ChatTemplate(GEMMA3_IT_TEMPLATE, "<bos>", "<eos>")
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": " Hi "},   # (kiln's messages hold strings)
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"}]
    assert t.render(conv) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        "Hello!<end_of_turn>\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n")
    assert t.end_of_turn[0] == "<end_of_turn>"
    with pytest.raises(ChatTemplateError, match="alternate"):
        t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.oracle
def test_linear_rope_scaling_of_the_global_layers_matches_transformers(tmp_path):
    """Gemma 3 4b/12b/27b scale the global layers' RoPE linearly (factor 8) and leave the
    sliding layers' alone: the converted file does the same as transformers."""
    torch = _oracles()
    import transformers
    d = tmp_path / "gemma3-scaled"
    d.mkdir()
    n_vocab, _ = write_gemma_tokenizer(d)
    cfg = hf_config(n_vocab)
    cfg.rope_parameters["full_attention"].update(rope_type="linear", factor=8.0)
    torch.manual_seed(1)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.06 if p.ndim == 2 else 0.2))
    model.save_pretrained(d, safe_serialization=True)
    assert _convert(d, tmp_path / "s.gguf") == 0
    with formats.read_gguf(tmp_path / "s.gguf") as f:
        assert f.metadata["gemma3.rope.scaling.type"] == "linear"
        assert f.metadata["gemma3.rope.scaling.factor"] == 8.0
    c = ReferenceModel(tmp_path / "s.gguf").config
    assert c.rope_freq_scale == 1 / 8
    np.testing.assert_array_equal(c.rope_inv_freq_swa(), 1e4 ** (-np.arange(32) / 32.0))
    tokens = tokens_for(tmp_path / "s.gguf", N_F32)
    with torch.no_grad():
        hf = model(torch.from_numpy(tokens)[None]).logits[0].numpy()
    ours = kiln_logits(tmp_path / "s.gguf", tokens)
    bound = 1e-3 * np.abs(hf).max()
    assert np.abs(ours - hf).max() <= bound
    unscaled = dataclasses.replace(ReferenceModel(tmp_path / "s.gguf", emulate_q8=False).config,
                                   rope_freq_scale=1.0)
    ref = ReferenceModel(tmp_path / "s.gguf", emulate_q8=False)
    wrong = without(ref, config=unscaled)
    wrong._inv_freq = {k: unscaled.rope_inv_freq() for k in ref._inv_freq}
    assert np.abs(wrong(tokens) - hf).max() > 10 * bound
