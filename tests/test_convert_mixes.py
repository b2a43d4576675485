"""kiln convert's mixes: the type of every tensor, general.file_type, the CLI.

The expectations here are stated from llama.cpp's rules (and published tensor counts of
llama.cpp's files), not computed by engine.convert.mixes; the oracle test compares the
whole plan with the file llama.cpp's own quantizer writes."""
import pytest

import formats
from engine import convert
from engine.cli import convert as convert_cli
from engine.convert import export_hf
from engine.convert.mixes import MIXES, ModelFacts, layer_of, tensor_type
from engine.errors import ConvertError
from formats import GGMLType as T
from tiny_models import make_tiny_llama

# --type -> (main type, general.file_type: llama.h's enum llama_ftype)
LLAMA_MIXES = {
    "q4_k_m": (T.Q4_K, 15), "q4_k_s": (T.Q4_K, 14), "q5_k_m": (T.Q5_K, 17),
    "q5_k_s": (T.Q5_K, 16), "q6_k": (T.Q6_K, 18), "q3_k_s": (T.Q3_K, 11),
    "q3_k_m": (T.Q3_K, 12), "q3_k_l": (T.Q3_K, 13), "q2_k": (T.Q2_K, 10),
    "iq4_xs": (T.IQ4_XS, 30), "iq4_nl": (T.IQ4_NL, 25), "q5_0": (T.Q5_0, 8),
    "q5_1": (T.Q5_1, 9),
}
# A row of 576 (SmolLM2's n_embd) is not a multiple of 256: llama.cpp's fallbacks
FALLBACK_576 = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q3_K: T.Q4_0,
                T.Q2_K: T.Q4_0, T.IQ4_XS: T.IQ4_NL, T.IQ4_NL: T.IQ4_NL, T.Q5_0: T.Q5_0,
                T.Q5_1: T.Q5_1}


def llama_tensors(n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, tied):
    """(name, NumPy shape) of every tensor of a Llama model, in GGUF's names."""
    hd = n_embd // n_head
    out = [("token_embd.weight", (n_vocab, n_embd)), ("output_norm.weight", (n_embd,))]
    if not tied:
        out.append(("output.weight", (n_vocab, n_embd)))
    for i in range(n_layer):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (n_embd,)), (p + "ffn_norm.weight", (n_embd,)),
                (p + "attn_q.weight", (n_head * hd, n_embd)),
                (p + "attn_k.weight", (n_head_kv * hd, n_embd)),
                (p + "attn_v.weight", (n_head_kv * hd, n_embd)),
                (p + "attn_output.weight", (n_embd, n_head * hd)),
                (p + "ffn_gate.weight", (n_ff, n_embd)), (p + "ffn_up.weight", (n_ff, n_embd)),
                (p + "ffn_down.weight", (n_embd, n_ff))]
    return out


def plan_types(mix, n_layer=32, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32,
               n_vocab=32000, tied=False):
    model = ModelFacts(n_layer, n_head // n_head_kv, tied)
    return {name: tensor_type(name, shape, layer_of(name), MIXES[mix], model)[0]
            for name, shape in llama_tensors(n_layer, n_embd, n_ff, n_head, n_head_kv,
                                             n_vocab, tied)}


def counts(types: dict) -> dict:
    c = {}
    for t in types.values():
        c[t] = c.get(t, 0) + 1
    return c


# -- whole models --------------------------------------------------------------------------

# Llama-2-7B's tensor counts in llama.cpp's files, as llama.cpp's loader reports them
LLAMA2_7B = {
    "q4_k_m": {T.F32: 65, T.Q4_K: 193, T.Q6_K: 33},
    "q4_k_s": {T.F32: 65, T.Q4_K: 217, T.Q5_K: 8, T.Q6_K: 1},
    "q3_k_m": {T.F32: 65, T.Q3_K: 129, T.Q4_K: 92, T.Q5_K: 4, T.Q6_K: 1},
    "q5_k_m": {T.F32: 65, T.Q5_K: 193, T.Q6_K: 33},
    "q6_k": {T.F32: 65, T.Q6_K: 226},
}


@pytest.mark.parametrize("mix", LLAMA2_7B)
def test_llama2_7b_tensor_counts(mix):
    assert counts(plan_types(mix)) == LLAMA2_7B[mix]


def test_smollm2_q4_k_m_tensor_counts():
    # 30 layers, rows of 576 (no 256-block fits) except ffn_down's 1536, tied output
    types = plan_types("q4_k_m", n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3,
                       n_vocab=49152, tied=True)
    assert counts(types) == {T.Q4_K: 16, T.Q6_K: 14, T.Q5_0: 166, T.Q8_0: 15, T.F32: 61}


# -- telling cases, one rule at a time -----------------------------------------------------

@pytest.mark.parametrize("mix", LLAMA_MIXES)
def test_output_token_embd_and_vectors(mix):
    main = LLAMA_MIXES[mix][0]
    untied = plan_types(mix)
    assert untied["output.weight"] == T.Q6_K            # 6 bits for the output matrix
    assert untied["token_embd.weight"] == main          # an untied embedding: main type
    assert plan_types(mix, tied=True)["token_embd.weight"] == T.Q6_K  # tied: the output's
    assert untied["blk.3.attn_norm.weight"] == T.F32 and untied["output_norm.weight"] == T.F32
    assert untied["blk.7.attn_q.weight"] == main and untied["blk.7.ffn_up.weight"] == main
    # width 576: no 256-block fits, so the output matrix takes Q8_0
    smol = plan_types(mix, n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3,
                      n_vocab=49152, tied=True)
    assert smol["token_embd.weight"] == T.Q8_0


@pytest.mark.parametrize("mix", LLAMA_MIXES)
def test_width_576_falls_back_to_32_blocks(mix):
    main = LLAMA_MIXES[mix][0]
    smol = plan_types(mix, n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3,
                      n_vocab=49152, tied=True)
    assert smol["blk.10.attn_q.weight"] == FALLBACK_576[main]
    assert smol["blk.10.ffn_gate.weight"] == FALLBACK_576[main]
    model = ModelFacts(30, 3, True)
    t, note = tensor_type("blk.10.attn_q.weight", (576, 576), 10, MIXES[mix], model)
    assert (note is None) == (t == main)
    if note:
        assert "576" in note and t.name in note and main.name in note


def test_row_that_no_block_divides_is_f16():
    t, note = tensor_type("blk.0.ffn_down.weight", (64, 48), 0, MIXES["q4_k_m"],
                          ModelFacts(2))
    assert t == T.F16 and "48" in note


# attn_v of the first five layers of a 32-layer model, MHA (n_gqa 1) and n_gqa 4
ATTN_V = {
    "q4_k_m": ([T.Q6_K] * 4 + [T.Q4_K], [T.Q6_K] * 4 + [T.Q4_K]),
    "q5_k_m": ([T.Q6_K] * 4 + [T.Q5_K], [T.Q6_K] * 4 + [T.Q5_K]),
    "q4_k_s": ([T.Q5_K] * 4 + [T.Q4_K], [T.Q5_K] * 4 + [T.Q4_K]),
    "q3_k_m": ([T.Q5_K] * 2 + [T.Q4_K] * 3, [T.Q5_K] * 2 + [T.Q4_K] * 3),
    "q3_k_l": ([T.Q5_K] * 5, [T.Q5_K] * 5),
    "q3_k_s": ([T.Q3_K] * 5, [T.Q3_K] * 5),
    "q2_k": ([T.Q3_K] * 5, [T.Q4_K] * 5),
    "iq4_xs": ([T.IQ4_XS] * 5, [T.Q5_K] * 5),
    "iq4_nl": ([T.IQ4_NL] * 5, [T.Q5_K] * 5),
    "q5_k_s": ([T.Q5_K] * 5, [T.Q5_K] * 5),
    "q6_k": ([T.Q6_K] * 5, [T.Q6_K] * 5),
    "q5_0": ([T.Q5_0] * 5, [T.Q5_0] * 5),
}


@pytest.mark.parametrize("mix", ATTN_V)
def test_attn_v_of_the_first_layers(mix):
    mha, gqa4 = ATTN_V[mix]
    for want, n_head_kv in ((mha, 32), (gqa4, 8)):
        types = plan_types(mix, n_head_kv=n_head_kv)
        assert [types[f"blk.{i}.attn_v.weight"] for i in range(5)] == want, n_head_kv


# use_more_bits: the first and last n/8 layers and every third layer from n/8 + 2
MORE_BITS = {32: {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31},
             30: {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}}


@pytest.mark.parametrize("n_layer", MORE_BITS)
@pytest.mark.parametrize("mix, plain", [("q4_k_m", T.Q4_K), ("q5_k_m", T.Q5_K)])
def test_ffn_down_and_attn_v_more_bits_pattern(mix, plain, n_layer):
    types = plan_types(mix, n_layer=n_layer)
    for role in ("ffn_down", "attn_v"):
        got = {i for i in range(n_layer) if types[f"blk.{i}.{role}.weight"] == T.Q6_K}
        assert got == MORE_BITS[n_layer], role
        assert all(types[f"blk.{i}.{role}.weight"] == plain
                   for i in set(range(n_layer)) - got)


def test_ffn_down_and_attn_output_of_the_small_mixes():
    q3m = plan_types("q3_k_m")  # 32 layers: ffn_down Q5_K in the first 32/16 = 2
    assert [q3m[f"blk.{i}.ffn_down.weight"] for i in range(4)] == [T.Q5_K] * 2 + [T.Q4_K] * 2
    assert q3m["blk.9.attn_output.weight"] == T.Q4_K and q3m["blk.9.attn_k.weight"] == T.Q3_K
    q2 = plan_types("q2_k")
    assert {q2["blk.5.ffn_down.weight"], q2["blk.5.attn_output.weight"]} == {T.Q3_K}
    assert q2["blk.5.ffn_up.weight"] == T.Q2_K
    for mix in ("q4_k_s", "iq4_xs"):  # ffn_down: more bits in the first 32/8 = 4 layers
        t = plan_types(mix)
        assert t["blk.3.ffn_down.weight"] == T.Q5_K
        assert t["blk.4.ffn_down.weight"] == LLAMA_MIXES[mix][0]


def test_llama_70b_attn_v():
    # 80 layers with grouped-query attention is llama.cpp's 70B: attn_v Q3_K/Q4_K -> Q5_K
    for mix, mha in (("q4_k_s", T.Q4_K), ("q3_k_s", T.Q3_K), ("q4_k_m", T.Q4_K)):
        gqa = plan_types(mix, n_layer=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8)
        assert gqa["blk.40.attn_v.weight"] == T.Q5_K, mix
        assert gqa["blk.40.attn_q.weight"] == mha
        full = plan_types(mix, n_layer=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=64)
        assert full["blk.40.attn_v.weight"] == mha, mix


def test_embed_type_overrides_both_embedding_matrices():
    model = ModelFacts(4, 1, tied=False)
    for name in ("token_embd.weight", "output.weight"):
        assert tensor_type(name, (512, 256), None, MIXES["q4_k_m"], model,
                           embed_type=T.Q8_0)[0] == T.Q8_0


def test_kiln_mixes_keep_their_rule():
    model = ModelFacts(4, 1, tied=False)
    for mix, main, embd in (("q4_0", T.Q4_0, T.Q8_0), ("q4_1", T.Q4_1, T.Q8_0),
                            ("q8_0", T.Q8_0, T.Q8_0), ("f16", T.F16, T.F16)):
        assert MIXES[mix].file_type == formats.file_type_of(main)
        for name in ("token_embd.weight", "output.weight"):
            assert tensor_type(name, (512, 256), None, MIXES[mix], model)[0] == embd
        assert tensor_type("blk.0.attn_v.weight", (256, 256), 0, MIXES[mix], model)[0] == main


# -- the plan, the file, the command line --------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A Llama whose rows fit 256-blocks: 8 layers, n_gqa 4, untied output."""
    return make_tiny_llama(tmp_path_factory.mktemp("mixes") / "tiny.gguf", n_layer=8,
                           n_embd=256, n_head=4, n_head_kv=1, n_ff=512, tied=False)


def test_mix_table_is_llama_cpps():
    for mix, (main, file_type) in LLAMA_MIXES.items():
        assert MIXES[mix].default == main and int(MIXES[mix].file_type) == file_type


def _encodable(p) -> bool:
    return all(tp.out_type in formats.ENCODABLE_TYPES for tp in p.tensors)


@pytest.mark.parametrize("mix", LLAMA_MIXES)
def test_convert_writes_the_mix_or_names_the_missing_type(mix, tiny, tmp_path, monkeypatch,
                                                          capsys):
    """With every codec the file has the planned types and file_type; without one, the
    conversion stops before writing with an error naming the type."""
    main, file_type = LLAMA_MIXES[mix]
    out = tmp_path / "out.gguf"
    monkeypatch.setattr(convert, "check_encodable", lambda p, name: None)
    p = convert.plan(tiny, out, mix)
    planned = {tp.name: tp.out_type for tp in p.tensors}
    p.close()
    monkeypatch.undo()
    assert p.metadata["general.file_type"] == file_type
    assert planned["blk.5.attn_q.weight"] == main and planned["output.weight"] == T.Q6_K
    missing = sorted({t for t in planned.values() if t not in formats.ENCODABLE_TYPES})
    rc = convert_cli.main([tiny, "-o", str(out), "--type", mix, "--quiet"])
    err = capsys.readouterr().err
    if missing:
        assert rc == 1 and not out.exists()
        assert "cannot encode" in err and all(t.name in err for t in missing), err
    else:
        assert rc == 0, err
        with formats.read_gguf(out) as f:
            assert {t.name: t.type for t in f.tensors.values()} == planned
            assert f.metadata["general.file_type"] == file_type


def test_missing_codec_is_a_clear_error(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(formats, "ENCODABLE_TYPES",
                        tuple(t for t in formats.ENCODABLE_TYPES if t != T.Q6_K))
    rc = convert_cli.main([tiny, "-o", str(tmp_path / "o.gguf"), "--type", "q4_k_m"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot encode" in err and "Q6_K (e.g. blk.0.attn_v.weight)" in err
    with pytest.raises(ConvertError, match="Q6_K"):
        convert.plan(tiny, tmp_path / "o.gguf", "q4_k_m")


def test_unknown_type_names_are_errors(tiny, tmp_path):
    with pytest.raises(ConvertError, match="q4_k_x"):
        convert.plan(tiny, tmp_path / "o.gguf", "q4_k_x")
    with pytest.raises(ConvertError, match="q9"):
        convert.plan(tiny, tmp_path / "o.gguf", "q4_k_m", embed_type="q9")


def test_hf_source_plans_the_same_types(tiny, tmp_path, monkeypatch):
    """n_gqa, tying and layers reach the rules from config.json as from GGUF metadata."""
    hf = export_hf.export(tiny, tmp_path / "hf")
    monkeypatch.setattr(convert, "check_encodable", lambda p, name: None)
    for mix in ("q4_k_m", "q2_k", "iq4_xs"):
        types = []
        for src in (tiny, hf):
            p = convert.plan(src, tmp_path / "o.gguf", mix)
            types.append({tp.name: tp.out_type for tp in p.tensors})
            p.close()
        assert types[0] == types[1], mix


# bits per weight of each main type, from its block: bytes * 8 / elements
MAIN_BPW = {"q4_k_m": "4.50", "q5_k_s": "5.50", "q6_k": "6.56", "q3_k_l": "3.44",
            "q2_k": "2.62", "iq4_xs": "4.25", "iq4_nl": "4.50", "q5_0": "5.50",
            "q5_1": "6.00", "q4_0": "4.50", "q8_0": "8.50", "f16": "16.00"}


def test_help_lists_every_type_with_its_bits_per_weight(capsys):
    with pytest.raises(SystemExit):
        convert_cli.main(["--help"])
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ") and ln.split()}
    for mix in MIXES:
        assert mix in lines, mix
    for mix, bpw in MAIN_BPW.items():
        assert f"{bpw} bpw" in lines[mix], lines[mix]


# -- llama.cpp's quantizer as the oracle ---------------------------------------------------

# IQ4_NL is left out: its quantizer's search costs llama.cpp about 40 s on this model (as
# much as all the others together), and IQ4_XS's fallback tensors already plan IQ4_NL.
# the mixes people download most (written byte for byte as llama.cpp writes them), and
# two more whose type choice is checked
LLAMA_CPP_FTYPES = ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_XS",
                    "Q5_0", "Q5_1"]
ORACLE_FTYPES = LLAMA_CPP_FTYPES + ["Q3_K_S", "Q3_K_L"]


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", ORACLE_FTYPES)
def test_plan_matches_llama_cpp_quantize(ftype, llamacpp_quantized, smollm2_variant,
                                         tmp_path, monkeypatch):
    """Every tensor of SmolLM2 gets the type llama.cpp's quantizer gives it, and the file
    the same general.file_type."""
    theirs_path = llamacpp_quantized(ftype)
    with formats.read_gguf(theirs_path) as f:
        theirs = {t.name: t.type.name for t in f.tensors.values()}
        their_file_type = f.metadata["general.file_type"]
    monkeypatch.setattr(convert, "check_encodable", lambda p, name: None)
    p = convert.plan(smollm2_variant("f16"), tmp_path / "o.gguf", ftype.lower())
    ours = {tp.name: tp.out_type.name for tp in p.tensors}
    p.close()
    diff = {n: (ours.get(n), theirs.get(n)) for n in set(ours) | set(theirs)
            if ours.get(n) != theirs.get(n)}
    assert not diff, f"{len(diff)} tensors differ (kiln, llama.cpp): {sorted(diff.items())[:8]}"
    assert p.metadata["general.file_type"] == their_file_type
    if ftype == "Q4_K_M":
        assert counts(theirs) == {"Q4_K": 16, "Q6_K": 14, "Q5_0": 166, "Q8_0": 15, "F32": 61}


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", LLAMA_CPP_FTYPES)
def test_convert_writes_llama_cpps_bytes(ftype, llamacpp_quantized, smollm2_variant,
                                         tmp_path, capsys):
    """The whole file end to end: kiln's tensors are llama.cpp's byte for byte, with its
    types and general.file_type, and llama.cpp runs kiln's file as it runs its own."""
    import numpy as np
    from test_convert import llama_cpp_greedy
    out = tmp_path / "kiln.gguf"
    rc = convert_cli.main([smollm2_variant("f16"), "-o", str(out), "--type", ftype.lower(),
                           "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    theirs_path = llamacpp_quantized(ftype)
    with formats.read_gguf(theirs_path) as theirs, formats.read_gguf(out) as ours:
        assert ours.metadata["general.file_type"] == theirs.metadata["general.file_type"]
        assert set(ours.tensors) == set(theirs.tensors)
        differ = [n for n, t in theirs.tensors.items()
                  if ours.tensors[n].type != t.type or not np.array_equal(
                      np.asarray(ours.tensors[n].data).view(np.uint8).ravel(),
                      np.asarray(t.data).view(np.uint8).ravel())]
    assert not differ, f"{len(differ)} tensors differ from llama.cpp's: {differ[:8]}"
    assert llama_cpp_greedy(out, "The capital of France is", n=8) == \
        llama_cpp_greedy(theirs_path, "The capital of France is", n=8)


def test_fallback_notes_are_grouped():
    from engine.convert.plan import TensorPlan
    from engine.convert.streaming import grouped_notes
    rows = [TensorPlan(f"blk.{i}.attn_q.weight", (576, 576), "F16", T.Q5_0, None,
                       note=tensor_type(f"blk.{i}.attn_q.weight", (576, 576), i, MIXES["q4_k_m"],
                                        ModelFacts(30, 3, True))[1]) for i in range(3)]
    rows.append(TensorPlan("output_norm.weight", (576,), "F32", T.F32, None))
    lines = grouped_notes(rows)
    assert len(lines) == 1
    assert lines[0].startswith("note: 3 tensors (blk.0.attn_q.weight, ...): row length 576")
    assert "Q5_0" in lines[0] and "Q4_K" in lines[0]
    assert grouped_notes(rows[:1]) == [rows[0].note]
