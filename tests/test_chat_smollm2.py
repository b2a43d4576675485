"""Chat on the real SmolLM2-135M-Instruct: ChatSession's KV reuse gives the same replies as
re-rendering the whole history, and `kiln chat` with piped input prints one reply per line."""
import os
import subprocess
import sys

import pytest

from engine import LLM
from engine.chat import ChatSession, template_for, tokenize_prompt

N_CTX = 1024
QUESTIONS = ["Hi! What is your name?", "What is 2+2?", "Name a colour of the sky."]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    with LLM(smollm2_path, n_ctx=N_CTX) as m:
        yield m


def test_three_turns_reuse_the_cache_and_match_rerendering(llm):
    session = ChatSession(llm, temperature=0, max_tokens=32)
    template = template_for(llm)
    replies, in_context = [], 0
    for q in QUESTIONS:
        before = llm.n_tokens_evaluated
        reply = session.send(q)
        st = session.last_stats
        prompt = tokenize_prompt(llm, template, template.render(session.messages[:-1]))
        # The session's prompt is exactly the re-rendered history, and only the part
        # after what the cache held (previous prompt + reply) was evaluated.
        assert st.timings.prompt_tokens == len(prompt)
        assert st.timings.prompt_tokens_evaluated == len(prompt) - in_context
        assert llm.n_tokens_evaluated - before == st.timings.prompt_tokens_evaluated + st.timings.generated_tokens - \
            (1 if st.finish_reason == "length" else 0)
        in_context = len(prompt) + st.timings.generated_tokens - (1 if st.finish_reason == "length" else 0)
        replies.append(reply)
        assert reply.strip()
    assert "4" in replies[1]

    # The same conversation, each turn re-rendered from scratch on an empty cache.
    history = []
    for q, expected in zip(QUESTIONS, replies):
        history.append({"role": "user", "content": q})
        llm.reset()
        before = llm.n_tokens_evaluated
        out = llm.chat(history, temperature=0, max_tokens=32)
        assert out.text == expected
        assert out.timings.prompt_tokens_evaluated == len(out.prompt_tokens)   # all of it
        history.append({"role": "assistant", "content": out.text})
        assert llm.n_tokens_evaluated - before > len(out.prompt_tokens)


def test_streamed_chat_equals_blocking_chat(llm):
    msgs = [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What is the opposite of hot?"}]
    text = "".join(llm.chat(msgs, stream=True, temperature=0, max_tokens=16))
    assert text == llm.chat(msgs, temperature=0, max_tokens=16).text
    assert "<|im_end|>" not in text and "<|im_start|>" not in text


def test_piped_kiln_chat_prints_exactly_two_replies(smollm2_path, tmp_path, llm):
    env = dict(os.environ, KILN_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "engine", "chat", smollm2_path, "--temp", "0", "-n", "40",
                        "--ctx", str(N_CTX)], input="Hi\nWhat is 2+2?\n", capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    # exactly the two replies a ChatSession gives, one after the other, nothing else
    llm.reset()                 # the same evaluation sequence as the fresh process
    session = ChatSession(llm, temperature=0, max_tokens=40)
    expected = [session.send("Hi"), session.send("What is 2+2?")]
    assert r.stdout == f"{expected[0]}\n{expected[1]}\n"
    assert "\x1b[" not in r.stdout and ">>>" not in r.stdout
    assert r.stderr == ""


def test_chat_template_override_from_the_command_line(smollm2_path, tmp_path):
    """--chat-template FILE replaces the model's template; a template that tries to run
    code gets one error line, a non-zero exit, and executes nothing."""
    env = dict(os.environ, KILN_HOME=str(tmp_path))
    own = tmp_path / "own.jinja"
    own.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                   "<|im_start|>assistant\n")
    r = subprocess.run([sys.executable, "-m", "engine", "chat", smollm2_path, "--temp", "0", "-n", "24",
                        "--chat-template", str(own)], input="What is 2+2?\n", capture_output=True,
                       text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() and r.stderr == ""

    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ cycler.__init__.__globals__.os.system('touch PWNED') }}"
                    "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    r = subprocess.run([sys.executable, "-m", "engine", "chat", smollm2_path, "--chat-template", str(evil)],
                       input="Hi\n", capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 1 and r.stdout.strip() == ""
    assert r.stderr.count("\n") == 1 and "unsafe" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "PWNED").exists()
