"""`kiln convert --type auto --target-bpw B` (engine.convert.auto): the allocation meets the
budget and beats every uniform choice that fits; the converter prints the plan, writes
nothing with --plan-only, refuses what cannot work; llama.cpp runs the mixed file."""
import itertools

import numpy as np
import pytest

import formats
from engine.cli import convert as convert_cli
from engine.convert.auto import CANDIDATES, Choice, allocate
from engine.errors import ConvertError
from formats import GGMLType as T
from tiny_models import CORPUS, make_tiny_llama

TYPES = (T.Q4_0, T.Q5_0, T.Q8_0)


def _choices(seed):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(5):
        c = Choice(f"blk.0.m{k}.weight", int(rng.integers(1, 5)) * 4096, float(rng.lognormal()), 0.0)
        e = float(rng.lognormal())
        c.errors = {T.Q4_0: e, T.Q5_0: e / rng.uniform(2, 5), T.Q8_0: e / rng.uniform(30, 90)}
        out.append(c)
    return out


def _total(choices, sel=None):
    sel = sel or {c.name: c.type for c in choices}
    by = {c.name: c for c in choices}
    return (sum(by[n].bits(t) for n, t in sel.items()), sum(by[n].cost(t) for n, t in sel.items()))


@pytest.mark.parametrize("seed", range(6))
def test_allocation_meets_the_budget_close_to_the_best_plan(seed):
    choices = _choices(seed)
    n = sum(c.n_elements for c in choices)
    budget = 5.6 * n
    allocate(choices, budget)
    bits, cost = _total(choices)
    assert bits <= budget
    # exhaustive search over the 3^5 plans: within the budget nothing is much better, and
    # every uniform plan that fits is no better at all
    best = min(_total(choices, dict(zip((c.name for c in choices), combo)))[1]
               for combo in itertools.product(TYPES, repeat=len(choices))
               if _total(choices, dict(zip((c.name for c in choices), combo)))[0] <= budget)
    assert cost <= 1.25 * best
    for t in TYPES:
        b, c = _total(choices, {ch.name: t for ch in choices})
        if b <= budget:
            assert cost <= c


def test_a_budget_below_the_smallest_types_is_refused():
    choices = _choices(0)
    with pytest.raises(ConvertError, match="below what the smallest types reach"):
        allocate(choices, 4.0 * sum(c.n_elements for c in choices))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-auto")
    path = make_tiny_llama(d / "tiny.gguf", n_layer=2, n_embd=256, n_ff=512, n_head=4,
                           n_head_kv=2, tied=True, seed=11)
    text = d / "calib.txt"
    text.write_text(CORPUS * 4, encoding="utf-8")
    return path, text


def _auto(path, text, out, bpw, *extra):
    return convert_cli.main([path, "-o", str(out), "--type", "auto", "--target-bpw", str(bpw),
                             "--calibration", str(text), "--calibration-ctx", "64", "--quiet",
                             *extra])


def test_auto_writes_a_file_within_the_budget_and_prints_its_plan(tiny, tmp_path, capsys):
    path, text = tiny
    out = tmp_path / "auto.gguf"
    assert _auto(path, text, out, 5.0, "--method", "gptq") == 0
    printed = capsys.readouterr().out
    with formats.read_gguf(out) as f:
        n = sum(int(np.prod(t.shape)) for t in f.tensors.values())
        nbytes = sum(formats.GGML_QUANT_SIZES[t.type][1] * int(np.prod(t.shape))
                     // formats.GGML_QUANT_SIZES[t.type][0] for t in f.tensors.values())
        assert 4.6 < 8 * nbytes / n <= 5.0
        for name, t in f.tensors.items():
            if len(t.shape) == 2:
                assert t.type in CANDIDATES
                assert any(line.startswith(name) and t.type.name in line
                           for line in printed.splitlines()), name
        assert f.metadata["quantize.kiln.method"] == "gptq"
    assert "predicted total KL" in printed


def test_auto_types_limit_the_choice(tiny, tmp_path):
    path, text = tiny
    out = tmp_path / "auto.gguf"
    assert _auto(path, text, out, 6.0, "--auto-types", "q4_0,q8_0") == 0
    with formats.read_gguf(out) as f:
        got = {t.type for t in f.tensors.values() if len(t.shape) == 2}
    assert got <= {T.Q4_0, T.Q8_0} and len(got) == 2


def test_plan_only_prints_and_writes_nothing(tiny, tmp_path, capsys):
    path, text = tiny
    out = tmp_path / "plan.gguf"
    assert _auto(path, text, out, 4.5, "--plan-only") == 0
    assert "blk.1.ffn_down.weight" in capsys.readouterr().out
    assert convert_cli.main([path, "-o", str(out), "--type", "q4_k_m", "--plan-only"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split() == ["blk.1.ffn_down.weight", "Q6_K"] for line in lines)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--type", "auto", "--calibration", "TEXT"], "--type auto needs --target-bpw"),
    (["--type", "auto", "--target-bpw", "4.5"], "--type auto needs --calibration TEXT"),
    (["--type", "q4_0", "--target-bpw", "4.5"], "--target-bpw and --auto-types are for --type auto"),
    (["--type", "auto", "--target-bpw", "4.5", "--calibration", "TEXT", "--auto-types", "q4_0,q9_9"],
     "--auto-types: q9_9 (choose from"),
    (["--type", "auto", "--target-bpw", "4.5", "--calibration", "TEXT", "--embed-type", "q8_0"],
     "leave out --embed-type"),
    (["--type", "auto", "--target-bpw", "1.0", "--calibration", "TEXT"],
     "below what the smallest types reach"),
    (["--type", "auto", "--target-bpw", "nan", "--calibration", "TEXT"],
     "--target-bpw must be a positive number"),
])
def test_auto_refuses_what_cannot_work_and_writes_nothing(tiny, tmp_path, capsys, args, message):
    path, text = tiny
    out = tmp_path / "x.gguf"
    args = [str(text) if a == "TEXT" else a for a in args]
    assert convert_cli.main([path, "-o", str(out), "--calibration-ctx", "64", "--quiet",
                             *args]) == 1
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.oracle
def test_llama_cpp_runs_an_auto_file_as_kiln_does(tiny, tmp_path):
    from test_convert import llama_cpp_greedy

    from engine import LLM
    path, text = tiny
    out = tmp_path / "auto.gguf"
    assert _auto(path, text, out, 4.8) == 0
    want = llama_cpp_greedy(out, "Once upon a time")["tokens"]
    with LLM(str(out), n_ctx=64) as llm:
        got = llm.generate("Once upon a time", max_tokens=16, temperature=0,
                           ignore_eos=True).tokens
    assert got == want
