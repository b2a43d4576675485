"""`kiln convert` (= `python tools/convert.py`): the converter's command line."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
import tempfile
import time
from collections import Counter
from pathlib import Path

import formats
from engine import convert
from engine.convert import auto
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
    p.add_argument("--type", dest="type", default="q8_0", choices=[*MIXES, "auto"],
                   metavar="TYPE", help="type or mix of the 2-D tensors (default q8_0; "
                                        "the table below), or auto: each tensor's type "
                                        "chosen for --target-bpw from its measured "
                                        "sensitivity on --calibration's text")
    p.add_argument("--target-bpw", type=float, default=None, metavar="B",
                   help="with --type auto: the file's bits per weight (e.g. 4.5)")
    p.add_argument("--auto-types", default=None, metavar="T,T,...",
                   help="with --type auto: the types it may choose from (default: "
                        f"{','.join(t.name.lower() for t in auto.CANDIDATES)})")
    p.add_argument("--plan-only", action="store_true",
                   help="print each tensor's type (with --type auto, its sensitivity too) "
                        "and write nothing")
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


def check_args(args) -> None:
    """The flag combinations that cannot work, refused before anything runs."""
    if args.imatrix and args.calibration:
        raise ConvertError("give --imatrix FILE or --calibration TEXT, not both")
    for flag, f in (("--imatrix", args.imatrix), ("--calibration", args.calibration)):
        if f:
            convert.check_output(args.out, [f], f"the {flag} file")
    if args.method == "gptq" and not args.calibration:
        raise ConvertError("--method gptq needs --calibration TEXT: it uses the Hessians of "
                           "the activations, which an imatrix file does not hold")
    if args.type == "auto":
        if args.target_bpw is None:
            raise ConvertError("--type auto needs --target-bpw B (the file's bits per weight)")
        if not args.calibration:
            raise ConvertError("--type auto needs --calibration TEXT: it measures each "
                               "tensor's sensitivity on it")
        if args.embed_type:
            raise ConvertError("--type auto chooses token_embd's and output's types too; "
                               "leave out --embed-type")
    elif args.target_bpw is not None or args.auto_types is not None:
        raise ConvertError("--target-bpw and --auto-types are for --type auto")
    if args.auto_types is not None:
        known = {t.name.lower(): t for t in auto.CANDIDATES}
        names = [n.strip().lower() for n in args.auto_types.split(",") if n.strip()]
        bad = [n for n in names if n not in known]
        if bad or not names:
            raise ConvertError(f"--auto-types: {', '.join(bad) or 'no types'} (choose from "
                               f"{', '.join(known)})")
        args.auto_types = tuple(known[n] for n in names)


def calibration(args, model_path):
    """The Calibration from --imatrix or --calibration (run on the GGUF at model_path),
    or None."""
    from engine.convert import importance
    from engine.convert.calibrate import Calibration, calibrate
    from engine.perplexity import PerplexityError, read_text
    if args.imatrix:
        return Calibration(importance.load(args.imatrix))
    if not args.calibration:
        return None
    try:
        text = read_text(args.calibration)
    except PerplexityError as e:
        raise ConvertError(str(e)) from None
    return calibrate(model_path, text, n_ctx=args.calibration_ctx,
                     n_chunks=args.calibration_chunks, dataset=args.calibration,
                     quiet=args.quiet, hessians=args.method == "gptq" or args.type == "auto")


@contextlib.contextmanager
def float_gguf(args, tmp_dir):
    """A GGUF of SRC the reference model can read: SRC itself, or a Hugging Face
    directory written as a temporary F16 GGUF in tmp_dir (only when calibrating)."""
    if not args.calibration or not Path(args.src).is_dir():
        yield args.src
        return
    tmp = Path(tmp_dir) / "calibration-f16.gguf"
    p = convert.plan(args.src, tmp, "f16")
    try:
        convert.write(p, tmp, quiet=True)
    finally:
        p.close()
    yield tmp


def prepare(args, p, model_path) -> list | None:
    """Calibrate, choose the types (--type auto) and attach what the quantizers use;
    returns auto's choices (or None)."""
    from engine.convert import importance
    cal = calibration(args, model_path)
    if cal is None:
        return None
    choices = None
    source = args.imatrix or args.calibration
    if args.type == "auto":
        choices = auto.assign(p, model_path, cal, cal.tokens[:auto.PROBE_TOKENS],
                              args.target_bpw, args.method, args.quiet,
                              args.auto_types or auto.CANDIDATES)
    n = importance.attach(p, cal.imatrix, source)
    if not args.quiet:
        print(f"imatrix: {n} tensors quantized with importance weights from {source}",
              file=sys.stderr)
    if args.method == "gptq":
        n = importance.attach_hessians(p, cal.hessians)
        p.metadata[importance.KEY_METHOD] = "gptq"
        p.types[importance.KEY_METHOD] = formats.GGUFValueType.STRING
        if not args.quiet:
            print(f"gptq: {n} tensors rounded with error feedback", file=sys.stderr)
    return choices


def print_plan(p, choices) -> None:
    """The plan on stdout: auto's table (tensor, type, sensitivity), else tensor and type."""
    if choices:
        lines = auto.describe(choices)
    else:
        width = max(len(tp.name) for tp in p.tensors)
        lines = [f"{tp.name:<{width}}  {tp.out_type.name}" for tp in p.tensors]
    n = sum(tp.n_elements for tp in p.tensors)
    lines.append(f"{8.0 * sum(tp.out_nbytes for tp in p.tensors) / max(1, n):.3f} bits per "
                 f"weight ({type_counts(p)})")
    print("\n".join(lines))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        check_args(args)
        p = convert.plan(args.src, args.out, "q8_0" if args.type == "auto" else args.type,
                         args.embed_type)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        with tempfile.TemporaryDirectory(dir=Path(args.out).resolve().parent) as d, \
                float_gguf(args, d) as model_path:
            choices = prepare(args, p, model_path)
        if args.plan_only or choices:
            print_plan(p, choices)
        if args.plan_only:
            p.close()
            return 0
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
