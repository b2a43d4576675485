"""tools/bench_vs_llamacpp.py's bandwidth column: the bytes of weights a generated token
reads (every tensor but an untied token embedding) and the streaming-read yardstick."""
import sys
from pathlib import Path

import formats
from tiny_models import make_tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import bench_vs_llamacpp as bench  # noqa: E402


def _sizes(path):
    with formats.read_gguf(path) as f:
        return {name: t.nbytes for name, t in f.tensors.items()}


def test_a_tied_embedding_is_read_whole_as_the_output_projection(tmp_path):
    path = make_tiny_llama(tmp_path / "tied.gguf", tied=True, ftype="q8_0")
    sizes = _sizes(path)
    assert "output.weight" not in sizes
    assert bench.weight_bytes_per_token(path) == sum(sizes.values())


def test_an_untied_embedding_is_left_out(tmp_path):
    path = make_tiny_llama(tmp_path / "untied.gguf", tied=False, ftype="q8_0")
    sizes = _sizes(path)
    assert bench.weight_bytes_per_token(path) == sum(sizes.values()) - sizes["token_embd.weight"]


def test_the_stream_read_reports_a_bandwidth():
    gbps = bench.stream_read_gbps(1 << 20, 1)  # a 1 MiB request still reads 256 MiB
    assert 0.1 < gbps < 10_000


def test_the_kiln_worker_reports_speed_and_bandwidth(smollm2_path):
    r = bench.kiln_run(smollm2_path, 8, 4, 1)
    assert r["prompt_tokens_per_second"] > 0 and r["generation_tokens_per_second"] > 0
    assert r["read_gbps"] > 0.1


def test_a_run_without_generation_skips_the_yardstick(smollm2_path):
    r = bench.kiln_run(smollm2_path, 8, 0, 1)
    assert r["generation_tokens_per_second"] is None and r["read_gbps"] is None
