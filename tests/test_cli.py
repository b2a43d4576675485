"""The `kiln` command line: every subcommand's --help, delegation to convert/bench, and
user errors as one line on stderr with a non-zero exit (a traceback only with --debug)."""
import os
import subprocess
import sys
import types

import pytest

from engine.cli import kiln as cli
from engine.errors import KilnError

COMMANDS = ["chat", "generate", "convert", "bench", "perplexity", "info", "pull"]


def run_kiln(*args, env=None, input=None, timeout=120):
    """`python -m engine ARGS` in a subprocess (what a user's shell runs)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          env=full_env, input=input, timeout=timeout)


def test_top_level_help_lists_every_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for c in COMMANDS:
        assert c in out
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0


@pytest.mark.parametrize("command", ["chat", "generate", "perplexity", "info", "pull"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kiln {command}")
    if command in ("chat", "generate", "info"):
        assert "MODEL" in out


def test_chat_and_generate_options_from_the_design(capsys):
    p = cli.build_parser()
    a = p.parse_args(["chat", "m.gguf", "--system", "S", "--temp", "0.2", "--seed", "3", "--threads", "2",
                      "--ctx", "512", "--chat-template", "llama3", "-n", "9"])
    assert (a.model, a.system, a.temp, a.seed, a.threads, a.ctx, a.chat_template, a.max_tokens) == \
        ("m.gguf", "S", 0.2, 3, 2, 512, "llama3", 9)
    a = p.parse_args(["generate", "-p", "Hi", "-n", "5", "--temp", "0", "--top-k", "1", "--top-p", "0.5",
                      "--min-p", "0.1", "--repeat-penalty", "1.1", "--seed", "1", "--stop", "a", "--stop", "b",
                      "--threads", "1"])
    assert (a.model, a.prompt, a.max_tokens, a.top_k, a.top_p, a.min_p, a.repeat_penalty, a.stop) == \
        (None, "Hi", 5, 1, 0.5, 0.1, 1.1, ["a", "b"])
    a = p.parse_args(["info", "--json"])
    assert a.model is None and a.json


@pytest.mark.parametrize("name, module", [("convert", "engine.cli.convert"), ("bench", "engine.cli.bench")])
def test_convert_and_bench_hand_their_arguments_over(name, module, monkeypatch):
    seen = []
    fake = types.ModuleType(module)
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, module, fake)
    assert cli.main([name, "src", "-o", "out.gguf", "--help"]) == 0
    assert cli.main(["--debug", name, "x", "--debug"]) == 0
    assert seen == [["src", "-o", "out.gguf", "--help"], ["x"]]
    fake.main = lambda argv: (_ for _ in ()).throw(KilnError("bad checkpoint"))
    assert cli.main([name, "x"]) == 1
    with pytest.raises(KilnError):
        cli.main(["--debug", name, "x"])


def test_user_errors_are_one_line(tmp_path, capsys):
    cases = [
        (["info", str(tmp_path / "missing.gguf")], "model file not found"),
        (["chat", str(tmp_path)], "is a directory"),
        (["generate", str(tmp_path / "nope.gguf"), "-p", "x"], "model file not found"),
        (["perplexity", "-f", str(tmp_path / "missing.txt")], "text file not found"),
        (["chat", "--ctx", "0", str(tmp_path)], "--ctx must be a positive"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("kiln: error: ") and message in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_the_traceback_and_bugs_are_one_line(monkeypatch, capsys):
    with pytest.raises(KilnError, match="text file not found"):
        cli.main(["--debug", "perplexity", "-f", "/nonexistent/text.txt"])
    with pytest.raises(KilnError):
        cli.main(["perplexity", "-f", "/nonexistent/text.txt", "--debug"])

    def boom(args):
        raise ZeroDivisionError("x")
    monkeypatch.setattr(cli, "cmd_perplexity", boom)
    assert cli.main(["perplexity", "-f", "text.txt"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: ZeroDivisionError" in err and "--debug" in err


def test_errors_from_a_real_process(tmp_path):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("this is not a model\n" * 10)
    for args in (["info", str(tmp_path / "missing.gguf")], ["chat", str(tmp_path / "missing.gguf")]):
        r = run_kiln(*args)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and "not found" in r.stderr
    r = run_kiln("--debug", "perplexity", "-f", str(tmp_path / "missing.txt"))
    assert r.returncode == 1 and "Traceback" in r.stderr
    r = run_kiln("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_convert_is_tools_convert_and_bench_has_help():
    """`kiln convert` and `python tools/convert.py` are one implementation."""
    r = run_kiln("convert", "--help")
    assert r.returncode == 0 and "usage:" in r.stdout and "-o" in r.stdout
    script = os.path.join(os.path.dirname(__file__), "..", "tools", "convert.py")
    t = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=60)
    assert t.returncode == 0 and t.stdout == r.stdout
    r = run_kiln("convert", "/nonexistent/checkpoint", "-o", "x.gguf")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = run_kiln("bench", "--help")
    assert r.returncode == 0 and "usage:" in r.stdout and "--json" in r.stdout
