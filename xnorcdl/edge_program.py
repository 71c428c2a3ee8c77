"""The edge half as a program: Algorithm 1 on the device, cloud-bound samples sent to the cloud
service over HTTP (docs/PROTOCOL.md).

:func:`edge_pass` runs the stem, the edge blocks and the exits of a batch exactly as
:func:`xnorcdl.engine.run` does (same executor calls, same decisions, bit for bit), and returns
the samples that leave at an exit with their predictions, and the features of the others.
:class:`CloudClient` sends those features with an ``Idempotency-Key``; on a connection error, a
timeout, a 5xx or a 503 it retries with exponential backoff (0.05 s doubling to 2 s) for at most
``retry_for`` seconds since the first failure, so a cloud that restarts is waited for; a 4xx is
final and its message is shown. :func:`run_edge` keeps up to ``concurrency`` requests in flight
while the edge goes on, and checks that every sample's result arrives exactly once.
"""
from __future__ import annotations

import concurrent.futures as cf
import time
import uuid
from typing import List, Optional, Sequence

import numpy as np

from . import engine, wire
from .errors import CloudError


def edge_pass(model, images: np.ndarray, executor, thresholds: Sequence[float]):
    """Algorithm 1 at the edge for one batch of uint8 images.

    Returns (exit_index [N] with FINAL for cloud-bound samples, predictions [N] (-1 where the
    cloud decides), entropies [N, K] (NaN where an exit was not evaluated), indices of the
    cloud-bound samples, their features [M, C, H, W] float32)."""
    n = len(images)
    k_exits = len(model.exits)
    exit_index = np.full(n, engine.FINAL, np.int64)
    pred = np.full(n, -1, np.int64)
    ent = np.full((n, k_exits), np.nan)
    by_block = {}
    for k, e in enumerate(model.exits):
        by_block.setdefault(e.after_block, []).append(k)
    idx = np.arange(n)
    state = executor.stem(np.ascontiguousarray(images))
    for b in range(len(model.blocks)):
        state = executor.block(b, state)
        for k in by_block.get(b, ()):
            logits = executor.exit(k, state)
            h = engine.entropy(logits)
            ent[idx, k] = h
            take = h < thresholds[k]
            if take.any():
                exit_index[idx[take]] = k
                pred[idx[take]] = logits[take].argmax(axis=1)
                keep = np.flatnonzero(~take)
                idx = idx[keep]
                if not len(keep):
                    return exit_index, pred, ent, idx, None
                state = executor.select(state, keep)
    return exit_index, pred, ent, idx, np.ascontiguousarray(state, dtype=np.float32)


class CloudClient:
    """POST features to ``url`` + /v1/infer and return the logits, retrying what may pass."""

    def __init__(self, url: str, model_id: str, token: Optional[str] = None,
                 dtype: str = "float32", compression: str = "none", retry_for: float = 60.0,
                 timeout: float = 30.0):
        import httpx
        self.url = url.rstrip("/") + "/v1/infer"
        self.model_id, self.dtype, self.compression = model_id, dtype, compression
        self.retry_for = retry_for
        headers = {"content-type": wire.CONTENT_TYPE}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.http = httpx.Client(headers=headers, timeout=timeout, trust_env=False)
        self.bytes_sent = 0
        self.retries = 0
        self.latencies: List[float] = []

    def close(self) -> None:
        self.http.close()

    def infer(self, ids: np.ndarray, features: np.ndarray) -> np.ndarray:
        import httpx
        body = wire.encode(wire.FEATURES, self.model_id, ids, features, self.dtype,
                           self.compression)
        key = uuid.uuid4().hex
        first_failure, delay, last = None, 0.05, ""
        while True:
            t0 = time.perf_counter()
            try:
                r = self.http.post(self.url, content=body, headers={"idempotency-key": key})
            except httpx.TransportError as exc:   # refused, reset, timed out
                last = f"{type(exc).__name__}: {exc}"
            else:
                if r.status_code == 200:
                    self.latencies.append(time.perf_counter() - t0)
                    self.bytes_sent += len(body)
                    msg = wire.decode(r.content, wire.LOGITS, self.model_id)
                    if not np.array_equal(msg.ids, ids):
                        raise CloudError(f"{self.url}: the reply is for other samples")
                    return msg.array
                if r.status_code < 500 and r.status_code not in (429,):
                    raise CloudError(f"{self.url}: HTTP {r.status_code}: {r.text.strip()}")
                last = f"HTTP {r.status_code}"
            now = time.monotonic()
            first_failure = first_failure or now
            if now - first_failure >= self.retry_for:
                raise CloudError(f"{self.url}: no answer for {self.retry_for:g} s ({last})")
            self.retries += 1
            time.sleep(min(delay, max(0.0, self.retry_for - (now - first_failure))))
            delay = min(2 * delay, 2.0)


def run_edge(part, images: np.ndarray, executor, thresholds: Sequence[float],
             client: CloudClient, concurrency: int = 4, batch_size: int = 16,
             edge_batch: int = 32, progress=None) -> engine.Results:
    """Algorithm 1 over ``images`` with the cloud behind ``client``: every sample decided once,
    at an exit or by the cloud's head."""
    model = part.model
    n = len(images)
    res = engine.Results(np.full(n, -1, np.int64), np.full(n, engine.FINAL, np.int64),
                         np.full((n, len(model.exits)), np.nan),
                         np.zeros((n, model.spec.num_classes), np.float32))
    decided = np.zeros(n, bool)
    pending: List[cf.Future] = []
    buf_idx, buf_feat = [], []

    def collect(fut) -> None:
        ids, logits = fut.result()
        if decided[ids].any():
            raise CloudError(f"{client.url}: a result arrived twice for sample(s) "
                             f"{ids[decided[ids]][:5].tolist()}")
        decided[ids] = True
        res.logits[ids] = logits
        res.predictions[ids] = logits.argmax(axis=1)

    def send(pool, force: bool = False) -> None:
        while buf_idx and (force or sum(map(len, buf_idx)) >= batch_size):
            ids = np.concatenate(buf_idx)
            feats = np.concatenate(buf_feat)
            take, rest = ids[:batch_size], ids[batch_size:]
            ft, fr = feats[:batch_size], feats[batch_size:]
            buf_idx[:] = [rest] if len(rest) else []
            buf_feat[:] = [fr] if len(rest) else []
            while len(pending) >= concurrency:      # bounded in flight
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    pending.remove(f)
                    collect(f)
            pending.append(pool.submit(lambda i=take, x=ft: (i, client.infer(i.astype(np.uint64),
                                                                              x))))

    with cf.ThreadPoolExecutor(max_workers=concurrency) as pool:
        try:
            for start in range(0, n, edge_batch):
                stop = min(start + edge_batch, n)
                where, pred, ent, idx, feats = edge_pass(model, images[start:stop], executor,
                                                         thresholds)
                res.exit_index[start:stop] = where
                res.entropies[start:stop] = ent
                left = where != engine.FINAL
                res.predictions[start:stop][left] = pred[left]
                decided[start:stop] |= left
                if feats is not None:
                    buf_idx.append(idx + start)
                    buf_feat.append(feats)
                send(pool)
                if progress is not None:
                    progress.update(stop - start)
            send(pool, force=True)
            for f in cf.as_completed(pending):
                collect(f)
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    if not decided.all():
        raise CloudError(f"{client.url}: {int((~decided).sum())} sample(s) got no result")
    return res
