"""Exit thresholds from labelled calibration images, and Algorithm 1 replayed on stored logits.

The paper sets the thresholds "empirically" (section II.C). Here they are chosen on a labelled
calibration set, never on the evaluation set, from the logits of every exit and of the head
for every sample (:func:`xnorcdl.engine.outputs`). With those, Algorithm 1 can be replayed for
any thresholds without running the network again: sample i leaves at the first exit k whose
softmax entropy (eq. 7) is strictly below ``t_k``, otherwise the head decides.

Rules (``parse_rule``):

* ``fixed:T``   T nats at every exit (the paper: 0.5 for CIFAR-10, 1.0 for CIFAR-100);
* ``within:D``  exits in order, each gets the largest threshold such that the accuracy of the
  conditional network on the calibration set (later exits closed) stays >= its no-exit accuracy
  minus D percentage points;
* ``exits:P``   exits in order, each gets the largest threshold such that at most P % of the
  calibration samples leave at the edge (all exits so far together);
* ``accuracy:A`` exits in order, each gets the largest threshold such that the accuracy of the
  conditional network on the calibration set (later exits closed) stays >= A %: the most edge
  exits for a target accuracy. If the network without exits is already below A, no sample
  leaves (every threshold 0).

Candidates are 0, the midpoints between consecutive distinct entropies of the samples still
undecided, and just above the largest one, so a threshold never splits equal entropies and the
choice does not depend on the order of the samples.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from .engine import FINAL, entropy
from .errors import UsageError

RULES = ("fixed", "within", "exits", "accuracy")


def parse_rule(rule: str) -> Tuple[str, float]:
    """``"within:0.5"`` -> ``("within", 0.5)``; a :class:`~xnorcdl.errors.UsageError` (a
    ``ValueError``) naming what was expected."""
    kind, sep, val = str(rule).partition(":")
    try:
        value = float(val)
    except ValueError:
        value = float("nan")
    if not sep or kind not in RULES or not np.isfinite(value) or value < 0 or (
            kind in ("exits", "accuracy") and value > 100):
        raise UsageError(f"threshold rule: expected fixed:T (nats >= 0), within:D (points >= 0), "
                         f"exits:P (0..100 %) or accuracy:A (0..100 %), got {rule!r}",
                         where="rule")
    return kind, value


def _check(outputs: Sequence[np.ndarray], labels=None) -> None:
    if len(outputs) < 1:
        raise ValueError("outputs: expected the logits of every exit and of the head")
    n = len(outputs[-1])
    if any(o.ndim != 2 or len(o) != n for o in outputs):
        raise ValueError("outputs: expected [N, classes] logits with the same N for every output")
    if labels is not None and np.shape(labels) != (n,):
        raise ValueError(f"labels: expected shape ({n},), got {np.shape(labels)}")


def decide(outputs: Sequence[np.ndarray], thresholds: Sequence[float]
           ) -> Tuple[np.ndarray, np.ndarray]:
    """Algorithm 1 on stored logits ``[exit 0, ..., exit K-1, head]``: (predictions, exit index
    per sample, ``FINAL`` (-1) for the head)."""
    _check(outputs)
    if len(thresholds) != len(outputs) - 1:
        raise ValueError(f"{len(thresholds)} threshold(s) given for {len(outputs) - 1} exit(s)")
    pred = np.asarray(outputs[-1]).argmax(axis=1)
    where = np.full(len(pred), FINAL, dtype=np.int64)
    left = np.ones(len(pred), dtype=bool)
    for k, t in enumerate(thresholds):
        take = left & (entropy(outputs[k]) < float(t))
        pred = np.where(take, np.asarray(outputs[k]).argmax(axis=1), pred)
        where[take] = k
        left &= ~take
    return pred.astype(np.int64), where


def conditional(outputs: Sequence[np.ndarray], labels: np.ndarray, thresholds: Sequence[float]
                ) -> Tuple[float, List[float]]:
    """(accuracy, fraction leaving at each exit) of Algorithm 1 with ``thresholds``."""
    pred, where = decide(outputs, thresholds)
    n = max(len(pred), 1)
    return (float((pred == np.asarray(labels)).sum() / n),
            [float((where == k).sum() / n) for k in range(len(thresholds))])


def calibrate(outputs: Sequence[np.ndarray], labels: np.ndarray, rule: str) -> List[float]:
    """Thresholds, one per exit, chosen on (``outputs``, ``labels``) by ``rule`` (module doc)."""
    kind, value = parse_rule(rule)
    labels = np.asarray(labels)
    _check(outputs, labels)
    n_exits, n = len(outputs) - 1, len(labels)
    if kind == "fixed":
        return [value] * n_exits
    if n == 0:
        raise ValueError("calibration set is empty")
    correct_now = outputs[-1].argmax(axis=1) == labels  # outcome if nobody leaves from here on
    if kind == "accuracy":                                 # least accuracy allowed
        floor = value / 100.0 - 1e-12
    else:
        floor = correct_now.sum() / n - value / 100.0 - 1e-12
    budget = value / 100.0 + 1e-12                          # exits: largest edge fraction allowed
    left = np.ones(n, dtype=bool)
    chosen: List[float] = []
    for k in range(n_exits):
        h = entropy(outputs[k])
        ck = outputs[k].argmax(axis=1) == labels
        hu = np.unique(h[left]) if left.any() else np.zeros(1)
        cands = np.concatenate([[0.0], (hu[:-1] + hu[1:]) / 2, [hu[-1] + 1e-6]])
        order = np.argsort(h, kind="stable")
        m = np.searchsorted(h[order], cands, side="left")  # samples with h < t, per candidate
        if kind in ("within", "accuracy"):
            gain = np.where(left, ck.astype(np.int64) - correct_now, 0)[order]
            score = correct_now.sum() + np.concatenate([[0], np.cumsum(gain)])[m]
            ok = np.flatnonzero(score / n >= floor)
        else:
            out = np.concatenate([[0], np.cumsum(left[order])])[m]
            ok = np.flatnonzero(((n - left.sum()) + out) / n <= budget)
        t = float(cands[ok[-1]]) if len(ok) else 0.0
        chosen.append(t)
        take = left & (h < t)
        correct_now = np.where(take, ck, correct_now)
        left &= ~take
    return chosen
