"""The cloud half as an ASGI application (Starlette): ``POST /v1/infer``, ``GET /healthz``,
``GET /metrics`` (Prometheus text format).

A request carries the features of some cloud-bound samples (docs/PROTOCOL.md); the reply carries
their head logits. **Dynamic batching**: requests that arrive within ``max_wait_ms`` of the first
one waiting are concatenated, up to ``max_batch`` samples, and run through the cloud layers as one
batch (one GEMM per layer instead of one per request), on one worker thread so the event loop
keeps accepting. The queue of waiting requests is bounded (503 with Retry-After when full),
bodies larger than ``max_request_bytes`` are refused with 413 before they are read, every header
field is validated (400 naming the field), a model id other than the served one gives 409, and
with a token configured every request needs ``Authorization: Bearer <token>`` (401). A reply is
remembered by its ``Idempotency-Key`` for a while, so a retried request is answered again, not
computed twice. On shutdown the application stops taking requests and drains what is queued.

The request handling is independent of the server that runs it: :func:`create_app` wires it to
Starlette routes for uvicorn (one machine), and :mod:`xnorcdl.cloud_ray` to a Ray Serve
deployment (a cluster), whose own ``@serve.batch`` then does the batching.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import threading
import time
from typing import Awaitable, Callable, List, Optional

import numpy as np

from . import engine, wire
from .errors import WireError

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    max_batch: int = 64             # samples per cloud batch
    max_wait_ms: float = 2.0        # how long the first waiting request waits for company
    batching: bool = True           # False: every request runs alone (batch = its samples)
    queue_limit: int = 256          # requests waiting at most; more get 503
    max_request_bytes: int = 8 << 20
    token: Optional[str] = None
    idempotency_entries: int = 4096


class Metrics:
    """Counters and histograms, rendered in the Prometheus text exposition format."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = collections.Counter()       # by status code
        self.samples = 0
        self.batches = 0
        self.batch_hist = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_sum = 0
        self.lat_hist = [0] * (len(LATENCY_BUCKETS) + 1)
        self.lat_sum = 0.0
        self.queue_depth = 0
        self.waiting = 0                # requests handed to the batcher, logits not yet back
        self.replayed = 0

    @staticmethod
    def _observe(hist, buckets, value) -> None:
        for i, b in enumerate(buckets):
            if value <= b:
                hist[i] += 1
                return
        hist[-1] += 1

    def request(self, code: int, seconds: Optional[float] = None) -> None:
        with self.lock:
            self.requests[code] += 1
            if seconds is not None:
                self._observe(self.lat_hist, LATENCY_BUCKETS, seconds)
                self.lat_sum += seconds

    def batch(self, size: int) -> None:
        with self.lock:
            self.batches += 1
            self.samples += size
            self.batch_sum += size
            self._observe(self.batch_hist, BATCH_BUCKETS, size)

    def render(self) -> str:
        with self.lock:
            out = ["# HELP xnorcdl_requests_total Inference requests by HTTP status.",
                   "# TYPE xnorcdl_requests_total counter"]
            out += [f'xnorcdl_requests_total{{code="{c}"}} {n}'
                    for c, n in sorted(self.requests.items())]
            out += ["# HELP xnorcdl_samples_total Samples run through the cloud layers.",
                    "# TYPE xnorcdl_samples_total counter", f"xnorcdl_samples_total {self.samples}",
                    "# HELP xnorcdl_idempotent_replays_total Replies replayed for a repeated "
                    "Idempotency-Key.", "# TYPE xnorcdl_idempotent_replays_total counter",
                    f"xnorcdl_idempotent_replays_total {self.replayed}",
                    "# HELP xnorcdl_queue_depth Requests waiting for a batch.",
                    "# TYPE xnorcdl_queue_depth gauge", f"xnorcdl_queue_depth {self.queue_depth}",
                    "# HELP xnorcdl_requests_waiting Requests accepted and waiting for their "
                    "logits (queued or in a running batch).",
                    "# TYPE xnorcdl_requests_waiting gauge",
                    f"xnorcdl_requests_waiting {self.waiting}"]
            out += self._hist("xnorcdl_batch_size", "Samples per cloud batch.", BATCH_BUCKETS,
                              self.batch_hist, self.batch_sum, self.batches)
            out += self._hist("xnorcdl_request_latency_seconds",
                              "Time from a request's arrival to its reply.", LATENCY_BUCKETS,
                              self.lat_hist, self.lat_sum, sum(self.lat_hist))
        return "\n".join(out) + "\n"

    @staticmethod
    def _hist(name, help_, buckets, hist, total, count) -> List[str]:
        out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        acc = 0
        for b, n in zip(buckets, hist):
            acc += n
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {acc + hist[-1]}')
        out += [f"{name}_sum {total}", f"{name}_count {count}"]
        return out


class CloudRunner:
    """The cloud layers of a split model on one backend: features [N, C, H, W] -> logits."""

    def __init__(self, part, backend: str = "fast"):
        from .api import make_executor
        self.part = part
        self.model = part.model
        self.executor = make_executor(part.model, backend, "--backend")
        self.lock = threading.Lock()

    def warm_up(self) -> None:
        """Run one zero sample so every kernel is compiled before the first request."""
        self(np.zeros((1,) + tuple(self.part.feature_shape), np.float32))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        with self.lock:
            x = np.ascontiguousarray(features, dtype=np.float32)
            x, logits = engine.segment(self.executor, None, x, 0, len(self.model.blocks), None)
            return engine.head(self.executor, x, logits)


class Batcher:
    """Dynamic batching on one event loop: :meth:`submit` queues a request's features and
    returns its logits once the batch it joined has run."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], cfg: ServiceConfig,
                 metrics: Metrics):
        self.run, self.cfg, self.metrics = run, cfg, metrics
        self.queue: Optional[asyncio.Queue] = None
        self.task: Optional[asyncio.Task] = None
        self.held = None

    def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.cfg.queue_limit)
        self.task = asyncio.get_running_loop().create_task(self._loop())

    def full(self) -> bool:
        return self.queue.full()

    async def submit(self, features: np.ndarray) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((features, fut))
        self.metrics.queue_depth = self.queue.qsize()
        self.metrics.waiting += 1
        try:
            return await fut
        finally:
            self.metrics.waiting -= 1

    async def _next(self, timeout: Optional[float]):
        """The next queued request (the one held back from the last batch first), None for
        the stop mark, or TimeoutError after ``timeout`` seconds (None: wait)."""
        if self.held is not None:
            item, self.held = self.held, None
            return item
        if timeout is None:
            return await self.queue.get()
        if self.queue.qsize():
            return self.queue.get_nowait()
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not (stopping and self.held is None):
            item = await self._next(None)
            if item is None:
                stopping = True
                continue
            items, n = [item], len(item[0])
            deadline = loop.time() + self.cfg.max_wait_ms / 1000
            while self.cfg.batching and n < self.cfg.max_batch and not stopping:
                try:
                    nxt = await self._next(max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                if nxt is None:
                    stopping = True
                elif n + len(nxt[0]) > self.cfg.max_batch:
                    self.held = nxt          # starts the next batch
                    break
                else:
                    items.append(nxt)
                    n += len(nxt[0])
            self.metrics.queue_depth = self.queue.qsize()
            await self._run(loop, items)

    async def _run(self, loop, items) -> None:
        feats = np.concatenate([f for f, _ in items]) if len(items) > 1 else items[0][0]
        try:
            logits = await loop.run_in_executor(None, self.run, feats)
        except Exception as exc:  # a bug: every request of the batch fails with it
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self.metrics.batch(len(feats))
        start = 0
        for f, fut in items:
            if not fut.done():
                fut.set_result(logits[start:start + len(f)])
            start += len(f)

    async def close(self) -> None:
        """Finish every queued request, then stop."""
        if self.task is not None:
            await self.queue.put(None)
            await self.task


class Context:
    """What the handlers share: the served model's id and feature shape, the configuration,
    the metrics, the idempotency memory and the function that runs a request's features."""

    def __init__(self, part, cfg: ServiceConfig, submit: Callable[[np.ndarray], Awaitable],
                 metrics: Optional[Metrics] = None, full: Callable[[], bool] = lambda: False):
        self.model_id, self.shape = part.model_id, tuple(part.feature_shape)
        self.cfg, self.submit, self.full = cfg, submit, full
        self.metrics = metrics or Metrics()
        self.replies: "collections.OrderedDict[str, bytes]" = collections.OrderedDict()
        self.inflight: dict = {}    # Idempotency-Key -> future of the reply being computed
        self.draining = False


def _response(status: int, text: str = "", headers=None):
    from starlette.responses import PlainTextResponse
    return PlainTextResponse(text + ("\n" if text else ""), status_code=status, headers=headers)


def _authorized(request, ctx: Context) -> bool:
    if ctx.cfg.token is None:
        return True
    got = request.headers.get("authorization", "")
    return hmac.compare_digest(got.encode(), f"Bearer {ctx.cfg.token}".encode())


async def _body(request, limit: int) -> Optional[bytes]:
    """The request body, or None as soon as it exceeds ``limit`` bytes (nothing more is read)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                return None
        except ValueError:
            return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def handle_infer(request, ctx: Context):
    """``POST /v1/infer``: features in, logits out (docs/PROTOCOL.md)."""
    from starlette.responses import Response
    t0 = time.perf_counter()

    def done(resp):
        ctx.metrics.request(resp.status_code, time.perf_counter() - t0)
        return resp

    if not _authorized(request, ctx):
        return done(_response(401, "error: authorization: expected 'Bearer <token>'",
                              {"WWW-Authenticate": "Bearer"}))
    if ctx.draining:
        return done(_response(503, "error: the service is shutting down", {"Retry-After": "1"}))
    key = request.headers.get("idempotency-key")
    if key is not None and (len(key) > 128 or not key.isprintable()):
        return done(_response(400, "error: Idempotency-Key: expected at most 128 printable "
                                   "characters"))
    if key is not None and key in ctx.replies:
        ctx.metrics.replayed += 1
        return done(Response(ctx.replies[key], media_type=wire.CONTENT_TYPE))
    if key is not None and key in ctx.inflight:     # a retry of a request still running
        ctx.metrics.replayed += 1
        reply = await asyncio.shield(ctx.inflight[key])
        return done(Response(reply, media_type=wire.CONTENT_TYPE))
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip() != wire.CONTENT_TYPE:
        return done(_response(415, f"error: content-type: expected {wire.CONTENT_TYPE}"))
    body = await _body(request, ctx.cfg.max_request_bytes)
    if body is None:
        return done(_response(413, f"error: body: more than {ctx.cfg.max_request_bytes} bytes"))
    try:
        msg = wire.decode(body, wire.FEATURES, shape=ctx.shape)
    except WireError as exc:
        return done(_response(400, f"error: {exc}"))
    if msg.model_id != ctx.model_id:
        return done(_response(409, f"error: model id: this cloud serves {ctx.model_id}, the "
                                   f"request is for {msg.model_id}"))
    if ctx.full():
        return done(_response(503, "error: queue full", {"Retry-After": "1"}))
    fut = None
    if key is not None:
        fut = ctx.inflight[key] = asyncio.get_running_loop().create_future()
    try:
        logits = await ctx.submit(msg.array)
        reply = wire.encode(wire.LOGITS, ctx.model_id, msg.ids, logits)
    except BaseException as exc:
        if fut is not None:
            ctx.inflight.pop(key, None)
            fut.set_exception(exc)
            fut.exception()     # retrieved: a retry that never came is no error
        raise
    if fut is not None:
        ctx.replies[key] = reply
        ctx.inflight.pop(key, None)
        fut.set_result(reply)
        while len(ctx.replies) > ctx.cfg.idempotency_entries:
            ctx.replies.popitem(last=False)
    return done(Response(reply, media_type=wire.CONTENT_TYPE))


async def handle_health(request, ctx: Context):
    from starlette.responses import JSONResponse
    return JSONResponse({"status": "draining" if ctx.draining else "ok",
                         "model_id": ctx.model_id, "feature_shape": list(ctx.shape)},
                        status_code=503 if ctx.draining else 200)


async def handle_metrics(request, ctx: Context):
    from starlette.responses import PlainTextResponse
    return PlainTextResponse(ctx.metrics.render(), media_type="text/plain; version=0.0.4")


def create_app(part, cfg: ServiceConfig = ServiceConfig(), backend: str = "fast"):
    """The Starlette application serving ``part`` (a loaded cloud artifact)."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.routing import Route

    metrics = Metrics()
    runner = CloudRunner(part, backend)
    batcher = Batcher(runner, cfg, metrics)
    ctx = Context(part, cfg, batcher.submit, metrics, batcher.full)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.get_running_loop().run_in_executor(None, runner.warm_up)
        batcher.start()
        try:
            yield
        finally:
            ctx.draining = True
            await batcher.close()

    def route(fn):
        async def endpoint(request):
            return await fn(request, ctx)
        return endpoint

    app = Starlette(routes=[Route("/v1/infer", route(handle_infer), methods=["POST"]),
                            Route("/healthz", route(handle_health), methods=["GET"]),
                            Route("/metrics", route(handle_metrics), methods=["GET"])],
                    lifespan=lifespan)
    app.state.ctx = ctx
    return app
