"""kiln serve as a Ray Serve deployment (extra `kiln[ray]`): the same FastAPI app, one
SlotPool per replica, so a cluster of CPU machines serves one OpenAI-compatible endpoint
through Ray Serve's HTTP proxy.

    from engine.cli.serve.ray_serve import deployment
    serve.run(deployment("model.gguf", num_replicas=4, threads=2, parallel=2), route_prefix="/")

or `kiln serve MODEL --ray --replicas 4` (connects to a running cluster with
RAY_ADDRESS, else starts Ray on this machine). Each replica reserves `threads` CPUs and
loads the model file from the same path, which every node must see (a shared disk or a
copy at the same place).
"""
from __future__ import annotations

from pathlib import Path


def deployment(model_path, num_replicas: int = 1, threads: int = 1, parallel: int = 1,
               n_ctx: int = 2048, api_key: str | None = None, max_body: int | None = None,
               autoscaling: dict | None = None):
    """A bound Ray Serve application serving model_path; `autoscaling` (Ray Serve's
    autoscaling_config, e.g. {"min_replicas": 1, "max_replicas": 8}) replaces num_replicas."""
    from ray import serve

    from engine.cli.serve.app import DEFAULT_MAX_BODY, create_app

    for name, v in (("num_replicas", num_replicas), ("threads", threads), ("parallel", parallel),
                    ("n_ctx", n_ctx)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    model_path = str(Path(model_path).resolve())
    name = Path(model_path).name.removesuffix(".gguf")
    # The replica builds its pool in its own process, where the app finds it in
    # REPLICA_POOLS (a module global, so shared by every copy of the app there).
    app = create_app(None, name, api_key=api_key, max_body=max_body or DEFAULT_MAX_BODY)
    options = {"ray_actor_options": {"num_cpus": threads}}
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = num_replicas

    @serve.deployment(name="kiln", **options)
    @serve.ingress(app)
    class KilnReplica:
        def __init__(self):
            from engine.cli.serve.app import REPLICA_POOLS
            from engine.cli.serve.slots import SlotPool
            REPLICA_POOLS[name] = SlotPool(model_path, n_slots=parallel, n_ctx=n_ctx, n_threads=threads)

        def __del__(self):
            from engine.cli.serve.app import REPLICA_POOLS
            pool = REPLICA_POOLS.pop(name, None)
            if pool is not None:
                pool.close()

    return KilnReplica.bind()


def run(model_path, host: str, port: int, num_replicas: int, threads: int, parallel: int,
        n_ctx: int, api_key: str | None, max_body: int | None) -> None:
    """`kiln serve --ray`: deploy and block until interrupted."""
    import os
    import sys
    import time

    import ray
    from ray import serve

    if os.environ.get("RAY_ADDRESS"):
        ray.init()                      # the cluster RAY_ADDRESS names
    else:
        ray.init(num_cpus=os.cpu_count())
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(model_path, num_replicas=num_replicas, threads=threads, parallel=parallel,
                         n_ctx=n_ctx, api_key=api_key, max_body=max_body),
              name="kiln", route_prefix="/")
    print(f"kiln serve (Ray Serve): {Path(model_path).name} on http://{host}:{port} "
          f"({num_replicas} replica{'s' if num_replicas > 1 else ''}, {parallel} slot"
          f"{'s' if parallel > 1 else ''} and {threads} thread{'s' if threads > 1 else ''} each)",
          file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
