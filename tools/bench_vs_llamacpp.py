#!/usr/bin/env python3
"""kiln next to llama.cpp (through llama-cpp-python) on the same GGUF files, same threads.

    python tools/bench_vs_llamacpp.py                 # SmolLM2 Q4_0 and Q8_0, 2 threads
    python tools/bench_vs_llamacpp.py a.gguf b.gguf -t 2 -p 512 -n 128 -r 3 [--json]

Method: prompt = one n_prompt-token evaluation from an empty cache, generation =
n_gen greedy tokens after a one-token prompt; both engines get the same token ids. Runs
alternate kiln / llama.cpp, each run in a fresh process (so neither engine's idle threads
compete with the other's), and the best of `-r` runs is reported. kiln is timed through
`LLM.generate`; llama.cpp through `Llama.eval` with the same greedy loop in Python (the
last sampled token is not evaluated, as in kiln). Without file arguments, Q4_0 and Q8_0
files are made from the default SmolLM2 Q4_1 with llama.cpp's quantizer (cached).
The last column is generation's share of the memory bandwidth: the bytes of weights a
token reads (every tensor but the token embedding) times kiln's tokens/s, over the
best streaming read (`ckernels.stream_read`, same threads) of as many bytes, measured
in each kiln worker right after its timing.
llama-cpp-python must be importable (.ci/run builds it for the CPU at hand).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import formats  # noqa: E402
from engine.cli.bench import bench_model, bench_prompt_tokens  # noqa: E402



def make_quantized(src: str, dst: str, ftype_name: str) -> str:
    """Write `dst` from `src` with llama.cpp's quantizer (requantizing is allowed)."""
    import llama_cpp
    if os.path.exists(dst):
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(formats.file_type_of(formats.GGMLType[ftype_name]))
    params.allow_requantize = True
    params.nthread = 2
    tmp = dst + ".tmp-quant"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype_name}) failed with {rc}")
    os.replace(tmp, dst)
    return dst


def default_models() -> list[str]:
    from engine.cli.pull import pull
    src = str(pull())
    return [make_quantized(src, src.replace(".Q4_1.gguf", f".{t}.gguf"), t) for t in ("Q4_0", "Q8_0")]


def llamacpp_run(path: str, n_prompt: int, n_gen: int, n_threads: int) -> dict:
    """One prompt and one generation measurement with llama.cpp, after a warm-up."""
    import numpy as np
    from llama_cpp import Llama
    n_batch = max(n_prompt, 8)
    llm = Llama(model_path=path, n_ctx=max(n_prompt, 1 + n_gen) + 1, n_batch=n_batch,
                n_ubatch=n_batch, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    n_vocab = llm.n_vocab()
    ids = bench_prompt_tokens(n_vocab, max(n_prompt, 8), llm.token_bos())

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))

    llm.reset()
    llm.eval(ids[:8])                                   # warm-up
    pp = tg = None
    if n_prompt > 0:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[:n_prompt])
        last_logits().argmax()                          # kiln returns the logits too
        pp = n_prompt / (time.perf_counter() - t0)
    if n_gen > 0:
        llm.reset()
        llm.eval([ids[0]])
        t0 = time.perf_counter()
        for i in range(n_gen):
            token = int(last_logits().argmax())
            if i < n_gen - 1:
                llm.eval([token])
        tg = n_gen / (time.perf_counter() - t0)
    llm.close()
    return {"prompt_tokens_per_second": pp, "generation_tokens_per_second": tg}


def weight_bytes_per_token(path: str) -> int:
    """Bytes of weights one generated token reads: every tensor but the token embedding,
    of which it reads one row (unless the output projection is the embedding itself)."""
    with formats.read_gguf(path) as f:
        tied = "output.weight" not in f.tensors
        return sum(t.nbytes for name, t in f.tensors.items() if tied or name != "token_embd.weight")


def stream_read_gbps(n_bytes: int, n_threads: int) -> float:
    """The machine's streaming read bandwidth over a buffer of n_bytes (at least 256 MiB,
    beyond the last-level cache), split over n_threads as kiln splits a matmul: best of 5."""
    import numpy as np
    import ckernels
    buf = np.ones(max(n_bytes, 256 << 20) // 64 * 64, np.uint8)
    pool = ckernels.Pool(n_threads)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        ckernels.stream_read(pool, buf)
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best / 1e9


def kiln_run(path: str, n_prompt: int, n_gen: int, n_threads: int) -> dict:
    r = bench_model(path, n_prompt, n_gen, n_threads, repetitions=1)
    out = {k: r[k] for k in ("prompt_tokens_per_second", "generation_tokens_per_second", "isa")}
    # the bandwidth yardstick for generation, in the same process right after the timing
    out["read_gbps"] = stream_read_gbps(weight_bytes_per_token(path), n_threads) if n_gen > 0 else None
    return out


def run_in_subprocess(engine: str, path: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, path, "-p", str(args.n_prompt),
           "-n", str(args.n_gen), "-t", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bandwidth(row) -> str:
    f = row["tg_read_fraction"]
    if f is None:
        return "-"
    return f"{f * row['read_gbps']:.1f} / {row['read_gbps']:.1f} = {f:.2f}"


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="*", help="GGUF files (default: SmolLM2 Q4_0 and Q8_0)")
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", choices=["kiln", "llamacpp"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        run = kiln_run if args.worker == "kiln" else llamacpp_run
        print(json.dumps(run(args.model[0], args.n_prompt, args.n_gen, args.threads)))
        return 0

    models = args.model or default_models()
    runs = {(m, e): [] for m in models for e in ("kiln", "llamacpp")}
    for rep in range(args.repetitions):
        for m in models:
            # alternate which engine goes first, so neither always gets the quieter slot
            order = ("kiln", "llamacpp") if rep % 2 == 0 else ("llamacpp", "kiln")
            for e in order:
                runs[(m, e)].append(run_in_subprocess(e, m, args))

    def best(m, e, key):
        vals = [r[key] for r in runs[(m, e)] if r[key] is not None]
        return max(vals) if vals else None

    rows = []
    for m in models:
        row = {"model": os.path.basename(m), "size_mib": os.path.getsize(m) / 2**20,
               "threads": args.threads, "isa": runs[(m, "kiln")][0].get("isa")}
        for key, test in (("prompt_tokens_per_second", f"pp{args.n_prompt}"),
                          ("generation_tokens_per_second", f"tg{args.n_gen}")):
            row[f"{test}_kiln"] = best(m, "kiln", key)
            row[f"{test}_llamacpp"] = best(m, "llamacpp", key)
            row[f"{test}_ratio"] = (row[f"{test}_kiln"] / row[f"{test}_llamacpp"]
                                    if row[f"{test}_kiln"] and row[f"{test}_llamacpp"] else None)
        # generation's share of the bandwidth: weights read per token x tokens/s, over
        # the best streaming read measured in the same runs
        wbytes = weight_bytes_per_token(m)
        row["weights_mib_per_token"] = wbytes / 2**20
        row["read_gbps"] = best(m, "kiln", "read_gbps")
        tg_kiln = row[f"tg{args.n_gen}_kiln"]
        row["tg_read_fraction"] = wbytes * tg_kiln / 1e9 / row["read_gbps"] if tg_kiln and row["read_gbps"] else None
        rows.append(row)

    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    pp, tg = f"pp{args.n_prompt}", f"tg{args.n_gen}"
    print(f"threads={args.threads}, best of {args.repetitions}, tokens/s (kiln ISA: {rows[0]['isa']})")
    print(f"| file | size | {pp} kiln | {pp} llama.cpp | ratio | {tg} kiln | {tg} llama.cpp | ratio "
          f"| kiln {tg} GB/s of read GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: f"{v:.1f}" if v else "-"  # noqa: E731
    for r in rows:
        print(f"| {r['model']} | {r['size_mib']:.0f} MiB | {fmt(r[pp + '_kiln'])} | {fmt(r[pp + '_llamacpp'])} "
              f"| {ratio(r[pp + '_kiln'], r[pp + '_llamacpp'])} | {fmt(r[tg + '_kiln'])} "
              f"| {fmt(r[tg + '_llamacpp'])} | {ratio(r[tg + '_kiln'], r[tg + '_llamacpp'])} "
              f"| {bandwidth(r)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
