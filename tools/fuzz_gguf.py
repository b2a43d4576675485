#!/usr/bin/env python3
"""Fuzz kiln's GGUF loading (reader, configuration, tokenizer, engine) with mutants of
valid tiny models, and of the SmolLM2 file's header when it is pulled.

    python tools/fuzz_gguf.py -n 5000             # the CI-sized run
    python tools/fuzz_gguf.py --seconds 1800      # `make fuzz`: a long one
    python tools/fuzz_gguf.py --replay crasher.gguf

Exit status 1 when any mutant killed its worker, hung, or escaped with a foreign
exception; those mutants are saved in --crashers with a note of what happened.
The machinery is tests/gguf_fuzz.py.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import gguf_fuzz  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5000, help="mutants to load (default 5000)")
    ap.add_argument("--seconds", type=float, help="stop after this long (then -n is a cap)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the mutations")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a load is a hang")
    ap.add_argument("--seeds-dir", type=Path, default=Path("build/fuzz-seeds"))
    ap.add_argument("--crashers", type=Path, default=Path("build/fuzz-crashers"))
    ap.add_argument("--no-smollm2", action="store_true", help="leave out the SmolLM2 header seed")
    ap.add_argument("--replay", type=Path, help="load one saved mutant in this process and exit")
    args = ap.parse_args(argv)

    if args.replay:
        print(gguf_fuzz.load_and_generate(str(args.replay)))
        return 0
    smollm2 = None
    if not args.no_smollm2:
        from engine.cli.pull import pull
        smollm2 = str(pull())
    seeds = gguf_fuzz.make_seeds(args.seeds_dir, smollm2)
    n = args.n if not args.seconds or args.n != 5000 else 10**9
    with tempfile.TemporaryDirectory(prefix="kiln-fuzz-") as work:
        report = gguf_fuzz.run(seeds, n, workdir=Path(work), crashers=args.crashers,
                               rng_seed=args.seed, workers=args.workers, timeout=args.timeout,
                               progress=True, max_seconds=args.seconds)
    print(report.summary())
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
