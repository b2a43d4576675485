"""engine.tokenizer against llama.cpp's tokenizer, token for token.

Two vocabularies: a SentencePiece one (sentencepiece's own test model, llama-style layout,
stored in fixtures/tokenizer_spm.json) and SmolLM2's byte-level BPE (the real model file),
the latter under five pre-tokenizers. Every corpus text is compared with ids recorded from
llama-cpp-python (always) and with llama-cpp-python itself (when it is installed).
Re-record the fixtures with:  .venv/bin/python tests/test_tokenizer.py
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
SPM_FIXTURE = FIXTURES / "tokenizer_spm.json"
BPE_FIXTURE = FIXTURES / "tokenizer_smollm2.json"
# Pre-tokenizers checked on SmolLM2's vocabulary and merges (the file's own is "smollm").
BPE_PRES = ["smollm", "llama-bpe", "qwen2", "default", "gpt-2"]

BOTCHAN = (
    "No translation can expect to equal, much less to excel, the original.\n"
    "The excellence of a translation can only be judged by noting how far it\n"
    "has succeeded in reproducing the original tone, colors, style, the\n"
    "delicacy of sentiment, the force of inert strength, the peculiar\n"
    "expressions native to the language with which the original is written,\n"
    "or whatever is its marked characteristic.")

CORPUS = [
    "", "Hello world", "Hello, world!", " Hello", "hello  world", "HELLO WORLD",
    BOTCHAN,
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; they've gone, I'm sure.",
    "I'm can't we'll they've she'd IT'S DON'T 's 'S 'll",
    # code
    "def square(x):\n    return x ** 2  # square it\n\n\nprint(square(12))\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}",
    "const f = async (a, b) => { await g(a?.b ?? 0); return `${a}-${b}`; };",
    "<html><body class=\"main\">&nbsp;&lt;tag&gt;</body></html>",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name DESC;",
    "# Title\n\n- item 1\n- item 2\n\n```python\nprint('hi')\n```\n",
    # digits
    "1234567890", "3.14159265358979", "1,000,000 and 1.000.000", "The year 2024 had 366 days.",
    "12 345 6789 01234 567890123", "٣٤٥ ²³ ½ ① Ⅻ", "0x1F600 0b1010 1e-9 -42",
    # emoji
    "😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷", "I ❤️ pizza 🍕!", "✨🚀✨",
    # CJK and other scripts
    "中文字符测试，你好世界。", "日本語のテキスト、カタカナとひらがな。", "한국어 텍스트입니다",
    "Привет, мир! Как дела?", "Ελληνικά γράμματα", "עברית מימין לשמאל", "مرحبا بالعالم",
    "हिन्दी पाठ", "ภาษาไทย", "naïve café résumé Zürich façade Ångström",
    # whitespace runs
    " ", "  ", "   ", "\n", "\n\n\n", "\t", "\t\tindented", "a  b   c    d     e",
    "   leading and trailing   ", "line1\r\nline2\r\n", "x" + " " * 40 + "y",
    "\u00a0non-breaking\u3000ideographic\u2003em", "trailing newline\n", " \n \n ",
    # special-token-looking text
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>", "<s> </s> <unk>", "<|im_start|", "<<|im_end|>>", "a<sep>b <sep> c",
    "<|im_end|><|im_end|>", "text<|im_start|>", "<0x41> <0xFF>",
    # punctuation and symbols
    "!!!???...---___***", "$100 + 5% = ~$105 ^^ || <=> `x`",
    "email@example.com https://example.com/path?q=1&r=2#frag",
    "Ünïcödé™ ©2024 — “quotes” ‘single’ … • ¶ § ° ± × ÷",
    "\x00\x01\x7f control", "\u200b zero\u200dwidth", "\ufeffBOM",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]

_POOL = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
         + list("  \n\n\t\r'\".,;:!?-_()[]{}<>|/\\@#$%^&*+=~`") + list("éüñßçØ")
         + list("中文字日本語한국") + ["😀", "👍🏽", "🇫🇷", "\u00a0", "\u3000", "²", "½"]
         + ["'s", "'LL", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<sep>", " the", "ing"])


def fuzz_texts(n=100, seed=1234):
    """Random strings mixing the awkward cases (stored in the fixtures, so the exact generator
    output does not matter)."""
    rng = random.Random(seed)
    return ["".join(rng.choice(_POOL) for _ in range(rng.randint(1, 24))) for _ in range(n)]


# -- the vocab files ---------------------------------------------------------------------

LLAMA_HPARAMS = {  # minimal llama hyper-parameters so llama.cpp loads a vocab-only file
    "general.architecture": "llama", "general.name": "kiln tokenizer test",
    "llama.context_length": 2048, "llama.embedding_length": 64, "llama.block_count": 1,
    "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 4, "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "llama.rope.dimension_count": 16,
}


def spm_metadata(vocab: dict, add_space_prefix: bool | None = None) -> dict:
    """GGUF metadata of the SentencePiece test vocabulary stored in tokenizer_spm.json."""
    extra = {} if add_space_prefix is None else {"tokenizer.ggml.add_space_prefix": add_space_prefix}
    return {
        **extra,
        **LLAMA_HPARAMS,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": vocab["tokens"],
        "tokenizer.ggml.scores": np.asarray(vocab["scores"], dtype=np.float32),
        "tokenizer.ggml.token_type": np.asarray(vocab["token_type"], dtype=np.int32),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def write_vocab_gguf(path, metadata) -> str:
    import formats
    formats.write_gguf(path, metadata, [])
    return str(path)


def bpe_metadata(smollm2_path, pre: str) -> dict:
    """SmolLM2's tokenizer keys with tokenizer.ggml.pre set to `pre`."""
    import formats
    with formats.read_gguf(smollm2_path) as f:
        md = {k: v for k, v in f.metadata.items() if k.startswith("tokenizer.ggml.")}
        md.update({k: v for k, v in LLAMA_HPARAMS.items()})
    md["tokenizer.ggml.pre"] = pre
    return md


def pieces_digest(pieces) -> str:
    """One hash over every token's bytes (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for p in pieces:
        h.update(len(p).to_bytes(4, "little") + p)
    return h.hexdigest()


# -- recording from llama.cpp -------------------------------------------------------------

def llama_vocab(path):
    from llama_cpp import Llama
    return Llama(path, vocab_only=True, verbose=False)


def llama_tokenize(llm, text, add_special, special):
    return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=special)


def llama_pieces(llm, special):
    import ctypes

    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buf = ctypes.create_string_buffer(256)
    out = []
    for i in range(llm.n_vocab()):
        n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, special)
        assert 0 <= n <= len(buf)
        out.append(buf.raw[:n])
    return out


def llama_eog(llm):
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]


def record_cases(llm, texts, variants):
    return [{"text": t, "add_special": a, "special": s, "ids": llama_tokenize(llm, t, a, s)}
            for t in texts for a, s in variants]


ALL_VARIANTS = [(True, False), (False, True)]


def record(tmp: Path, smollm2_path: str):
    import llama_cpp
    texts = CORPUS + fuzz_texts()
    spm = json.loads(SPM_FIXTURE.read_text())
    llm = llama_vocab(write_vocab_gguf(tmp / "spm.gguf", spm_metadata(spm["vocab"])))
    spm.update(llama_cpp_version=llama_cpp.__version__,
               cases=record_cases(llm, texts, ALL_VARIANTS),
               pieces_sha256=pieces_digest(llama_pieces(llm, False)),
               pieces_special_sha256=pieces_digest(llama_pieces(llm, True)),
               eog_ids=llama_eog(llm), bos_id=llm.token_bos(), eos_id=llm.token_eos())
    llm = llama_vocab(write_vocab_gguf(tmp / "spm-np.gguf", spm_metadata(spm["vocab"], False)))
    spm["cases_no_space_prefix"] = record_cases(llm, CORPUS, ALL_VARIANTS)
    SPM_FIXTURE.write_text(json.dumps(spm, ensure_ascii=False, indent=0) + "\n")

    bpe = {"llama_cpp_version": llama_cpp.__version__, "pres": {}}
    for pre in BPE_PRES:
        llm = llama_vocab(write_vocab_gguf(tmp / f"bpe-{pre}.gguf", bpe_metadata(smollm2_path, pre)))
        variants = ALL_VARIANTS if pre == "smollm" else [(True, False)]
        bpe["pres"][pre] = {"cases": record_cases(llm, texts, variants)}
        if pre == "smollm":
            bpe.update(pieces_sha256=pieces_digest(llama_pieces(llm, False)),
                       pieces_special_sha256=pieces_digest(llama_pieces(llm, True)),
                       eog_ids=llama_eog(llm), bos_id=llm.token_bos(), eos_id=llm.token_eos())
    BPE_FIXTURE.write_text(json.dumps(bpe, ensure_ascii=False, indent=0) + "\n")



# -- fixtures ------------------------------------------------------------------------------

def _load(path):
    return json.loads(path.read_text())


def _read_metadata(path):
    import formats
    with formats.read_gguf(path) as f:
        return dict(f.metadata.items())


@pytest.fixture(scope="module")
def spm_fixture():
    return _load(SPM_FIXTURE)


@pytest.fixture(scope="module")
def bpe_fixture():
    return _load(BPE_FIXTURE)


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory, spm_fixture):
    return write_vocab_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", spm_metadata(spm_fixture["vocab"]))


@pytest.fixture(scope="module")
def spm_tok(spm_gguf):
    from engine.tokenizer import load_tokenizer
    return load_tokenizer(_read_metadata(spm_gguf))


@pytest.fixture(scope="module")
def bpe_gguf(tmp_path_factory, smollm2_path):
    d = tmp_path_factory.mktemp("bpe")
    return {pre: write_vocab_gguf(d / f"{pre}.gguf", bpe_metadata(smollm2_path, pre)) for pre in BPE_PRES}


@pytest.fixture(scope="module")
def bpe_toks(bpe_gguf, smollm2_path):
    from engine.tokenizer import load_tokenizer
    toks = {pre: load_tokenizer(_read_metadata(path)) for pre, path in bpe_gguf.items()}
    toks["file"] = load_tokenizer(_read_metadata(smollm2_path))
    return toks


def _encode(tok, case):
    # llama-cpp-python's add_bos=True means "add the special tokens the file asks for"
    return tok.encode(case["text"], add_bos=None if case["add_special"] else False,
                      special=case["special"])


def _mismatches(tok, cases):
    bad = []
    for case in cases:
        got = _encode(tok, case)
        if got != case["ids"]:
            bad.append((case["text"], case["add_special"], case["special"], got, case["ids"]))
    return bad


# -- against recorded llama.cpp ids (always run) ------------------------------------------

def test_spm_matches_llama_cpp_fixture(spm_tok, spm_fixture):
    assert len(spm_fixture["cases"]) >= 2 * len(CORPUS)
    assert _mismatches(spm_tok, spm_fixture["cases"]) == []


@pytest.fixture(scope="module")
def spm_no_prefix(tmp_path_factory, spm_fixture):
    from engine.tokenizer import load_tokenizer
    path = write_vocab_gguf(tmp_path_factory.mktemp("spm-np") / "spm-np.gguf",
                            spm_metadata(spm_fixture["vocab"], add_space_prefix=False))
    return path, load_tokenizer(_read_metadata(path))


@pytest.mark.oracle
def test_spm_without_space_prefix_matches_llama_cpp(spm_no_prefix, spm_fixture):
    """tokenizer.ggml.add_space_prefix = false: no dummy-prefix space, none stripped."""
    path, tok = spm_no_prefix
    assert _mismatches(tok, spm_fixture["cases_no_space_prefix"]) == []
    assert tok.decode(tok.encode("Hello")) == "Hello"
    if importlib.util.find_spec("llama_cpp"):
        assert _mismatches(tok, _live_cases(path, CORPUS)) == []


@pytest.mark.parametrize("pre", BPE_PRES)
def test_bpe_matches_llama_cpp_fixture(bpe_toks, bpe_fixture, pre):
    assert _mismatches(bpe_toks[pre], bpe_fixture["pres"][pre]["cases"]) == []


def test_bpe_file_metadata_is_smollm(bpe_toks, bpe_fixture):
    """The real file (pre-tokenizer 'smollm') read directly gives the same ids."""
    assert _mismatches(bpe_toks["file"], bpe_fixture["pres"]["smollm"]["cases"]) == []


def test_token_pieces_and_special_ids_match_fixture(spm_tok, bpe_toks, spm_fixture, bpe_fixture):
    for tok, fx in ((spm_tok, spm_fixture), (bpe_toks["file"], bpe_fixture)):
        ids = range(tok.n_vocab)
        assert pieces_digest([tok.token_bytes(i) for i in ids]) == fx["pieces_sha256"]
        assert pieces_digest([tok.token_bytes(i, special=True) for i in ids]) == fx["pieces_special_sha256"]
        assert sorted(tok.eog_ids) == fx["eog_ids"]
        assert (tok.bos_id, tok.eos_id) == (fx["bos_id"], fx["eos_id"])


# -- against llama.cpp itself (when llama-cpp-python is installed) ------------------------

def _live_cases(path, texts):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the tokenizer oracle) is not installed")
    return record_cases(llama_vocab(path), texts, ALL_VARIANTS)


@pytest.mark.oracle
def test_spm_matches_llama_cpp_live(spm_tok, spm_gguf):
    texts = CORPUS + fuzz_texts(200, seed=99)
    assert _mismatches(spm_tok, _live_cases(spm_gguf, texts)) == []


@pytest.mark.oracle
@pytest.mark.parametrize("pre", BPE_PRES)
def test_bpe_matches_llama_cpp_live(bpe_toks, bpe_gguf, pre):
    texts = CORPUS + fuzz_texts(200, seed=99)
    assert _mismatches(bpe_toks[pre], _live_cases(bpe_gguf[pre], texts)) == []


@pytest.mark.oracle
def test_pieces_and_eog_match_llama_cpp_live(spm_tok, bpe_toks, spm_gguf, bpe_gguf):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the tokenizer oracle) is not installed")
    for tok, path in ((spm_tok, spm_gguf), (bpe_toks["smollm"], bpe_gguf["smollm"])):
        llm = llama_vocab(path)
        for special in (False, True):
            assert [tok.token_bytes(i, special) for i in range(tok.n_vocab)] == llama_pieces(llm, special)
        assert sorted(tok.eog_ids) == llama_eog(llm)


def _real_spm_models():
    """Real Llama-style SentencePiece models, where a package ships them (mistral-common has
    Mistral 7B's): checked when that package is installed."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    return sorted(str(p) for p in data.glob("*.model.v[13]"))


@pytest.mark.oracle
@pytest.mark.parametrize("model_file", _real_spm_models() or [pytest.param(None, marks=pytest.mark.skip(
    reason="no real SentencePiece model installed (pip install mistral-common)"))])
def test_real_sentencepiece_model(tmp_path, model_file):
    """A real 32k vocabulary converted as llama.cpp's converter does: the same ids as the
    original SentencePiece model and (when installed) as llama.cpp."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as pb

    from engine.tokenizer import load_tokenizer
    m = pb.ModelProto()
    m.ParseFromString(Path(model_file).read_bytes())
    vocab = {"tokens": [p.piece for p in m.pieces], "scores": [p.score for p in m.pieces],
             "token_type": [p.type for p in m.pieces]}  # same numbering as GGUF's token types
    path = write_vocab_gguf(tmp_path / "real.gguf",
                            spm_metadata(vocab, m.normalizer_spec.add_dummy_prefix))
    tok = load_tokenizer(_read_metadata(path))
    texts = CORPUS + fuzz_texts(200, seed=5)
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    assert [t for t in texts if sp.encode(t) != tok.encode(t, add_bos=False)] == []
    if importlib.util.find_spec("llama_cpp"):
        assert _mismatches(tok, _live_cases(path, texts)) == []


# -- behaviour -----------------------------------------------------------------------------

ROUND_TRIP = CORPUS + fuzz_texts(50, seed=7)


def test_round_trip(spm_tok, bpe_toks):
    for tok in (spm_tok, bpe_toks["file"]):
        for text in ROUND_TRIP:
            if tok is spm_tok and "<sep>" in text:
                continue  # llama.cpp adds a dummy-prefix space after a user-defined token
            for add_bos in (True, False):
                assert tok.decode(tok.encode(text, add_bos=add_bos)) == text, (text, add_bos)


def test_special_tokens_only_when_asked(spm_tok, bpe_toks):
    chat = "<|im_start|>user\nHi<|im_end|>"
    for tok in (spm_tok, bpe_toks["file"]):
        start, end = (tok.encode(t, add_bos=False, special=True) for t in ("<|im_start|>", "<|im_end|>"))
        assert len(start) == 1 and len(end) == 1
        with_special = tok.encode(chat, add_bos=False, special=True)
        assert with_special[0] == start[0] and with_special[-1] == end[0]
        plain = tok.encode(chat, add_bos=False)
        assert start[0] not in plain and end[0] not in plain
        assert tok.decode(plain) == chat
        # control tokens render as nothing unless asked (llama_token_to_piece special=False)
        assert tok.decode(with_special) in ("user\nHi", " user\nHi")
        assert tok.decode(with_special, special=True).endswith("Hi<|im_end|>")
        assert end[0] in tok.eog_ids


def test_user_defined_token_is_always_split(spm_tok):
    sep = spm_tok.encode("<sep>", add_bos=False)
    assert len(sep) == 1 and spm_tok.token_text(sep[0]) == "<sep>"
    assert sep[0] in spm_tok.encode("a<sep>b", add_bos=False, special=False)


def test_bos_follows_the_file(spm_tok, bpe_toks):
    smol = bpe_toks["file"]
    assert spm_tok.add_bos and spm_tok.encode("hi")[0] == spm_tok.bos_id == 1
    assert spm_tok.encode("hi", add_bos=False)[0] != 1
    assert not smol.add_bos and smol.encode("hi")[0] != smol.bos_id
    assert smol.encode("hi", add_bos=True)[0] == smol.bos_id == 1
    assert spm_tok.encode("") == [1] and spm_tok.encode("", add_bos=False) == []
    assert smol.encode("", add_eos=True) == [smol.eos_id]


def test_bos_default_follows_pre_tokenizer(smollm2_path):
    """llama.cpp adds BOS for llama3-style vocabularies unless the file says otherwise."""
    from engine.tokenizer import Tokenizer, load_tokenizer
    md = bpe_metadata(smollm2_path, "llama-bpe")
    del md["tokenizer.ggml.add_bos_token"]
    tok = load_tokenizer(md)
    assert isinstance(tok, Tokenizer) and tok.add_bos and tok.encode("hi")[0] == tok.bos_id
    md["tokenizer.ggml.pre"] = "qwen2"
    assert not load_tokenizer(md).add_bos


@pytest.mark.oracle
def test_control_looking_tokens(tmp_path):
    """Tokens typed normal but named like control tokens are made control tokens (never taken
    from user text; <|eot_id|> ends generation), and gpt-oss's <|channel|> is always split
    out, as llama.cpp does; checked live when llama-cpp-python is installed."""
    from engine.tokenizer import load_tokenizer
    extra = ["▁", "a", "<|eot_id|>", "<PRE>", "<|channel|>"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + extra
    vocab = {"tokens": tokens, "scores": [0.0] * len(tokens),
             "token_type": [2, 3, 3] + [6] * 256 + [1] * len(extra)}
    path = write_vocab_gguf(tmp_path / "v.gguf", spm_metadata(vocab))
    tok = load_tokenizer(_read_metadata(path))
    eot, pre, channel = (tokens.index(t) for t in ("<|eot_id|>", "<PRE>", "<|channel|>"))
    assert tok.eog_ids == {2, eot}
    assert tok.encode("a<|eot_id|>", special=True)[-1] == eot
    assert eot not in tok.encode("a<|eot_id|>") and pre not in tok.encode("<PRE>")
    assert channel in tok.encode("x<|channel|>y")
    assert tok.decode(tok.encode("<|eot_id|>", special=True)) == ""
    if importlib.util.find_spec("llama_cpp"):
        texts = ["a<|eot_id|>", "<PRE>a", "x<|channel|>y", "a a<|channel|><|eot_id|>"]
        assert _mismatches(tok, _live_cases(path, texts)) == []
        assert sorted(tok.eog_ids) == llama_eog(llama_vocab(path))


def test_smollm2_facts(bpe_toks):
    tok = bpe_toks["file"]
    assert tok.n_vocab == 49152
    assert tok.token_text(tok.eos_id) == "<|im_end|>"
    assert {tok.token_text(i) for i in tok.eog_ids} >= {"<|im_end|>", "<|endoftext|>"}
    assert tok.token_text(tok.encode(" the")[0]) == "Ġthe"
    assert tok.token_bytes(tok.encode(" the")[0]) == b" the"


def test_spm_pieces(spm_tok):
    ids = spm_tok.encode("the end", add_bos=False)
    assert spm_tok.token_text(ids[0]).startswith("▁")
    assert spm_tok.token_bytes(ids[0]).startswith(b" ")
    assert spm_tok.token_bytes(spm_tok.encode("é", add_bos=False)[-1]) in (b"\xc3", b"\xa9")


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_streaming_holds_back_split_characters(spm_tok, bpe_toks, which):
    tok = spm_tok if which == "spm" else bpe_toks["file"]
    text = "a😀b中c"
    ids = tok.encode(text, add_bos=False)
    # the emoji is spread over several byte tokens in both vocabularies
    assert len(ids) > len(text)
    dec = tok.streaming_decoder(strip_leading_space=True)
    pieces = [dec.feed(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces.count("") >= 2  # bytes of an incomplete character were held back
    emoji = [p for p in pieces if "😀" in p]
    assert len(emoji) == 1


def test_streaming_equals_decode(spm_tok, bpe_toks):
    for tok in (spm_tok, bpe_toks["file"]):
        for text in ROUND_TRIP:
            ids = tok.encode(text)
            dec = tok.streaming_decoder(strip_leading_space=True)
            assert "".join(dec.feed(i) for i in ids) + dec.flush() == tok.decode(ids)


def test_streaming_continuation_keeps_space(spm_tok):
    ids = spm_tok.encode("the end", add_bos=False)
    dec = spm_tok.streaming_decoder()
    assert dec.feed(ids[0]).startswith(" ")


def test_streaming_flush_of_truncated_character(bpe_toks):
    tok = bpe_toks["file"]
    dec = tok.streaming_decoder()
    first = tok.encode("😀")[0]
    assert dec.feed(first) == ""
    assert dec.flush() == "\ufffd"
    assert dec.flush() == ""


def test_errors(bpe_toks, spm_fixture):
    from engine.errors import ModelError
    from engine.tokenizer import load_tokenizer
    md = spm_metadata(spm_fixture["vocab"])
    with pytest.raises(ModelError, match="'bert'"):
        load_tokenizer({**md, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ModelError, match="tokenizer.ggml.model"):
        load_tokenizer({k: v for k, v in md.items() if k != "tokenizer.ggml.model"})
    with pytest.raises(ModelError, match="duplicate token"):
        load_tokenizer({**md, "tokenizer.ggml.tokens": ["<unk>", "<unk>"] + md["tokenizer.ggml.tokens"][2:]})
    bpe = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
           "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.pre": "deepseek-coder"}
    with pytest.raises(ModelError, match="'deepseek-coder'"):
        load_tokenizer(bpe)
    tok = bpe_toks["file"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.n_vocab])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="position 2"):
        tok.encode("ab\udcffc")


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from engine.cli.pull import pull
    with tempfile.TemporaryDirectory() as d:
        record(Path(d), str(pull()))
    print("recorded", SPM_FIXTURE, BPE_FIXTURE)


def test_special_token_id_finds_control_tokens_by_text(bpe_toks, spm_tok):
    tok = bpe_toks["file"]  # SmolLM2: <|im_end|> is a control token, id 2
    assert tok.special_token_id("<|im_end|>") == 2
    assert tok.decode([2]) == ""               # adds no text: stop strings cannot see it
    assert tok.special_token_id("Hello") is None          # ordinary text
    assert tok.special_token_id("<|im_end|>x") is None    # more than the token
    assert spm_tok.special_token_id(spm_tok.token_text(spm_tok.eos_id)) == spm_tok.eos_id


@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_token_bytes_that_are_not_utf8_load_and_decode_raw(kind, tmp_path, spm_fixture, smollm2_path):
    """A vocabulary string whose bytes are not UTF-8 (a malformed or hostile file) does
    not stop the tokenizer: the token decodes to the file's bytes, can never match text,
    and every other token tokenizes as before."""
    from engine.tokenizer import load_tokenizer
    md = spm_metadata(spm_fixture["vocab"]) if kind == "spm" else bpe_metadata(smollm2_path, "smollm")
    good = load_tokenizer(_read_metadata(write_vocab_gguf(tmp_path / "good.gguf", md)))
    tokens = list(md["tokenizer.ggml.tokens"])
    bad_id = next(i for i in range(len(tokens) - 1, 0, -1) if good.vocab.types[i] == 1)
    tokens[bad_id] = b"\xff\xfe".decode("utf-8", "surrogateescape")
    tok = load_tokenizer(_read_metadata(write_vocab_gguf(tmp_path / "bad.gguf",
                                                         {**md, "tokenizer.ggml.tokens": tokens})))
    assert tok._decode_bytes([bad_id], False).endswith(b"\xff\xfe")
    assert tok.decode([bad_id]).endswith("\ufffd\ufffd")
    for text in ("Hello world", "tokens and more tokens", "ÿþ"):
        ids = tok.encode(text, add_bos=False)
        assert bad_id not in ids and tok.decode(ids) == good.decode(good.encode(text, add_bos=False))
