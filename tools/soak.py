#!/usr/bin/env python3
"""Soak: many generate() calls on one LLM, reusing the KV cache, watching memory.

    python tools/soak.py [MODEL] [--calls 200] [--tokens 100]

Each call continues one of a few prompts that share a long prefix (so every call after
the first reuses the cached prefix and evaluates only what differs), alternating
blocking, streaming and chat calls and sampling settings. It reports the resident set
size after the first call of each kind (blocking, streaming, chat) and after the last, and their difference; exit status 1 when
it grew by 5 MB or more.
"""
import argparse
import gc
import sys
import time

from tqdm import tqdm

LIMIT_MB = 5.0
PREFIX = ("You are a patient teacher. Explain things step by step, with short examples, "
          "and check the reader's understanding as you go. ")
TOPICS = ["how a kiln fires clay", "why the sky is blue", "how bread rises",
          "what a hash table is", "how tides work", "why ice floats"]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def soak(model_path: str, calls: int = 200, tokens: int = 100, n_ctx: int = 512,
         n_threads: int | None = None, progress: bool = True) -> dict:
    from engine import LLM
    with LLM(model_path, n_ctx=n_ctx, n_threads=n_threads) as llm:
        generated = evaluated = 0
        first = None
        t0 = time.perf_counter()
        for i in tqdm(range(calls), unit="call", disable=not progress):
            prompt = PREFIX + f"Today: {TOPICS[i % len(TOPICS)]}."
            kind = i % 3
            before = llm.n_tokens_evaluated
            common = dict(max_tokens=tokens, ignore_eos=True, seed=i,
                          temperature=0 if i % 2 else 0.8)
            if kind == 0:
                n = len(llm.generate(prompt, **common).tokens)
            elif kind == 1:
                "".join(llm.generate(prompt, stream=True, **common))
                n = len(llm.last_completion.tokens)
            else:
                n = len(llm.chat([{"role": "user", "content": prompt}], **common).tokens)
            generated += n
            evaluated += llm.n_tokens_evaluated - before
            if i == 2:  # after the first call of each kind (the chat template is built)
                gc.collect()
                first = rss_mb()
        seconds = time.perf_counter() - t0
        gc.collect()
        last = rss_mb()
    return dict(calls=calls, generated=generated, evaluated=evaluated, seconds=seconds,
                rss_first_mb=first, rss_last_mb=last, growth_mb=last - first)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="GGUF file (default: the pulled SmolLM2)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=100, help="tokens generated per call")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    model = args.model
    if model is None:
        from engine.cli.pull import pull
        model = str(pull())
    r = soak(model, args.calls, args.tokens, args.ctx, args.threads)
    print(f"{r['calls']} calls, {r['generated']} tokens generated, {r['evaluated']} evaluated "
          f"in all (prompts included) in {r['seconds']:.0f} s; RSS after the first call "
          f"{r['rss_first_mb']:.1f} MB, after the last {r['rss_last_mb']:.1f} MB: "
          f"{r['growth_mb']:+.1f} MB (limit {LIMIT_MB} MB)")
    return 0 if r["growth_mb"] < LIMIT_MB else 1


if __name__ == "__main__":
    sys.exit(main())
