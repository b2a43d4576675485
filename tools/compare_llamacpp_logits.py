#!/usr/bin/env python3
"""Teacher-forced agreement of kiln with llama.cpp on the same GGUF files.

    python tools/compare_llamacpp_logits.py TEXT.txt A.gguf [B.gguf ...] [-n 512]

For each file: both engines score the same n tokens (kiln's tokenization of TEXT, with
BOS); prints the mean KL divergence of kiln's next-token distribution from llama.cpp's,
the top-1 agreement, and both perplexities. llama.cpp runs in a child process so that a
crash there cannot take this script down. Needs llama-cpp-python (.ci/run builds it for the CPU at hand).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.perplexity import log_softmax  # noqa: E402

LLAMA_CHILD = """
import sys, numpy as np
from llama_cpp import Llama
path, ids_path, out_path = sys.argv[1:4]
ids = np.load(ids_path).tolist()
llm = Llama(path, n_ctx=len(ids) + 8, n_batch=len(ids), n_threads=2, logits_all=True, verbose=False)
llm.eval(ids)
np.save(out_path, np.asarray(llm.scores[:len(ids)], dtype=np.float32))
"""


def compare(path: str, ids: list[int]) -> dict:
    from engine import LLM
    with LLM(path, n_ctx=len(ids) + 8) as llm:
        ours = llm.logits(ids)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "ids.npy"), np.asarray(ids))
        out = os.path.join(tmp, "scores.npy")
        subprocess.run([sys.executable, "-c", LLAMA_CHILD, path, os.path.join(tmp, "ids.npy"), out],
                       check=True)
        theirs = np.load(out)
    lp, lq = log_softmax(theirs[:-1]), log_softmax(ours[:-1])
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    nxt = np.asarray(ids[1:])
    rows = np.arange(len(nxt))
    return {
        "file": os.path.basename(path),
        "mean_kl": float(kl.mean()),
        "top1": float((ours[:-1].argmax(-1) == theirs[:-1].argmax(-1)).mean()),
        "ppl_kiln": float(np.exp(-lq[rows, nxt].mean())),
        "ppl_llama_cpp": float(np.exp(-lp[rows, nxt].mean())),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text")
    ap.add_argument("models", nargs="+")
    ap.add_argument("-n", type=int, default=512, help="tokens to score (default 512)")
    args = ap.parse_args(argv)
    from engine import LLM
    with LLM(args.models[0], n_ctx=16) as llm:
        ids = llm.tokenize(Path(args.text).read_text(encoding="utf-8"), add_bos=True)[: args.n]
    print(f"{len(ids)} tokens of {os.path.basename(args.text)}")
    print("| file | mean KL (llama.cpp ‖ kiln) | top-1 agreement | PPL kiln | PPL llama.cpp |")
    print("|---|---|---|---|---|")
    for path in args.models:
        r = compare(path, ids)
        print(f"| {r['file']} | {r['mean_kl']:.5f} | {100 * r['top1']:.1f}% | "
              f"{r['ppl_kiln']:.3f} | {r['ppl_llama_cpp']:.3f} |")


if __name__ == "__main__":
    main()
