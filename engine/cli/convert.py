"""`kiln convert` (= `python tools/convert.py`): the converter's command line."""
from __future__ import annotations

import argparse
import os
import sys
import time

import formats
from engine import convert
from engine.convert.mixes import OUT_TYPES
from engine.errors import ConvertError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kiln convert",
        description="Convert a Hugging Face Llama checkpoint directory or a GGUF file to a "
                    "block-quantized GGUF file.")
    p.add_argument("src", metavar="SRC",
                   help="Hugging Face model directory (config.json, *.safetensors, tokenizer) "
                        "or a .gguf file to requantize")
    p.add_argument("-o", "--outfile", dest="out", metavar="OUT.gguf", required=True,
                   help="output GGUF path (written atomically)")
    p.add_argument("--type", dest="type", default="q8_0", choices=list(OUT_TYPES),
                   help="weight type of the 2-D tensors (default q8_0)")
    p.add_argument("--embed-type", dest="embed_type", default=None, choices=list(OUT_TYPES),
                   help="type of token_embd/output (default: q8_0 for 4-bit --type, "
                        "else --type)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no per-tensor lines")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        p = convert.plan(args.src, args.out, args.type, args.embed_type)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        stats = convert.write(p, args.out, quiet=args.quiet)
    except (ConvertError, formats.FormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        p.close()
    size = os.path.getsize(args.out)
    print(f"wrote {args.out}: {size / 2**20:.1f} MiB, {stats['n_params'] / 1e6:.1f} M "
          f"parameters, {stats['bpw']:.2f} bits per weight, {len(p.tensors)} tensors "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0

