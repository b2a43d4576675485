#!/usr/bin/env python3
"""How often greedy paths agree: kiln vs llama.cpp, and each engine vs itself.

    python tools/greedy_vs_llamacpp.py A.gguf [B.gguf ...] [--text botchan.txt] [-n 512]

For each file, on the 10 prompts of tests/test_llm_greedy.py, counts the prompts whose
first 8 and 16 greedy tokens agree between
  - kiln and llama.cpp, both with the settings the test uses (n_ctx 256, 2 threads, the
    prompt in one batch);
  - llama.cpp and itself under other equally valid settings: the prompt evaluated token
    by token (n_batch = n_ubatch = 1), 1 thread instead of 2, flash attention on;
  - kiln and itself: the prompt token by token, 1 thread.
Each row also gives the teacher-forced top-1 agreement and mean KL divergence
(baseline ‖ other) over the first n tokens of TEXT (default: botchan.txt from the
sentencepiece sdist, fetched with pip; --no-logits skips this). Rows whose two sides
differ only in a setting measure the engine's own noise floor: how often a greedy path
flips at a near-tie when nothing but the summation order changes.

llama.cpp runs in a child process per setting, so that a crash (a build using
instructions this CPU lacks dies of SIGILL) shows in the table instead of ending the run.
Needs llama-cpp-python (.ci/run builds it for the CPU at hand).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import fetch_botchan  # noqa: E402
from test_llm_greedy import LLAMACPP_SETTINGS, PROMPTS, count_equal, kiln_greedy, llamacpp_greedy  # noqa: E402

# Each llama.cpp setting overrides LLAMACPP_SETTINGS (the test's). n_threads_batch is
# what llama.cpp uses for batches of more than one token; it defaults to all cores.
LLAMACPP_VARIANTS = {
    "llama.cpp": {},
    "llama.cpp prompt token by token": {"n_batch": 1, "n_ubatch": 1},
    "llama.cpp 1 thread": {"n_threads": 1, "n_threads_batch": 1},
    "llama.cpp flash_attn": {"flash_attn": True},
}
KILN_VARIANTS = {
    "kiln": {},
    "kiln prompt token by token": {"token_by_token": True},
    "kiln 1 thread": {"n_threads": 1},
}
# (other, baseline) pairs, in table order
ROWS = [("kiln", "llama.cpp")] + [(v, "llama.cpp") for v in list(LLAMACPP_VARIANTS)[1:]] + \
       [(v, "kiln") for v in list(KILN_VARIANTS)[1:]]


# -- llama.cpp, in a child process ------------------------------------------------------

def llamacpp_child(job: dict) -> None:
    """Runs in the child: greedy tokens to stdout (JSON), teacher-forced logits to a file."""
    cases = llamacpp_greedy(job["path"], PROMPTS, **job["settings"])
    if job.get("ids_path"):
        from llama_cpp import Llama
        ids = np.load(job["ids_path"]).tolist()
        settings = {**LLAMACPP_SETTINGS, "n_batch": len(ids), "n_ubatch": len(ids),
                    **job["settings"], "n_ctx": len(ids) + 8}
        llm = Llama(job["path"], logits_all=True, verbose=False, **settings)
        llm.eval(ids)
        np.save(job["out_path"], np.asarray(llm.scores[:len(ids)], dtype=np.float32))
        llm.close()
    print(json.dumps([c["tokens"] for c in cases]))


def run_llamacpp(path: str, settings: dict, ids_path: str | None, out_path: str) -> dict:
    job = {"path": path, "settings": settings, "ids_path": ids_path, "out_path": out_path}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else proc.stderr.strip()[-300:]
        return {"error": f"llama.cpp failed: {why}"}
    return {"tokens": json.loads(proc.stdout.strip().splitlines()[-1]),
            "logits": np.load(out_path) if ids_path else None}


# -- kiln ---------------------------------------------------------------------------------

def kiln_greedy_token_by_token(model, tokenizer, prompts, n_tokens):
    """Greedy ids with every prompt token evaluated on its own (no batched prompt)."""
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, special=True)
        for pos, t in enumerate(ids):
            logits = model.eval([t], pos)
        tokens = []
        for i in range(n_tokens):
            tokens.append(int(np.argmax(logits)))
            if i < n_tokens - 1:
                logits = model.eval([tokens[-1]], len(ids) + i)
        out.append(tokens)
    return out


def run_kiln(path: str, token_by_token=False, n_threads=2, ids=None, n_tokens=16) -> dict:
    from engine import LLM
    n_ctx = max(256, len(ids) + 8 if ids else 0)
    with LLM(path, n_ctx=n_ctx, n_threads=n_threads) as llm:
        if token_by_token:
            tokens = kiln_greedy_token_by_token(llm.model, llm.tokenizer, PROMPTS, n_tokens)
            logits = None
            if ids:
                logits = np.stack([llm.model.eval([t], pos) for pos, t in enumerate(ids)])
        else:
            tokens = kiln_greedy(llm, PROMPTS, n_tokens)
            logits = llm.logits(ids) if ids else None
    return {"tokens": tokens, "logits": logits}


# -- comparison ---------------------------------------------------------------------------

def compare(other: dict, base: dict) -> dict:
    from engine.perplexity import log_softmax
    if "error" in other or "error" in base:
        return {"error": other.get("error") or base.get("error")}
    r = {"eq8": count_equal(other["tokens"], base["tokens"], 8),
         "eq16": count_equal(other["tokens"], base["tokens"], 16)}
    if other["logits"] is not None and base["logits"] is not None:
        # the last position predicts a token outside the text: left out, as in
        # tools/compare_llamacpp_logits.py
        lp, lq = log_softmax(base["logits"][:-1]), log_softmax(other["logits"][:-1])
        r["kl"] = float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())
        r["top1"] = float((lp.argmax(-1) == lq.argmax(-1)).mean())
    return r


def measure(path: str, ids: list[int] | None, tmp: str) -> dict:
    """Greedy tokens (and teacher-forced logits of `ids`) of every variant on one file."""
    ids_path = None
    if ids:
        ids_path = os.path.join(tmp, "ids.npy")
        np.save(ids_path, np.asarray(ids))
    runs = {}
    for name, settings in LLAMACPP_VARIANTS.items():
        runs[name] = run_llamacpp(path, settings, ids_path, os.path.join(tmp, "scores.npy"))
    for name, settings in KILN_VARIANTS.items():
        runs[name] = run_kiln(path, ids=ids, **settings)
    return runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--text", help="text for the teacher-forced columns (default: botchan.txt)")
    ap.add_argument("-n", type=int, default=512, help="teacher-forced tokens (default 512)")
    ap.add_argument("--no-logits", action="store_true", help="greedy columns only")
    args = ap.parse_args(argv)
    from engine import LLM
    with tempfile.TemporaryDirectory() as tmp:
        ids = None
        if not args.no_logits:
            text = Path(args.text) if args.text else fetch_botchan(tmp)
            with LLM(args.models[0], n_ctx=16) as llm:
                ids = llm.tokenize(text.read_text(encoding="utf-8"), add_bos=True)[: args.n]
            print(f"teacher-forced: {len(ids)} tokens of {text.name}")
        print(f"greedy: {len(PROMPTS)} prompts; llama.cpp baseline {LLAMACPP_SETTINGS}, "
              f"prompt in one batch\n")
        print("| file | compared | baseline | =8 tokens | =16 tokens | TF top-1 | TF mean KL |")
        print("|---|---|---|---|---|---|---|")
        for path in args.models:
            runs = measure(path, ids, tmp)
            for other, base in ROWS:
                r = compare(runs[other], runs[base])
                cells = [os.path.basename(path), other, base]
                if "error" in r:
                    cells += [r["error"], "", "", ""]
                else:
                    cells += [f"{r['eq8']}/{len(PROMPTS)}", f"{r['eq16']}/{len(PROMPTS)}",
                              f"{100 * r['top1']:.1f}%" if "top1" in r else "-",
                              f"{r['kl']:.2e}" if "kl" in r else "-"]
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        llamacpp_child(json.loads(sys.argv[2]))
    else:
        main()
