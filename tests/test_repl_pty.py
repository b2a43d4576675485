"""`kiln chat` in a pseudo-terminal, as a person uses it: streamed reply and stats line,
Ctrl-C during a long reply stops it and returns the prompt with the session still usable,
/clear, /set, /save, /load, multi-line input, and /bye. Run twice: on the stand-in echo
model (fast, exact) and on the real SmolLM2 through `python -m engine chat`."""
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect", reason="pexpect (dev extra) drives the pseudo-terminal")

TESTS = Path(__file__).resolve().parent
PROMPT = ">>> "
STATS = r"\[prompt: \d+ tok, [\d.]+ tok/s \| reply: \d+ tok, [\d.]+ tok/s\]"

# Runs the REPL on the echo model of test_chat_session.py, made slow and long-winded
# for a message starting with "long" so that Ctrl-C has something to interrupt.
ECHO_CHAT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import test_chat_session as t
    import engine.llm as llm_mod
    from engine.cli.kiln import main

    class SlowEcho(t.EchoModel):
        def _next(self, ctx):
            nxt = super()._next(ctx)
            if nxt != t.ENDOFTEXT and t.ByteTokenizer().decode(ctx).rsplit("user\\n", 1)[-1].startswith("long"):
                time.sleep(0.005)
                return b"lorem "[len(ctx) % 6]
            return nxt

    open("echo.gguf", "wb").close()
    llm_mod.Model = SlowEcho
    llm_mod.load_tokenizer = lambda md: t.ByteTokenizer()
    sys.exit(main(["chat", "echo.gguf"] + sys.argv[1:]))
""")


def spawn(args, env_extra, tmp_path):
    env = dict(os.environ, KILN_HOME=str(tmp_path / "home"), TERM="xterm", **env_extra)
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=60,
                          dimensions=(40, 200), cwd=str(tmp_path))
    return child


def drive(child, tmp_path, question, answer_re, long_request):
    """The session a person would have; `answer_re` matches the reply to `question`."""
    child.expect("/help for commands")
    child.expect_exact(PROMPT)
    # a streamed reply, then the dim stats line, then the prompt
    child.sendline(question)
    child.expect(answer_re)
    child.expect("\x1b\\[2m" + STATS)
    child.expect_exact(PROMPT)

    # Ctrl-C during a long reply stops it and gives the prompt back (how fast is a
    # benchmark's question; the timeouts here only catch a hang)
    child.sendline("/set max_tokens none")
    child.expect_exact(PROMPT)
    child.sendline(long_request)
    child.expect_exact(long_request + "\r\n")     # the terminal's echo of the line
    child.expect(r"\w+ \w+ \w+", timeout=60)      # the reply is streaming
    child.sendintr()
    child.expect_exact("[stopped]", timeout=30)
    child.expect_exact(PROMPT, timeout=30)
    # still usable
    child.sendline("/set temp 0")
    child.expect("temperature = 0")
    child.expect_exact(PROMPT)
    child.sendline(question)
    child.expect(answer_re)
    child.expect(STATS)
    child.expect_exact(PROMPT)

    # /save, /clear, /load
    conv = tmp_path / "conv.json"
    child.sendline(f"/save {conv}")
    child.expect(r"saved (\d+) messages")
    saved = int(child.match.group(1))
    child.expect_exact(PROMPT)
    data = json.loads(conv.read_text())
    assert len(data["messages"]) == saved and data["settings"]["temperature"] == 0
    assert data["messages"][-2]["content"] == question
    child.sendline("/clear")
    child.expect("conversation cleared")
    child.expect_exact(PROMPT)
    child.sendline("/stats")
    child.expect(r"context: 0 / \d+ tokens, 0 messages")
    child.expect_exact(PROMPT)
    child.sendline(f"/load {conv}")
    child.expect(f"loaded {saved} messages")
    child.expect_exact(PROMPT)
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_echo_chat_in_a_terminal(tmp_path):
    script = tmp_path / "echo_chat.py"
    script.write_text(ECHO_CHAT.format(tests=str(TESTS)))
    child = spawn([str(script), "--temp", "0"], {}, tmp_path)
    drive(child, tmp_path, "hello there", r"HELLO THERE\r\n", "long story please")


def test_echo_chat_multiline_ctrl_d_and_double_ctrl_c(tmp_path):
    script = tmp_path / "echo_chat.py"
    script.write_text(ECHO_CHAT.format(tests=str(TESTS)))
    child = spawn([str(script)], {}, tmp_path)
    child.expect_exact(PROMPT)
    child.sendline('"""abc')
    child.expect_exact("... ")
    child.sendline('def"""')
    child.expect("ABC")         # the echo model repeats the first line of the message
    child.expect_exact(PROMPT)
    # A SIGINT that lands after readline prints the prompt but before it waits for input
    # is only noticed at the next key (CPython's readline loop), so give it time to wait.
    time.sleep(0.5)
    child.sendintr()
    child.expect("Ctrl-C again")
    child.expect_exact(PROMPT)
    time.sleep(0.5)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    child = spawn([str(script)], {}, tmp_path)
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_smollm2_chat_in_a_terminal(smollm2_path, tmp_path):
    child = spawn(["-m", "engine", "chat", smollm2_path, "--temp", "0", "--ctx", "1024"], {}, tmp_path)
    drive(child, tmp_path, "What is 2+2?", r"is 4",
          "Write a very long story about a dragon who learns to cook. Make it at least 1000 words.")
