"""Validation logits and Algorithm 1 on them: entropies, decisions, accuracy, thresholds.

The decisions and the fast calibration are the engine's (:mod:`xnorcdl.calibrate`), so the
recipe and ``python -m xnorcdl.tradeoff`` agree by construction; :func:`calibrate` is the slow,
obviously correct scan the tests hold the fast one to.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from xnorcdl import calibrate as xcal


def entropy_tensor(logits: torch.Tensor) -> torch.Tensor:
    """Softmax entropy in nats (eq. 7), float64, on the logits' device, as
    xnorcdl.engine.entropy."""
    z = logits.double()
    z = z - z.max(dim=1, keepdim=True).values
    e = z.exp()
    s = e.sum(1)
    p = e / s[:, None]
    return torch.clamp(s.log() - (p * z).sum(1), min=0.0)


def entropy(logits: torch.Tensor) -> np.ndarray:
    """:func:`entropy_tensor` as a NumPy array."""
    return entropy_tensor(logits).cpu().numpy()


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 500, device="cpu"):
    """Eval-mode logits of every exit and the head: list of float32 arrays [N, C]."""
    model.eval()
    outs = None
    for s in range(0, len(x), batch):
        ls = model(x[s:s + batch].to(device))
        ls = [l.float().cpu() for l in ls]
        outs = [[l] for l in ls] if outs is None else [o + [l] for o, l in zip(outs, ls)]
    return [torch.cat(o) for o in outs]


def _np(logits: List[torch.Tensor]) -> List[np.ndarray]:
    return [l.numpy() if torch.is_tensor(l) else np.asarray(l) for l in logits]


def decide(logits: List[torch.Tensor], thresholds: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Algorithm 1 on precomputed logits: (predictions, exit index per sample), the index -1
    (``xnorcdl.engine.FINAL``) for samples that reach the head (:func:`xnorcdl.calibrate.decide`)."""
    return xcal.decide(_np(logits), thresholds)


def conditional(logits: List[torch.Tensor], labels: np.ndarray, thresholds: Sequence[float]):
    """Algorithm 1 on precomputed logits: (accuracy, per-exit exit fractions)."""
    return xcal.conditional(_np(logits), labels, thresholds)


def calibrate(logits: List[torch.Tensor], labels: np.ndarray, rule: str) -> List[float]:
    """Exit thresholds from validation logits.

    ``fixed:T``: T for every exit. ``within:D``: exits in order, each gets the largest threshold
    (among the midpoints between consecutive distinct validation entropies) such that the
    accuracy of the conditional network (later exits off) stays >= the no-exit validation
    accuracy minus D percentage points.
    """
    kind, _, val = rule.partition(":")
    value = float(val)
    n_exits = len(logits) - 1
    if kind == "fixed":
        return [value] * n_exits
    if kind != "within":
        raise ValueError(f"--threshold-rule: expected within:D or fixed:T, got {rule!r}")
    base = float((logits[-1].argmax(1).numpy() == labels).mean())
    floor_acc = base - value / 100.0
    chosen: List[float] = []
    for k in range(n_exits):
        h = np.unique(entropy(logits[k]))
        cands = np.concatenate([[0.0], (h[:-1] + h[1:]) / 2, [h[-1] + 1e-6]])
        best = 0.0
        for t in cands:  # accuracy is not monotonic in t; scan all
            acc, _ = conditional(logits, labels, chosen + [float(t)] + [0.0] * (n_exits - k - 1))
            if acc >= floor_acc - 1e-12:
                best = float(t)
        chosen.append(best)
    return chosen


def calibrate_fast(logits: List[torch.Tensor], labels: np.ndarray, rule: str) -> List[float]:
    """As :func:`calibrate`, vectorised over candidate thresholds (same result): the engine's
    :func:`xnorcdl.calibrate.calibrate`, which ``python -m xnorcdl.tradeoff`` also uses."""
    try:
        return xcal.calibrate(_np(logits), np.asarray(labels), rule)
    except ValueError as exc:
        raise ValueError(f"--threshold-rule: {exc}") from None
