"""`kiln imatrix [MODEL] -f TEXT -o FILE [--ctx 512] [--chunks N]`: the importance matrix
of a model on a calibration text, written in llama.cpp's imatrix GGUF format (what
`llama-imatrix` writes and `llama-quantize --imatrix` / `kiln convert --imatrix` read)."""
from __future__ import annotations

import argparse
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kiln imatrix",
        description="Run MODEL over a text in chunks of --ctx tokens and accumulate, for every "
                    "weight matrix of every layer, the sum of squares of each input column and "
                    "the number of rows: the importance matrix, as llama-imatrix computes it. "
                    "Written as llama.cpp's imatrix GGUF file.")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="GGUF model file (default: SmolLM2-135M-Instruct, fetched on first use)")
    p.add_argument("-f", "--file", required=True, metavar="TEXT", help="UTF-8 calibration text")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="imatrix file to write (GGUF, written atomically)")
    p.add_argument("--ctx", "-c", type=int, default=512, metavar="N",
                   help="tokens per chunk (default: %(default)s)")
    p.add_argument("--chunks", type=int, default=None, metavar="N",
                   help="use at most N chunks (default: all whole chunks of the text)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    from engine.cli.kiln import resolve_model
    from engine.convert import check_output
    from engine.convert.calibrate import collect_imatrix
    from engine.perplexity import read_text
    from formats.imatrix import write_imatrix
    args = build_parser().parse_args(argv)
    text = read_text(args.file)
    path = resolve_model(args.model)
    check_output(args.output, [path, args.file], "an input")
    t0 = time.perf_counter()
    im = collect_imatrix(path, text, n_ctx=args.ctx, n_chunks=args.chunks,
                         dataset=args.file, quiet=args.quiet)
    seconds = time.perf_counter() - t0
    write_imatrix(args.output, im)
    print(f"wrote {args.output}: {len(im)} matrices from {im.chunk_count} chunks of "
          f"{im.chunk_size} tokens ({im.chunk_count * im.chunk_size} tokens) of "
          f"{os.path.basename(args.file)} in {seconds:.1f} s", file=sys.stderr)
    return 0
