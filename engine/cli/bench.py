"""`kiln bench`: prompt and generation speed of a GGUF file, as an app sees it.

Both numbers are timed through `LLM.generate`: the prompt test evaluates
`n_prompt` tokens from an empty cache (pp, like llama-bench's pp512), the generation test
samples `n_gen` tokens greedily after a one-token prompt (tg, like tg128), ignoring
end tokens. Each test runs `repetitions` times and the best is reported, since on a
shared machine the best run is the one least disturbed by others.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

PROMPT_SEED = 1234  # the prompt is random token ids (as llama-bench), the same every run


def bench_prompt_tokens(n_vocab: int, n_prompt: int, bos_id: int | None) -> list[int]:
    """A reproducible prompt of `n_prompt` ids: BOS then random ids, so the tools that
    compare engines can feed both exactly the same tokens."""
    rng = np.random.default_rng(PROMPT_SEED)
    ids = rng.integers(0, n_vocab, size=n_prompt).tolist()
    if bos_id is not None and n_prompt > 0:
        ids[0] = int(bos_id)
    return ids


def run_prompt(llm, ids: list[int]) -> float:
    """Tokens/s of one prompt evaluation from an empty cache."""
    llm.reset()
    out = llm.generate(ids, max_tokens=1, temperature=0, ignore_eos=True)
    return out.timings.prompt_tokens_per_second


def run_generation(llm, first_token: int, n_gen: int) -> float:
    """Tokens/s of `n_gen` greedy tokens after a one-token prompt."""
    llm.reset()
    out = llm.generate([first_token], max_tokens=n_gen, temperature=0, ignore_eos=True)
    assert out.timings.generated_tokens == n_gen
    return out.timings.tokens_per_second


def bench_model(model_path, n_prompt: int = 512, n_gen: int = 128, n_threads: int | None = None,
                repetitions: int = 3) -> dict:
    """Best-of-`repetitions` prompt and generation tokens/s of one file."""
    from engine.llm import LLM
    with LLM(model_path, n_ctx=max(n_prompt, 1 + n_gen) + 1, n_threads=n_threads) as llm:
        ids = bench_prompt_tokens(llm.n_vocab, max(n_prompt, 8), llm.tokenizer.bos_id)
        # Warm-up: page the weights in and start the thread pool, as llama-bench does.
        llm.generate(ids[:8], max_tokens=2, temperature=0, ignore_eos=True)
        pp, tg = [], []
        for _ in range(repetitions):
            if n_prompt > 0:
                pp.append(run_prompt(llm, ids[:n_prompt]))
            if n_gen > 0:
                tg.append(run_generation(llm, ids[0], n_gen))
        result = {
            "model": os.path.basename(str(model_path)),
            "size_bytes": os.path.getsize(model_path),
            "n_threads": llm.n_threads,
            "isa": _active_isa(),
            "n_prompt": n_prompt, "n_gen": n_gen, "repetitions": repetitions,
            "prompt_tokens_per_second": max(pp) if pp else None,
            "generation_tokens_per_second": max(tg) if tg else None,
            "prompt_runs": pp, "generation_runs": tg,
        }
    return result


def _active_isa():
    try:
        import ckernels
        return ckernels.active_isa()
    except Exception:      # the report is still useful without it
        return None


def format_table(results: list[dict]) -> str:
    rows = [("model", "size", "threads", "test", "t/s")]
    for r in results:
        size = f"{r['size_bytes'] / 2**20:.1f} MiB"
        for test, key, n in (("pp", "prompt_tokens_per_second", r["n_prompt"]),
                             ("tg", "generation_tokens_per_second", r["n_gen"])):
            if r[key] is not None:
                rows.append((r["model"], size, str(r["n_threads"]), f"{test}{n}", f"{r[key]:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["| " + " | ".join(c.ljust(w) if i < 4 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="kiln bench",
        description="Prompt (pp) and generation (tg) tokens/s of GGUF files, timed through "
                    "LLM.generate as an app sees it; best of --repetitions runs.")
    p.add_argument("model", nargs="*", help="GGUF file(s) (default: the default model, pulled if missing)")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (0 = skip; default 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (0 = skip; default 128)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: physical cores)")
    p.add_argument("-r", "--repetitions", type=int, default=3, help="runs per test, best reported (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object per model")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("n_prompt", "n_gen"):
        if getattr(args, name) < 0:
            raise SystemExit(f"kiln bench: --{name.replace('_', '-')} must be >= 0")
    if args.repetitions < 1:
        raise SystemExit("kiln bench: --repetitions must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise SystemExit("kiln bench: --threads must be >= 1")
    models = args.model
    if not models:
        from engine.cli.pull import pull
        models = [str(pull())]
    results = []
    for path in models:
        r = bench_model(path, args.n_prompt, args.n_gen, args.threads, args.repetitions)
        results.append(r)
        if args.json:
            print(json.dumps(r), flush=True)
    if not args.json:
        print(format_table(results))
        print(f"kiln ISA {results[0]['isa']}, best of {args.repetitions} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
