"""Algorithm 1 of the paper: conditional inference across edge and cloud.

For each sample: run the stem and the edge blocks; after a block that carries early exit k,
compute the exit's softmax entropy ``H = -sum_c p_c ln p_c`` (nats, 0 ln 0 = 0) and stop there
when ``H < threshold_k`` (strict). A sample that takes no exit continues through the remaining
blocks (the float32 cloud layers) to the head.

Samples are processed in batches for throughput, but each decision is per sample: after every
exit the batch is narrowed to the samples that go on, so the result is exactly that of running
Algorithm 1 one sample at a time.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .model import Model
from .progress import Progress

FINAL = -1  # exit index of samples that ran to the head


def entropy(logits: np.ndarray) -> np.ndarray:
    """Softmax entropy in nats per row, float64: H = log sum e^z - sum p z with z = l - max l.

    Rows are made C-contiguous first: NumPy sums a contiguous row in another order than a strided
    one, so without it the last bit of H would depend on the caller's memory layout."""
    z = np.ascontiguousarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1)
    p = e / s[:, None]
    return np.maximum(np.log(s) - (p * z).sum(axis=1), 0.0)


def plan(model: Model) -> List[Tuple[int, int, Optional[int]]]:
    """The network as segments ``(first, stop, k)``: blocks ``first .. stop-1``, then early exit
    k (``None``: no exit, the last segment, which the head follows). Exits come after distinct,
    increasing blocks (:mod:`xnorcdl.spec`), so each segment has at most one."""
    segments, first = [], 0
    for k, e in enumerate(model.exits):
        segments.append((first, e.after_block + 1, k))
        first = e.after_block + 1
    if first < len(model.blocks) or not segments:
        segments.append((first, len(model.blocks), None))
    return segments


def segment(executor, images: np.ndarray, state, first: int, stop: int, k: Optional[int]):
    """``(state, logits)``: blocks ``first .. stop-1`` on ``state`` (``None``: the stem on
    ``images`` first), then exit k's logits (``None`` when k is None).

    An executor with a ``segment`` method of the same signature runs all of that itself (the
    fast backend: one jitted call for the edge, one for the cloud); otherwise its per-layer
    methods are called. When k is None and the segment ends the network, its own ``segment``
    may return the head's logits in place of None (it ran the head in the same call); see
    :func:`head`."""
    own = getattr(executor, "segment", None)
    if own is not None:
        return own(images, state, first, stop, k)
    if state is None:
        state = executor.stem(images)
    for b in range(first, stop):
        state = executor.block(b, state)
    return state, (None if k is None else executor.exit(k, state))


def head(executor, state, logits):
    """The head's logits after the last segment: those its ``segment`` returned, or
    ``executor.head(state)``."""
    return executor.head(state) if logits is None else logits


@dataclasses.dataclass
class Results:
    """Per-sample outcome of Algorithm 1.

    ``exit_index[i]`` is the early exit sample i took, or FINAL (-1) for the head;
    ``entropies[i, k]`` is the entropy at exit k, NaN where exit k was not evaluated.
    """
    predictions: np.ndarray     # [N] int64
    exit_index: np.ndarray      # [N] int64
    entropies: np.ndarray       # [N, K] float64
    logits: np.ndarray          # [N, classes] float32, of the exit that decided


def run(model: Model, images: np.ndarray, executor, thresholds: Optional[Sequence[float]] = None,
        batch_size: int = 100, progress: Optional[Progress] = None) -> Results:
    """Run Algorithm 1 over ``images`` (uint8 ``[N, 3, 32, 32]``) with the given executor."""
    exits = model.exits
    thr = [e.threshold for e in exits] if thresholds is None else [float(t) for t in thresholds]
    if len(thr) != len(exits):
        raise ValueError(f"{len(thr)} threshold(s) given for {len(exits)} exit(s)")
    n, classes = len(images), model.spec.num_classes
    out = Results(np.zeros(n, np.int64), np.full(n, FINAL, np.int64),
                  np.full((n, len(exits)), np.nan), np.zeros((n, classes), np.float32))
    segments = plan(model)
    for start in range(0, n, batch_size):
        end = min(start + batch_size, n)
        # rows start..end-1 of out are this batch's while nobody has left (a slice: no index
        # arrays at batch 1); idx lists the samples still in it once some have
        rows, idx, final = slice(start, end), None, None
        batch = np.ascontiguousarray(images[rows])
        state = None
        for first, stop, k in segments:
            state, logits = segment(executor, batch, state, first, stop, k)
            if k is None:
                final = logits
                continue
            h = entropy(logits)
            out.entropies[rows if idx is None else idx, k] = h
            take = h < thr[k]
            taken = np.count_nonzero(take)
            if not taken:
                continue
            if idx is None:
                if taken == len(take):          # the whole batch leaves here
                    out.exit_index[rows] = k
                    out.logits[rows] = logits
                    idx = np.empty(0, np.int64)
                    break
                idx = np.arange(start, end)
            out.exit_index[idx[take]] = k
            out.logits[idx[take]] = logits[take]
            keep = np.flatnonzero(~take)
            idx = idx[keep]
            if len(idx) == 0:
                break
            state = executor.select(state, keep)
        if idx is None or len(idx):
            out.logits[rows if idx is None else idx] = head(executor, state, final)
        if progress is not None:
            progress.update(end - start)
    out.predictions[:] = out.logits.argmax(axis=1)
    return out


def outputs(model: Model, images: np.ndarray, executor, batch_size: int = 100,
            progress: Optional[Progress] = None) -> list:
    """Logits of every early exit and of the head for every sample, nobody leaving early:
    ``[exit 0, ..., exit K-1, head]``, float32 ``[N, classes]`` each.

    What threshold calibration and trade-off curves need (:mod:`xnorcdl.calibrate` replays
    Algorithm 1 on them for any thresholds); each row is what :func:`run` computes for that
    sample at that output, up to the float32 rounding that batch composition may change in
    BLAS-backed layers (the decisions of ``run`` are tested equal).
    """
    n, classes = len(images), model.spec.num_classes
    outs = [np.zeros((n, classes), np.float32) for _ in range(len(model.exits) + 1)]
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        batch, state, final = np.ascontiguousarray(images[sl]), None, None
        for first, stop, k in plan(model):
            state, logits = segment(executor, batch, state, first, stop, k)
            if k is not None:
                outs[k][sl] = logits
            else:
                final = logits
        outs[-1][sl] = head(executor, state, final)
        if progress is not None:
            progress.update(sl.stop - sl.start)
    return outs
