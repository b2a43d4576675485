#!/usr/bin/env python3
"""Soak: many generate() calls on one LLM, reusing the KV cache, watching memory.

    python tools/soak.py [MODEL] [--calls 200] [--tokens 100]

Each call continues one of a few prompts that share a long prefix (so every call after
the first reuses the cached prefix and evaluates only what differs), alternating
blocking, streaming and chat calls and sampling settings. It reports the resident set
size after the first call of each kind (blocking, streaming, chat) and after the last,
and their difference, which must stay under 5 MB (exit status 1 otherwise), in its two
parts:
- anonymous memory, what the process allocated itself (buffers, caches, Python objects):
  where a leak would show;
- file-backed pages, of the model file's map and the shared libraries. The engine reads
  each weight's pages once at load and releases them (the kernels keep their own
  copy); a tied token_embd is looked up in the output's copy, so these stay flat. (An
  untied one is looked up in the map, one row per token: pages of rows of tokens not
  seen before fault in, clean pages bounded by the table's size.)
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


def rss_mb() -> dict:
    """The resident set in MB: total (VmRSS), anonymous (RssAnon) and file-backed (RssFile)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    try:
        return {k: int(fields[key].split()[0]) / 1024
                for k, key in (("total", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile"))}
    except KeyError as e:
        raise RuntimeError(f"no {e} in /proc/self/status") from None


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
                rss_first_mb=first["total"], rss_last_mb=last["total"],
                growth_mb=last["total"] - first["total"], anon_growth_mb=last["anon"] - first["anon"],
                file_growth_mb=last["file"] - first["file"])


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
          f"{r['growth_mb']:+.1f} MB (limit {LIMIT_MB} MB), of which anonymous "
          f"{r['anon_growth_mb']:+.1f} MB and file-backed {r['file_growth_mb']:+.1f} MB")
    return 0 if r["growth_mb"] < LIMIT_MB else 1


if __name__ == "__main__":
    sys.exit(main())
