"""`kiln bench` logic (engine.cli.bench): a short run on SmolLM2 reports positive speeds, the
JSON and table outputs carry them, and bad arguments are refused."""
import json

import pytest

from engine.cli import bench


def test_bench_json(smollm2_path, capsys):
    assert bench.main([smollm2_path, "-p", "32", "-n", "4", "-r", "2", "-t", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip())
    assert r["n_threads"] == 2 and (r["n_prompt"], r["n_gen"]) == (32, 4)
    assert len(r["prompt_runs"]) == len(r["generation_runs"]) == 2
    assert r["prompt_tokens_per_second"] == max(r["prompt_runs"]) > 0
    assert r["generation_tokens_per_second"] == max(r["generation_runs"]) > 0


def test_bench_table(smollm2_path, capsys):
    assert bench.main([smollm2_path, "-p", "16", "-n", "0", "-r", "1", "-t", "1"]) == 0
    out = capsys.readouterr().out
    assert "| pp16 " in out and "tg" not in out and "SmolLM2-135M-Instruct.Q4_1.gguf" in out


def test_bench_prompt_is_reproducible():
    assert bench.bench_prompt_tokens(1000, 64, 1) == bench.bench_prompt_tokens(1000, 64, 1)
    ids = bench.bench_prompt_tokens(1000, 64, 1)
    assert ids[0] == 1 and len(ids) == 64 and all(0 <= i < 1000 for i in ids)


@pytest.mark.parametrize("args", [["-p", "-1"], ["-r", "0"], ["-t", "0"]])
def test_bench_bad_arguments(args):
    with pytest.raises(SystemExit):
        bench.main(["x.gguf", *args])
