"""`kiln serve [MODEL]`: an OpenAI-compatible HTTP server (extra `kiln[server]`).

    kiln serve [MODEL] [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--ctx N]
               [--parallel N] [--threads N] [--max-body BYTES] [--timeout SECONDS]

POST /v1/completions, POST /v1/chat/completions (both with "stream": true as Server-Sent
Events), GET /v1/models, GET /health, GET /metrics (Prometheus), and a chat page at /.
--parallel N runs N slots, each with its own KV cache of --ctx tokens, decoded together
(one pass over the weights per step for all of them); more requests wait in a
first-come, first-served queue. It binds to loopback
unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_CTX = 2048


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="GGUF model file (default: SmolLM2-135M-Instruct, fetched on first use)")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s; 0 = any free port)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("KILN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics "
                        "(default: $KILN_API_KEY, else no key)")
    p.add_argument("--ctx", "-c", type=int, default=DEFAULT_CTX, metavar="N",
                   help="context window of each slot in tokens (default: %(default)s)")
    p.add_argument("--parallel", "-np", type=int, default=1, metavar="N",
                   help="requests generated at once, each in its own slot (default: %(default)s)")
    p.add_argument("--threads", "-t", type=int, default=None, metavar="N",
                   help="compute threads (default: physical cores)")
    p.add_argument("--max-body", type=int, default=None, metavar="BYTES",
                   help="largest request body accepted (default: 1 MiB)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="seconds a client has to send a request's head, and then its body "
                        "(default: 30); a slower one gets 408 and is disconnected")
    p.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve (extra kiln[ray]): on the cluster $RAY_ADDRESS "
                        "names, else on this machine")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="with --ray: replicas, each with its own slots and --threads CPUs (default: 1)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    return p


def main(argv=None) -> int:
    from engine.errors import KilnError
    args = build_parser().parse_args(argv)
    for name in ("ctx", "parallel", "threads", "max_body", "replicas"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise KilnError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.timeout is not None and not 0 < args.timeout < float("inf"):
        raise KilnError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    if not 0 <= args.port <= 65535:
        raise KilnError(f"--port must be in 0..65535, got {args.port}")
    try:
        import uvicorn
        from engine.cli.serve.app import DEFAULT_MAX_BODY, DEFAULT_TIMEOUT, create_app
        from engine.cli.serve.protocol import with_timeout
    except ImportError as e:
        raise KilnError(f"kiln serve needs the server extra: pip install 'kiln[server]' ({e})") from None
    from engine.cli.kiln import resolve_model
    from engine.cli.serve.slots import SlotPool

    path = resolve_model(args.model)
    if args.ray:
        try:
            from engine.cli.serve import ray_serve
            import ray  # noqa: F401
        except ImportError as e:
            raise KilnError(f"kiln serve --ray needs the ray extra: pip install 'kiln[ray]' ({e})") from None
        ray_serve.run(path, args.host, args.port or DEFAULT_PORT, args.replicas, args.threads or 1,
                      args.parallel, args.ctx, args.api_key, args.max_body)
        return 0
    pool = SlotPool(path, n_slots=args.parallel, n_ctx=args.ctx, n_threads=args.threads)
    threads = pool.llm.n_threads
    try:
        name = Path(path).name.removesuffix(".gguf")
        timeout = args.timeout or DEFAULT_TIMEOUT
        app = create_app(pool, name, api_key=args.api_key, max_body=args.max_body or DEFAULT_MAX_BODY,
                         timeout=timeout)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                timeout_graceful_shutdown=5, http=with_timeout(timeout))
        server = uvicorn.Server(config)
        # the bound address on stderr, so a caller that asked for port 0 learns the port
        original_startup = server.startup

        async def startup(sockets=None):
            await original_startup(sockets=sockets)
            for s in server.servers:
                for sock in s.sockets:
                    host, port = sock.getsockname()[:2]
                    print(f"kiln serve: {name} on http://{host}:{port} ({args.parallel} slot"
                          f"{'s' if args.parallel > 1 else ''} of {pool.n_ctx} tokens, "
                          f"{threads} thread{'s' if threads > 1 else ''})", file=sys.stderr, flush=True)

        server.startup = startup
        server.run()
    finally:
        pool.close()
    return 0
