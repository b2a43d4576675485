"""`kiln convert` (= `python tools/convert.py`): the converter's command line."""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from collections import Counter

import formats
from engine import convert
from engine.convert.mixes import FALLBACK, MIXES, NAMED_TYPES
from engine.errors import ConvertError, KilnError


def types_help() -> str:
    """The --type table: each mix's main type with its bits per weight and its exceptions."""
    width = max(len(n) for n in MIXES)
    lines = textwrap.wrap("types (--type): the main type and its bits per weight, then the "
                          "tensors that differ (\"output\" includes a tied token_embd); the "
                          "summary prints the bits per weight of the file written:", 88)
    for name, mix in MIXES.items():
        lines += textwrap.wrap(mix.describe(), 88, initial_indent=f"  {name:<{width}}  ",
                               subsequent_indent=" " * (width + 4))
    falls = ", ".join(f"{a.name} -> {b.name}" for a, b in FALLBACK.items())
    lines += textwrap.wrap(
        "Norms and other vectors stay F32. A matrix whose rows its type's block does not "
        f"divide falls back to a type with smaller blocks ({falls}), else to F16.", 88)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kiln convert",
        description="Convert a Hugging Face Llama, Qwen2 or Qwen3 checkpoint directory or a "
                    "GGUF file to a "
                    "block-quantized GGUF file; the k-quant and IQ4 mixes choose each "
                    "tensor's type as llama.cpp's quantizer does.",
        epilog=types_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC",
                   help="Hugging Face model directory (config.json, *.safetensors, tokenizer) "
                        "or a .gguf file to requantize")
    p.add_argument("-o", "--outfile", dest="out", metavar="OUT.gguf", required=True,
                   help="output GGUF path (written atomically)")
    p.add_argument("--type", dest="type", default="q8_0", choices=list(MIXES),
                   metavar="TYPE", help="type or mix of the 2-D tensors (default q8_0; "
                                        "the table below)")
    p.add_argument("--embed-type", dest="embed_type", default=None,
                   choices=list(NAMED_TYPES), metavar="T",
                   help="type of token_embd and output, overriding the mix's choice "
                        f"({', '.join(NAMED_TYPES)})")
    p.add_argument("--imatrix", metavar="FILE",
                   help="importance matrix (llama.cpp's imatrix GGUF or legacy .dat, e.g. from "
                        "`kiln imatrix`): each tensor is quantized with its importance weights, "
                        "as llama-quantize --imatrix does")
    p.add_argument("--calibration", metavar="TEXT",
                   help="compute the importance matrix on this UTF-8 text first (as `kiln "
                        "imatrix` would) and quantize with it")
    p.add_argument("--method", choices=("imatrix", "gptq"), default="imatrix",
                   help="with --calibration: imatrix (llama-quantize's importance-weighted "
                        "scales, the default) or gptq (those scales, and each block's rounding "
                        "error pushed onto the columns after it through the inverse Hessian "
                        "of the calibration activations; the output is still plain blocks)")
    p.add_argument("--calibration-ctx", type=int, default=512, metavar="N",
                   help="with --calibration: tokens per chunk (default: %(default)s)")
    p.add_argument("--calibration-chunks", type=int, default=None, metavar="N",
                   help="with --calibration: use at most N chunks (default: all)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no per-tensor lines")
    return p


def calibration(args):
    """(Calibration, its name for the file's metadata) from --imatrix or --calibration, or
    None; --method gptq needs --calibration (an imatrix file has no Hessians)."""
    from engine.convert import importance
    from engine.convert.calibrate import Calibration
    if args.imatrix and args.calibration:
        raise ConvertError("give --imatrix FILE or --calibration TEXT, not both")
    if args.method == "gptq" and not args.calibration:
        raise ConvertError("--method gptq needs --calibration TEXT: it uses the Hessians of "
                           "the activations, which an imatrix file does not hold")
    if args.imatrix:
        return Calibration(importance.load(args.imatrix)), args.imatrix
    if not args.calibration:
        return None
    return calibrate_source(args), args.calibration


def calibrate_source(args):
    """The Calibration of SRC on --calibration's text (a Hugging Face directory is
    first written as a temporary F16 GGUF for the reference model to read)."""
    import tempfile
    from pathlib import Path

    from engine.convert.calibrate import calibrate
    from engine.perplexity import PerplexityError, read_text
    try:
        text = read_text(args.calibration)
    except PerplexityError as e:
        raise ConvertError(str(e)) from None
    kw = dict(n_ctx=args.calibration_ctx, n_chunks=args.calibration_chunks,
              dataset=args.calibration, quiet=args.quiet, hessians=args.method == "gptq")
    if not Path(args.src).is_dir():
        return calibrate(args.src, text, **kw)
    with tempfile.TemporaryDirectory(dir=Path(args.out).resolve().parent) as d:
        tmp = Path(d) / "calibration-f16.gguf"
        p = convert.plan(args.src, tmp, "f16")
        try:
            convert.write(p, tmp, quiet=True)
        finally:
            p.close()
        return calibrate(tmp, text, **kw)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        p = convert.plan(args.src, args.out, args.type, args.embed_type)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        cal = calibration(args)
        if cal is not None:
            from engine.convert import importance
            n = importance.attach(p, cal[0].imatrix, cal[1])
            if not args.quiet:
                print(f"imatrix: {n} tensors quantized with importance weights from {cal[1]}",
                      file=sys.stderr)
            if args.method == "gptq":
                n = importance.attach_hessians(p, cal[0].hessians)
                p.metadata[importance.KEY_METHOD] = "gptq"
                p.types[importance.KEY_METHOD] = formats.GGUFValueType.STRING
                if not args.quiet:
                    print(f"gptq: {n} tensors rounded with error feedback", file=sys.stderr)
    except (KilnError, formats.FormatError) as e:
        p.close()
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
          f"({type_counts(p)}) in {time.perf_counter() - t0:.1f} s")
    return 0



def type_counts(p) -> str:
    """"Q4_K 16, Q6_K 14, ...": how many tensors took each type, most first."""
    counts = Counter(tp.out_type.name for tp in p.tensors)
    return ", ".join(f"{t} {n}" for t, n in counts.most_common())
