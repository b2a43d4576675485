"""ChatSession and chat_completion on a stand-in model whose reply is a pure function of
the conversation in its KV cache (the last user message, upper-cased). Every count here
is therefore known exactly: which tokens each turn evaluates, when old turns are dropped,
what an interrupted reply leaves behind. tests/test_chat_smollm2.py runs the real model."""
import io
import json
import re

import numpy as np
import pytest

import engine.llm as llm_mod
from engine.chat import ChatSession, chat_completion
from engine.errors import ContextOverflowError, KilnError
from engine.cli.repl import Repl

IM_END, IM_START, ENDOFTEXT = 256, 257, 258          # ids 0..255 are bytes
SPECIAL = {"<|im_end|>": IM_END, "<|im_start|>": IM_START, "<|endoftext|>": ENDOFTEXT}
N_VOCAB = 259
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class ByteTokenizer:
    n_vocab = N_VOCAB
    bos_id = IM_START
    eos_id = IM_END
    eog_ids = {IM_END, ENDOFTEXT}

    def encode(self, text, add_bos=None, special=False, plain_spans=()):
        ids, at = [], 0
        if plain_spans:
            for start, end in [*sorted(plain_spans), (len(text), len(text))]:
                ids += self.encode(text[at:start], special=special)
                ids += list(text[start:end].encode())  # message contents: plain text
                at = end
            return ids
        parts = re.split("(" + "|".join(map(re.escape, SPECIAL)) + ")", text) if special else [text]
        for p in parts:
            ids += [SPECIAL[p]] if p in SPECIAL else list(p.encode())
        return ids

    def token_text(self, i):
        return {v: k for k, v in SPECIAL.items()}.get(i) or bytes([i]).decode("latin-1")

    def token_bytes(self, i):
        return bytes([i]) if i < 256 else b""

    def special_token_id(self, text):
        return SPECIAL.get(text)

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", "replace")

    def streaming_decoder(self):
        import codecs
        tok, dec = self, codecs.getincrementaldecoder("utf-8")("replace")

        class D:
            def feed(self, i):
                return dec.decode(tok.token_bytes(i))

            def flush(self):
                return dec.decode(b"", final=True)
        return D()


class EchoModel:
    """Replies with the last user message upper-cased, then <|im_end|>. It reads the
    conversation from its own KV cache, so a stale or wrong cache gives a wrong reply."""

    def __init__(self, path, n_ctx=2048, n_threads=None, n_seq=1):
        self.n_ctx, self.n_threads = n_ctx, 1
        self.metadata = {"tokenizer.chat_template": CHATML, "tokenizer.ggml.model": "gpt2"}
        self.kv = []
        self.evaluated = []        # every eval call's tokens

    def _next(self, ctx):
        tok = ByteTokenizer()
        marks = [i for i, t in enumerate(ctx) if t == IM_START]
        last = marks[-1]
        head = bytes(t for t in ctx[last + 1:last + 11] if t < 256)
        if not head.startswith(b"assistant\n"):
            return ENDOFTEXT
        user = tok.decode(ctx[marks[-2] + 1:]).split("\n", 1)[1]
        user = user[:user.index("\n")] if "\n" in user else user
        target = list(user.upper().encode())
        done = ctx[last + 11:]
        return target[len(done)] if len(done) < len(target) else IM_END

    def eval(self, tokens, n_past, logits_all=False):
        assert n_past <= len(self.kv) and n_past + len(tokens) <= self.n_ctx
        self.kv[n_past:] = list(tokens)
        self.evaluated.append(list(tokens))
        row = np.zeros(N_VOCAB, np.float32)
        row[self._next(self.kv)] = 10
        return row

    def close(self):
        pass


@pytest.fixture
def llm(monkeypatch):
    monkeypatch.setattr(llm_mod, "Model", EchoModel)
    monkeypatch.setattr(llm_mod, "load_tokenizer", lambda md: ByteTokenizer())

    def make(n_ctx=512):
        return llm_mod.LLM("echo.gguf", n_ctx=n_ctx)
    return make


def render(messages):
    from engine.chat_template import ChatTemplate
    return ChatTemplate(CHATML).render(messages)


def test_chat_completion_uses_the_template_and_stops_at_end_of_turn(llm):
    m = llm()
    out = chat_completion(m, [{"role": "user", "content": "hello"}], temperature=0)
    assert out.text == "HELLO" and out.finish_reason == "stop"
    assert out.prompt_tokens == ByteTokenizer().encode(render([{"role": "user", "content": "hello"}]),
                                                      special=True)
    assert "".join(m.chat([{"role": "user", "content": "abc"}], stream=True, temperature=0)) == "ABC"


def test_follow_up_turns_evaluate_only_the_new_tokens(llm):
    m = llm()
    s = ChatSession(m, system="sys", temperature=0)
    history = [{"role": "system", "content": "sys"}]
    prev_len = 0
    for i, q in enumerate(["one", "two two", "three"]):
        before = m.n_tokens_evaluated
        reply = s.send(q)
        assert reply == q.upper()
        history += [{"role": "user", "content": q}]
        prompt = ByteTokenizer().encode(render(history), special=True)
        history += [{"role": "assistant", "content": reply}]
        new = len(prompt) - prev_len
        st = s.last_stats
        assert st.timings.prompt_tokens == len(prompt)
        assert st.timings.prompt_tokens_evaluated == new, f"turn {i}"
        # the new prompt tokens, then each reply token (the end token is never run)
        assert m.n_tokens_evaluated - before == new + len(reply)
        prev_len = len(prompt) + len(reply)


def test_same_replies_as_rerendering_from_scratch(llm):
    s = ChatSession(llm(), temperature=0)
    fresh = llm()
    for q in ["alpha", "beta", "gamma"]:
        reply = s.send(q)
        fresh.reset()
        assert fresh.chat(s.messages[:-1], temperature=0).text == reply


def test_streaming_and_interrupting_keeps_the_partial_reply(llm):
    m = llm()
    s = ChatSession(m, temperature=0)
    stream = s.send("abcdefgh", stream=True)
    got = [next(stream) for _ in range(3)]
    stream.close()                     # what the REPL does on Ctrl-C
    assert "".join(got) == "ABC"
    assert s.messages[-1] == {"role": "assistant", "content": "ABC"}
    assert s.last_stats.finish_reason == "interrupted"
    assert s.last_stats.timings.prompt_tokens_evaluated == s.last_stats.timings.prompt_tokens
    # the session goes on, and the model sees the partial reply in its context
    assert s.send("xy") == "XY"
    assert [x["content"] for x in s.messages] == ["abcdefgh", "ABC", "xy", "XY"]


def test_an_error_leaves_the_history_unchanged(llm):
    s = ChatSession(llm(), temperature=-1)
    with pytest.raises(ValueError):
        s.send("hi")
    assert s.messages == []


def test_oldest_turns_are_dropped_after_the_system_prompt(llm):
    m = llm(n_ctx=160)
    s = ChatSession(m, system="S", temperature=0, max_tokens=20)
    for q in ["first question", "second question", "third question", "fourth question"]:
        assert s.send(q) == q.upper()
    st = s.last_stats
    assert st.dropped_messages >= 2 and st.dropped_messages % 2 == 0
    assert s.messages[0] == {"role": "system", "content": "S"}
    assert s.messages[-2:] == [{"role": "user", "content": "fourth question"},
                               {"role": "assistant", "content": "FOURTH QUESTION"}]
    assert s.messages[1]["role"] == "user"
    assert st.timings.prompt_tokens + 20 <= 160
    with pytest.raises(ContextOverflowError, match="too long"):
        s.send("x" * 400)
    assert s.messages[-1]["content"] == "FOURTH QUESTION"


def test_clear_system_save_load(llm, tmp_path):
    m = llm()
    s = ChatSession(m, system="S", temperature=0)
    s.send("hi")
    s.clear()
    assert s.messages == [{"role": "system", "content": "S"}]
    s.set_system("T")
    s.send("yo")
    assert s.messages == [{"role": "system", "content": "T"}, {"role": "user", "content": "yo"},
                          {"role": "assistant", "content": "YO"}]
    s.update_settings(top_k=7)
    path = tmp_path / "conv.json"
    s.save(path)
    s2 = ChatSession(llm(), temperature=0.5)
    s2.load(path)
    assert s2.messages == s.messages and s2.settings["top_k"] == 7 and s2.settings["temperature"] == 0
    assert s2.send("more") == "MORE"
    path.write_text(json.dumps([{"role": "user", "content": 3}]))
    with pytest.raises(KilnError, match="message 0"):
        s2.load(path)
    with pytest.raises(KilnError, match="no such"):
        s2.load(tmp_path / "missing.json")
    with pytest.raises(KilnError, match="unknown chat setting"):
        s2.update_settings(temp=1)


def test_repl_piped_prints_one_reply_per_line(llm):
    s = ChatSession(llm(), temperature=0)
    out, err = io.StringIO(), io.StringIO()
    rc = Repl(s, stdin=io.StringIO("hi\n\n/set top_k 3\nwhat is 2+2?\n"), stdout=out, stderr=err,
              interactive=False).run()
    assert rc == 0
    assert out.getvalue() == "HI\nWHAT IS 2+2?\n"
    assert "top_k = 3" in err.getvalue() and s.settings["top_k"] == 3


def test_repl_commands(llm, tmp_path):
    s = ChatSession(llm(), system="S", temperature=0)
    out, err = io.StringIO(), io.StringIO()
    script = "\n".join(["hello", "/stats", "/save " + str(tmp_path / "c.json"), "/clear", "/system",
                         "/system be nice", "/set temp 0.5", "/set temp -1", "/set seed none",
                         "/set max_tokens 5", "/set top_k x", "/nope", "/load " + str(tmp_path / "c.json"),
                         "/bye", "never sent"]) + "\n"
    rc = Repl(s, stdin=io.StringIO(script), stdout=out, stderr=err, interactive=False).run()
    assert out.getvalue() == "HELLO\n"
    e = err.getvalue()
    assert "context:" in e and "saved 3 messages" in e and "conversation cleared" in e
    assert "system prompt: 'S'" in e and "temperature = 0.5" in e and "error: temperature must be" in e
    assert "seed = None" in e and "max_tokens = 5" in e and "not a valid value" in e
    assert "unknown command /nope" in e and "loaded 3 messages" in e
    assert rc == 1                      # a command failed
    assert s.messages[0]["content"] == "S" and s.messages[-1]["content"] == "HELLO"


def test_repl_at_a_terminal_notes_dropped_turns_and_stats(llm, monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    lines = iter(["first question", "second question", "third question", '"""multi', 'line"""', "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    s = ChatSession(llm(n_ctx=128), system="S", temperature=0, max_tokens=16)
    out = io.StringIO()
    assert Repl(s, stdout=out, stderr=io.StringIO(), interactive=True).run() == 0
    text = out.getvalue()
    assert "FIRST QUESTION\n" in text and "THIRD QUESTION\n" in text
    assert "[context full: dropped the 2 oldest messages]" in text
    assert text.count("[prompt: ") == 4 and "\x1b[" not in text        # no colour: not a tty
    assert s.messages[-2:] == [{"role": "user", "content": "multi\nline"},
                               {"role": "assistant", "content": "MULTI"}]


def test_repl_set_reaches_generate(llm):
    """Each /set knob lands in the keyword generate() gets for the next reply."""
    s = ChatSession(llm(), temperature=0)
    calls = []
    real = s.llm.generate
    s.llm.generate = lambda prompt, **kw: calls.append(kw) or real(prompt, **kw)
    script = "\n".join(["/set temp 0.25", "/set top_k 7", "/set top_p 0.5", "/set min_p 0.125",
                        "/set repeat_penalty 1.5", "/set seed 99", "/set max_tokens 3",
                        "hello"]) + "\n"
    err = io.StringIO()
    assert Repl(s, stdin=io.StringIO(script), stdout=io.StringIO(), stderr=err,
                interactive=False).run() == 0, err.getvalue()
    kw, = calls
    assert {k: kw[k] for k in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                               "seed", "max_tokens")} == dict(
        temperature=0.25, top_k=7, top_p=0.5, min_p=0.125, repeat_penalty=1.5, seed=99,
        max_tokens=3)
