"""The cloud service on Ray Serve: the handlers of :mod:`xnorcdl.cloud_service` in a deployment
of ``replicas`` copies, batched by Ray Serve's ``@serve.batch`` (``max_batch_size`` counts
requests there, each carrying its own samples; ``batch_wait_timeout_s`` is ``--max-wait-ms``).

On one machine ``python -m xnorcdl cloud --ray`` starts a local Ray instance bound to 127.0.0.1.
On a cluster, start Ray on every node first (``ray start --head`` on one, ``ray start
--address HEAD:6379`` on the others, each with xnorcdl installed and the cloud artifact at the
same path), then run ``python -m xnorcdl cloud --ray --address HEAD:6379 --replicas N --host
0.0.0.0`` on the head: Ray Serve places the replicas across the nodes and its HTTP proxy spreads
requests over them. Ray is an optional extra (``pip install -e ".[serve,ray]"``).
"""
from __future__ import annotations

import asyncio
import signal
import sys
import threading
from typing import List, Optional


def build_app(cloud_path: str, cfg, backend: str, replicas: int):
    """The bound Ray Serve application serving ``cloud_path``."""
    from ray import serve

    @serve.deployment(num_replicas=replicas, max_ongoing_requests=max(1, cfg.queue_limit))
    class XnorcdlCloud:
        def __init__(self):
            from xnorcdl.cloud_service import CloudRunner, Context
            from xnorcdl.split import load_cloud
            self.part = load_cloud(cloud_path)
            self.runner = CloudRunner(self.part, backend)
            self.runner.warm_up()
            submit = self.run_batch if cfg.batching else self.run_alone
            self.ctx = Context(self.part, cfg, submit)

        async def run_alone(self, features):
            logits = await asyncio.get_running_loop().run_in_executor(None, self.runner, features)
            self.ctx.metrics.batch(len(features))
            return logits

        @serve.batch(max_batch_size=cfg.max_batch, batch_wait_timeout_s=cfg.max_wait_ms / 1000)
        async def run_batch(self, features: List) -> List:
            import numpy as np
            x = np.concatenate(features)
            logits = await asyncio.get_running_loop().run_in_executor(None, self.runner, x)
            self.ctx.metrics.batch(len(x))
            out, start = [], 0
            for f in features:
                out.append(logits[start:start + len(f)])
                start += len(f)
            return out

        async def __call__(self, request):
            from starlette.responses import PlainTextResponse

            from xnorcdl import cloud_service as cs
            routes = {("POST", "/v1/infer"): cs.handle_infer, ("GET", "/healthz"): cs.handle_health,
                      ("GET", "/metrics"): cs.handle_metrics}
            handler = routes.get((request.method, request.url.path.rstrip("/") or "/"))
            if handler is None:
                return PlainTextResponse("not found\n", status_code=404)
            return await handler(request, self.ctx)

    return XnorcdlCloud.bind()


def start(cloud_path: str, cfg, backend: str, host: str, port: int, replicas: int,
          address: Optional[str] = None) -> None:
    """Connect to (or start) Ray and deploy; returns once the deployment answers."""
    import os

    import ray
    from ray import serve
    # A small machine (2 cores) starts Serve's HTTP proxy slower than its default 5 s readiness
    # check allows; a local instance inherits these from this process.
    for var in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(var, "60")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(include_dashboard=False, logging_level="WARNING", _node_ip_address="127.0.0.1",
                 num_cpus=max(2, replicas))
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cloud_path, cfg, backend, replicas), name="xnorcdl", route_prefix="/")


def stop() -> None:
    import ray
    from ray import serve
    serve.shutdown()
    ray.shutdown()


def serve_ray(cloud_path: str, cfg, backend: str, host: str, port: int, replicas: int,
              address: Optional[str]) -> int:
    """``python -m xnorcdl cloud --ray``: deploy, announce, serve until SIGINT or SIGTERM."""
    from .split import load_cloud
    load_cloud(cloud_path)      # one clear error here rather than inside a replica
    if port == 0:
        import socket
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    start(cloud_path, cfg, backend, host, port, replicas, address)
    print(f"listening on http://{host}:{port} (Ray Serve, {replicas} replica(s))",
          file=sys.stderr, flush=True)
    done.wait()
    stop()
    return 0
