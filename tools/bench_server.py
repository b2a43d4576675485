"""Load benchmark of `kiln serve` (and llama-cpp-python's server, where installed) on loopback.

    python tools/bench_server.py [MODEL] [--parallel 1 4] [--clients 8] [--requests 64]
                                 [--max-tokens 32] [--threads N] [--no-llamacpp]

For each server setting: start the server, run --requests streaming chat completions
(at most 200) from --clients concurrent clients with the openai client, and report the
requests answered or cleanly refused, requests/s, aggregate generated tokens/s and the
time-to-first-token percentiles; then check the server is still healthy. Everything stops
by itself: the request count is bounded and each request has a timeout.
"""
import argparse
import concurrent.futures
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MAX_REQUESTS = 200
REQUEST_TIMEOUT = 300
PROMPTS = ["Tell me about the sea.", "What is a prime number?", "Describe a cat in one paragraph.",
           "Give me three tips for sleeping well.", "Why is the sky blue?", "Write a haiku about rain.",
           "What do bees do?", "Explain what a computer is to a child."]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("the server did not come up")


def start_kiln(model, parallel, threads, ctx):
    cmd = [sys.executable, "-m", "engine", "serve", model, "--port", "0", "--parallel", str(parallel),
           "--ctx", str(ctx)] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    while True:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError("kiln serve exited")
        m = re.search(r"on (http://[\d.]+:\d+)", line)
        if m:
            return proc, m[1]


def start_llamacpp(model, threads, ctx):
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(ctx), "--n_threads", str(threads or os.cpu_count()),
           # by default a new request cuts the stream being generated short (its answer
           # ends after a token or two); queued behind its lock, each is answered whole
           "--interrupt_requests", "False"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return proc, url


def one_request(client, i, max_tokens):
    t0 = time.perf_counter()
    ttft, pieces = None, 0
    try:
        stream = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=max_tokens, temperature=0.7, seed=i, stream=True, timeout=REQUEST_TIMEOUT)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
        return {"ok": True, "ttft": ttft, "pieces": pieces}
    except Exception as e:  # counted as refused / failed, the load goes on
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:200]}


def run_load(url, clients, requests, max_tokens):
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        results = list(ex.map(lambda i: one_request(client, i, max_tokens), range(requests)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)

    def pct(p):
        return ttfts[min(len(ttfts) - 1, int(p / 100 * len(ttfts)))] if ttfts else float("nan")

    healthy = False
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            healthy = r.status == 200
    except OSError:
        pass
    return {"answered": len(ok), "failed": len(results) - len(ok), "wall": wall,
            "req_s": len(ok) / wall, "tok_s": sum(r["pieces"] for r in ok) / wall,
            "ttft_p50": pct(50), "ttft_p90": pct(90), "ttft_p99": pct(99), "healthy": healthy,
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:3]}


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 4], help="kiln slot counts to run")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="threads per slot (default: kiln's)")
    ap.add_argument("--ctx", type=int, default=1024, help="context per slot")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama-cpp-python's server")
    args = ap.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS:
        ap.error(f"--requests must be in 1..{MAX_REQUESTS}")
    if args.model is None:
        from engine.cli.pull import pull
        args.model = str(pull())

    runs = [(f"kiln --parallel {p}", lambda p=p: start_kiln(args.model, p, args.threads, args.ctx))
            for p in args.parallel]
    if not args.no_llamacpp:
        try:
            import llama_cpp.server.app  # noqa: F401
            runs.append(("llama_cpp.server", lambda: start_llamacpp(args.model, args.threads, args.ctx)))
        except ImportError as e:
            print(f"(llama-cpp-python's server is not installed: {e}; pip install 'llama-cpp-python[server]')")

    print(f"{cpu_name()}, {os.cpu_count()} CPUs; {args.requests} streaming chat requests, "
          f"{args.clients} clients, max_tokens {args.max_tokens}; {os.path.basename(args.model)}")
    print(f"{'server':22} {'ok':>4} {'fail':>4} {'req/s':>7} {'tok/s':>7} {'ttft p50':>9} {'p90':>7} {'p99':>7} healthy")
    for name, start in runs:
        proc, url = start()
        try:
            r = run_load(url, args.clients, args.requests, args.max_tokens)
        finally:
            stop(proc)
        print(f"{name:22} {r['answered']:4d} {r['failed']:4d} {r['req_s']:7.2f} {r['tok_s']:7.1f} "
              f"{r['ttft_p50']:8.2f}s {r['ttft_p90']:6.2f}s {r['ttft_p99']:6.2f}s {r['healthy']}", flush=True)
        for e in r["errors"]:
            print(f"    error: {e}")


if __name__ == "__main__":
    main()
