"""LLM.generate's bookkeeping on a scripted stand-in model: stop strings split across
tokens, end tokens, max_tokens, filling the context, KV-cache prefix reuse, streaming,
validation. The stand-in's next token depends only on its position, so every expected
output here is known exactly; tests/test_llm.py runs the same API on the real model."""
import codecs

import numpy as np
import pytest

import engine.llm as llm_mod
from engine.errors import ContextOverflowError

EOS = 256          # token ids 0..255 are bytes; 256 is the end token; 257 is "<s>"
BOS = 257
N_VOCAB = 258


class ScriptedTokenizer:
    n_vocab = N_VOCAB
    bos_id = BOS
    eos_id = EOS
    eog_ids = {EOS}

    def encode(self, text, add_bos=None, special=False, plain_spans=()):
        return ([BOS] if add_bos in (None, True) else []) + list(text.encode())

    def token_bytes(self, i):
        return bytes([i]) if i < 256 else b""

    def special_token_id(self, text):
        return {"</s>": EOS, "<s>": BOS}.get(text)

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", "replace")

    def streaming_decoder(self):
        tok = self

        class Decoder:
            def __init__(self):
                self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")

            def feed(self, i):
                return self.utf8.decode(tok.token_bytes(i))

            def flush(self):
                return self.utf8.decode(b"", final=True)
        return Decoder()


class ScriptedModel:
    """Predicts script[p] as the token at position p (one-hot logits)."""

    def __init__(self, path, n_ctx=2048, n_threads=None, n_seq=1):
        self.n_ctx, self.n_threads, self.metadata = n_ctx, n_threads or 1, {}
        self.script = []
        self.calls = []
        self.closed = False

    def _row(self, pos):
        row = np.zeros(N_VOCAB, dtype=np.float32)
        row[self.script[pos] if pos < len(self.script) else EOS] = 10.0
        return row

    def eval(self, tokens, n_past, logits_all=False):
        assert 0 <= n_past and n_past + len(tokens) <= self.n_ctx and tokens
        self.calls.append((list(tokens), n_past))
        rows = [self._row(n_past + i + 1) for i in range(len(tokens))]
        return np.stack(rows) if logits_all else rows[-1]

    def close(self):
        self.closed = True


@pytest.fixture
def make_llm(monkeypatch):
    monkeypatch.setattr(llm_mod, "Model", ScriptedModel)
    monkeypatch.setattr(llm_mod, "load_tokenizer", lambda md: ScriptedTokenizer())

    def make(reply, prompt="Q:", n_ctx=64):
        llm = llm_mod.LLM("scripted.gguf", n_ctx=n_ctx)
        prompt_ids = [BOS] + list(prompt.encode())
        reply_ids = list(reply.encode()) if isinstance(reply, str) else list(reply)
        llm.model.script = prompt_ids + reply_ids
        return llm
    return make


def test_generates_the_reply_and_stops_at_the_end_token(make_llm):
    llm = make_llm("Paris.")
    out = llm.generate("Q:", temperature=0)
    assert out.text == "Paris."
    assert out.tokens == list(b"Paris.")       # no end token
    assert out.finish_reason == "stop"
    t = out.timings
    assert (t.prompt_tokens, t.generated_tokens) == (3, 6)
    assert t.prompt_seconds > 0 and t.generation_seconds > 0 and t.tokens_per_second > 0


def test_ignore_eos_keeps_going(make_llm):
    llm = make_llm(list(b"ab") + [EOS] + list(b"cd"))
    out = llm.generate("Q:", temperature=0, ignore_eos=True, max_tokens=5)
    assert out.tokens == list(b"ab") + [EOS] + list(b"cd")
    assert out.finish_reason == "length"


def test_max_tokens_gives_length(make_llm):
    llm = make_llm("abcdefgh")
    out = llm.generate("Q:", temperature=0, max_tokens=3)
    assert (out.text, out.finish_reason) == ("abc", "length")
    # the last sampled token is not evaluated: prompt (3) + 2 steps
    assert llm.n_tokens_evaluated == 5


@pytest.mark.parametrize("stop, text", [
    ("rld", "Hello wo"),              # starts in one token, ends two tokens later
    (["xyz", "o w"], "Hell"),          # the earliest of several
    ("world!", "Hello "),
    ("wox", "Hello world! END"),       # a false start is released
    ("END", "Hello world! "),
    ("", "Hello world! END"),          # empty stop strings are ignored
])
def test_stop_strings_are_never_emitted(make_llm, stop, text):
    llm = make_llm("Hello world! END")
    out = llm.generate("Q:", temperature=0, stop=stop)
    assert out.text == text
    assert out.finish_reason == "stop"
    pieces = list(llm.generate("Q:", temperature=0, stop=stop, stream=True))
    assert "".join(pieces) == text
    for s in ([stop] if isinstance(stop, str) else stop):
        if s:
            assert all(s not in "".join(pieces[:i + 1]) for i in range(len(pieces)))


def test_stop_string_that_is_a_special_tokens_text_stops_at_that_token(make_llm):
    # "<s>" adds no text when sampled, so only its id can match the stop string (as a
    # chat template's end-of-turn marker that the file does not list as end of generation)
    llm = make_llm(list(b"ab") + [BOS] + list(b"cd"))
    out = llm.generate("Q:", temperature=0, stop=["<s>"])
    assert (out.text, out.tokens, out.finish_reason) == ("ab", list(b"ab"), "stop")
    assert "".join(llm.generate("Q:", temperature=0, stop="<s>", stream=True)) == "ab"
    # with ignore_eos the stop string still applies, and plain text is no special token
    out = llm.generate("Q:", temperature=0, stop=["<s>"], ignore_eos=True, max_tokens=8)
    assert out.tokens == list(b"ab")
    out = llm.generate("Q:", temperature=0, stop="s>", max_tokens=8)
    assert out.tokens == list(b"ab") + [BOS] + list(b"cd")


def test_stop_string_held_back_until_resolved_while_streaming(make_llm):
    llm = make_llm("ab##cd")
    stream = llm.generate("Q:", temperature=0, stop="###", stream=True)
    assert next(stream) == "a"
    assert next(stream) == "b"
    # "##" could still become "###": it is released only when "c" rules that out
    assert next(stream) == "##c"
    assert list(stream) == ["d"]
    assert llm.last_completion.text == "ab##cd"


def test_stop_string_split_multibyte(make_llm):
    llm = make_llm("añb")    # "ñ" is two tokens (bytes)
    out = llm.generate("Q:", temperature=0, stop="ñ")
    assert out.text == "a"
    pieces = list(llm.generate("Q:", temperature=0, stream=True))
    assert pieces == ["a", "ñ", "b"]     # the half character is held back by the decoder


def test_streaming_equals_blocking(make_llm):
    llm = make_llm("one two three")
    blocking = llm.generate("Q:", temperature=0)
    streamed = list(llm.generate("Q:", temperature=0, stream=True))
    assert "".join(streamed) == blocking.text
    assert llm.last_completion.tokens == blocking.tokens


def test_prefix_reuse_evaluates_only_new_tokens(make_llm):
    llm = make_llm("abcdef", prompt="Q:")
    llm.generate("Q:", temperature=0, max_tokens=3)            # runs BOS Q : a b
    assert llm.n_tokens_evaluated == 5
    assert llm.cached_tokens == (BOS, *b"Q:ab")
    out = llm.generate([BOS, *b"Q:abc"], temperature=0, max_tokens=1)
    # BOS Q : a b reused; only "c" runs
    assert out.timings.prompt_tokens_evaluated == 1
    assert llm.model.calls[-1] == ([ord("c")], 5)
    # identical prompt: the last token is run again to get its logits
    llm.generate([BOS, *b"Q:abc"], temperature=0, max_tokens=1)
    assert llm.model.calls[-1] == ([ord("c")], 5)
    # diverging prompt: everything after the common prefix runs again
    llm.generate([BOS, *b"Q:x"], temperature=0, max_tokens=1)
    assert llm.model.calls[-1] == ([ord("x")], 3)
    assert llm.cached_tokens == (BOS, *b"Q:x")
    llm.reset()
    llm.generate([BOS, *b"Q:x"], temperature=0, max_tokens=1)
    assert llm.model.calls[-1] == ([BOS, *b"Q:x"], 0)


def test_prompt_longer_than_context(make_llm):
    llm = make_llm("abc", n_ctx=8)
    with pytest.raises(ContextOverflowError, match=r"10 tokens.*holds 8"):
        llm.generate("Q:1234567", temperature=0)
    with pytest.raises(ContextOverflowError):
        llm.logits(list(range(9)))


def test_filling_the_context_ends_with_length(make_llm):
    llm = make_llm("abcdefghijklmnop", n_ctx=8)
    out = llm.generate("Q:", temperature=0, max_tokens=100)
    assert out.finish_reason == "length"
    assert out.text == "abcde"                  # 3 prompt tokens + 5 = 8
    assert max(n + len(t) for t, n in llm.model.calls) <= 8
    full = llm.generate([BOS, *b"Q:abcde"], temperature=0)
    assert (full.tokens, full.finish_reason) == ([], "length")


def test_logits_all_positions_and_cache(make_llm):
    llm = make_llm("abc")
    ids = [BOS, *b"Q:ab"]
    lg = llm.logits(ids)
    assert lg.shape == (5, N_VOCAB) and lg.dtype == np.float32
    assert lg.argmax(axis=1).tolist() == [ord("Q"), ord(":"), ord("a"), ord("b"), ord("c")]
    assert llm.cached_tokens == tuple(ids)


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=float("nan")), "min_p"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(seed=-5), "seed"),
    (dict(stop=[3]), "stop"),
])
def test_invalid_arguments_raise_at_the_call(make_llm, kwargs, name):
    llm = make_llm("abc")
    with pytest.raises(ValueError, match=name):
        llm.generate("Q:", **kwargs)
    with pytest.raises(ValueError, match=name):
        llm.generate("Q:", stream=True, **kwargs)    # before the first next()
    assert llm.n_tokens_evaluated == 0


def test_bad_prompts(make_llm):
    llm = make_llm("abc")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([1, N_VOCAB + 5])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([])
    with pytest.raises(TypeError, match="prompt"):
        llm.generate(3.5)


def test_interleaved_stream_is_refused(make_llm):
    llm = make_llm("abcdef")
    s = llm.generate("Q:", temperature=0, stream=True)
    next(s)
    llm.generate("Q:", temperature=0, max_tokens=1)
    with pytest.raises(RuntimeError, match="another call"):
        list(s)


def test_close_and_context_manager(make_llm):
    with make_llm("abc") as llm:
        assert llm.generate("Q:", temperature=0).text == "abc"
    assert llm.model.closed
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate("Q:")


def test_seeded_sampling_is_reproducible(make_llm):
    llm = make_llm("abcdef")
    # flat logits over the bytes: the draw is decided by the seed alone
    llm.model._row = lambda pos: np.r_[np.zeros(256, np.float32), -1e9, -1e9].astype(np.float32)
    a = llm.generate("Q:", temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3, max_tokens=12)
    b = llm.generate("Q:", temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3, max_tokens=12)
    c = llm.generate("Q:", temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=4, max_tokens=12)
    assert a.tokens == b.tokens != c.tokens
