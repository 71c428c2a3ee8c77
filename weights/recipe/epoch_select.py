"""Choose the epoch to export by the operating point a floor measures, not by top-1 accuracy.

With ``--select-by RULE`` every validation (``--eval-every``, and after the last epoch)
calibrates the exit thresholds on the validation split with RULE (:mod:`xnorcdl.calibrate`)
and replays Algorithm 1 on the same logits. The epoch's operating point is the conditional
accuracy ``acc`` and the edge fraction ``edge`` (samples leaving at any early exit). Its score,
compared lexicographically, is what RULE leaves free:

* ``accuracy:A``, ``within:D``: (edge, acc): the most edge exits at the accuracy held fixed;
* ``exits:P``, ``fixed:T``: (acc, edge): the best accuracy at the edge fraction held fixed.

The best-scoring validated epoch (the earliest among equals) is kept beside the run's
checkpoint and exported to ``--select-out`` as well as the last epoch to ``--out``. Why: the
exit's top-1 accuracy swings by several points between consecutive epochs of a binary hybrid
and does not track the operating points, so the last epoch is a draw among them.

With ``--init`` the starting file is scored the same way before the first step and recorded
(``selected.init_point`` in the provenance): the figure a round has to beat. It is not itself
a candidate (it is already a file).

The selection reads the validation split, which also calibrates the thresholds: the chosen
file's validation figures are optimistic by the choice (the maximum of several draws), and only
the test split measures it. ``--select-images N`` scores on the first N validation images only;
the others then measure the chosen file (and any bar it is compared with) without that
optimism: ``python -m xnorcdl.tradeoff --calib-range N:``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from xnorcdl import calibrate as xcal


def operating_point(logits: Sequence, labels: np.ndarray, rule: str) -> dict:
    """Calibrate by ``rule`` on (``logits`` of every exit and the head, ``labels``) and score the
    resulting operating point (module doc): thresholds, acc and edge in %, score."""
    kind, _ = xcal.parse_rule(rule)
    outs = [np.asarray(l) for l in logits]
    if len(outs) < 2:
        raise ValueError("epoch selection needs at least one early exit")
    labels = np.asarray(labels)
    thresholds = xcal.calibrate(outs, labels, rule)
    acc, fractions = xcal.conditional(outs, labels, thresholds)
    edge = float(sum(fractions))
    score = (acc, edge) if kind in ("exits", "fixed") else (edge, acc)
    return {"rule": rule, "thresholds": [float(t) for t in thresholds],
            "acc": round(acc * 100, 2), "edge": round(edge * 100, 2),
            "score": [float(s) for s in score]}


def better(new: dict, best: Optional[dict]) -> bool:
    """True when ``new`` scores strictly above ``best`` (or there is none yet): a tie keeps
    the earlier epoch."""
    return best is None or tuple(new["score"]) > tuple(best["score"])


def default_out(out: str, tag: str = "best") -> str:
    """``--select-out`` when not given: ``r32_20E.npz`` -> ``r32_20E_best.npz`` (``tag``
    "swa": the weight average's file)."""
    stem, ext = (out[:-4], ".npz") if out.endswith(".npz") else (out, "")
    return f"{stem}_{tag}{ext}"
