"""Matrix x vector throughput of the kernels, per ISA variant and thread count, in GB/s
of weights streamed, next to a plain streaming read of the same bytes (the matrix's
kernel-side copy) measured the same way (same pool, same split) in the same run.

    python tools/bench_kernels.py [--size 4096] [--threads 1 2] [--types q4_0 q8_0]
                                  [--isa avx512vnni ...] [--dram] [--prompt]

--dram cycles through enough copies of each matrix to exceed the last-level cache, so
the figures are DRAM-bound (a 4096x4096 Q4_0 matrix is 9 MiB and stays in L3 on most
machines). --prompt adds a 64-token matrix x matrix timing (tokens/s x rows)."""
import argparse
import time

import numpy as np

import ckernels
import formats

# --types name -> ggml type id, for every weight type the kernels run
TYPES = {b.name.lower(): b.ggml_id for b in ckernels.weight_types()}


def random_blocks(type_id, rows, cols, rng):
    """Valid GGUF bytes for (rows, cols) of random weights, encoded by formats' codecs."""
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(0.01)
    return np.ascontiguousarray(formats.quantize(w, formats.GGMLType(type_id))).view(np.uint8).reshape(rows, -1)


def best_time(fn, seconds=0.25, repeats=3):
    """Best per-call time over `repeats` batches, each batch about seconds / repeats."""
    fn()
    n, dt = 1, 0.0
    while dt < seconds / repeats / 4:  # calibrate the batch size
        n *= 2
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
    n = max(1, int(n * (seconds / repeats) / dt))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="rows = cols of the matrix")
    ap.add_argument("--rows", type=int, default=None, help="rows, if not square")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--types", nargs="+", default=["q4_0", "q8_0"], choices=list(TYPES))
    ap.add_argument("--isa", nargs="+", default=None, help="variants (default: all supported)")
    ap.add_argument("--dram", action="store_true", help="cycle matrices totalling 1 GiB")
    ap.add_argument("--prompt", type=int, default=0, help="also time a batch of N tokens")
    ap.add_argument("--seconds", type=float, default=0.25, help="time per measurement")
    args = ap.parse_args(argv)

    cols = args.size
    rows = args.rows or args.size
    rng = np.random.default_rng(0)
    isas = args.isa or ckernels.supported_isas()
    pools = {n: ckernels.Pool(n) for n in args.threads}
    x = rng.standard_normal(cols).astype(np.float32)
    xb = rng.standard_normal((max(args.prompt, 1), cols)).astype(np.float32)
    print(f"matrix x vector, {rows}x{cols}; GB/s of weights read per second; "
          f"'read' = streaming read of the same bytes; {'DRAM (cycled copies)' if args.dram else 'one matrix'}")
    header = f"{'type':6} {'isa':11} {'thr':>3} {'kernel GB/s':>11} {'read GB/s':>9} {'ratio':>6}"
    if args.prompt:
        header += f" {'batch ' + str(args.prompt) + ' tok/s':>16}"
    print(header)
    for name in args.types:
        type_id = TYPES[name]
        data = random_blocks(type_id, rows, cols, rng)
        nbytes = data.nbytes
        # 1 GiB: a 96 MiB set still ran partly from cache on a VM reporting a 480 MiB L3
        copies = max(1, (1 << 30) // nbytes) if args.dram else 1
        mats = [ckernels.Matrix(type_id, rows, cols, data if i == 0 else data.copy()) for i in range(copies)]
        # the bytes the kernels actually stream (the repacked copy for block types);
        # the yardstick reads those very bytes
        kbytes = mats[0].packed_size or nbytes
        for isa in isas:
            ckernels.set_isa(isa)
            for n_threads in args.threads:
                pool = pools[n_threads]
                it = [0]

                def kernel():
                    ckernels.matmul(pool, mats[it[0] % copies], x)
                    it[0] += 1

                def read():
                    ckernels.stream_read(pool, mats[it[0] % copies])
                    it[0] += 1

                # back to back, so both see the same machine load
                tk = best_time(kernel, args.seconds)
                tr = best_time(read, args.seconds)
                gk, gr = kbytes / tk / 1e9, kbytes / tr / 1e9
                line = f"{name:6} {isa:11} {n_threads:>3} {gk:11.1f} {gr:9.1f} {gk / gr:6.2f}"
                if args.prompt:
                    tb = best_time(lambda: ckernels.matmul(pool, mats[0], xb), args.seconds, 2)
                    line += f" {args.prompt / tb:16.0f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
