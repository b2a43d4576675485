"""`python tools/export_hf.py GGUF OUTDIR`: the exporter's command line."""
from __future__ import annotations

import argparse
import sys

import formats
from engine.cli.kiln import error_message
from engine.convert.export_hf import DTYPES, export
from engine.errors import ConvertError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export_hf", description=(
        "Write a llama GGUF file as a Hugging Face checkpoint directory (config.json, "
        "safetensors, tokenizer files)."))
    p.add_argument("gguf", metavar="GGUF")
    p.add_argument("outdir", metavar="OUTDIR")
    p.add_argument("--dtype", choices=list(DTYPES), default="f32",
                   help="dtype of the 2-D weights (default f32; vectors stay f32)")
    p.add_argument("--shards", type=int, default=1,
                   help="split the weights into N safetensors files with an index")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export(args.gguf, args.outdir, args.dtype, args.shards)
    except (ConvertError, formats.FormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a missing or unreadable GGUF, an unwritable OUTDIR
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
