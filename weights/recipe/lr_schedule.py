"""Learning-rate schedules of the recipe: by step (:func:`make_sched`) or by the wall clock
(:class:`TimeSched`, ``--time-budget``), both following the curve of :func:`lr_at`."""
from __future__ import annotations

import math
import time
from typing import List

import torch


def make_sched(opt, kind: str, lr: float, total: int, warmup_frac: float):
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=total, pct_start=warmup_frac, div_factor=10.0,
            final_div_factor=100.0, anneal_strategy="cos")
    warm = max(1, int(total * warmup_frac))
    f = lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def fast_forward(sched, steps: int) -> None:
    """Advance ``sched`` by ``steps`` steps without optimizer steps (a run resumed from a partial
    state): the same rates as that many ``sched.step()`` calls in training, without PyTorch's
    warning that the scheduler stepped before the optimizer (here on purpose)."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` "
                                                  r"before `optimizer\.step\(\)`")
        for _ in range(steps):
            sched.step()


def lr_at(kind: str, lr: float, p: float, warmup_frac: float) -> float:
    """Learning rate at progress p in [0, 1] (fraction of the budget spent), the shapes of
    :func:`make_sched`: ``onecycle`` rises from lr/10 to lr over ``warmup_frac`` along a half
    cosine, then falls to lr/1000 along a half cosine; ``cosine`` rises linearly, then falls to
    0."""
    p = min(max(p, 0.0), 1.0)
    w = max(warmup_frac, 1e-9)
    if kind == "onecycle":
        lo, hi, end = lr / 10.0, lr, lr / 1000.0
        if p < w:
            return hi + (lo - hi) / 2 * (1 + math.cos(math.pi * p / w))
        return end + (hi - end) / 2 * (1 + math.cos(math.pi * (p - w) / max(1e-9, 1 - w)))
    if p < w:
        return lr * p / w
    return lr * 0.5 * (1 + math.cos(math.pi * (p - w) / max(1e-9, 1 - w)))


class TimeSched:
    """Learning-rate schedule driven by wall-clock time (``--time-budget``): before every step the
    rate is :func:`lr_at` of the fraction of the phase's budget spent so far; the phase ends at
    the first step that finds the budget spent. Momentum stays at the optimizer's 0.9. The
    number of epochs and steps this gives is recorded in the log and the file's provenance."""

    def __init__(self, opt, kind: str, lr: float, budget: float, warmup_frac: float):
        self.opt, self.kind, self.lr, self.budget, self.warmup = opt, kind, lr, budget, warmup_frac
        self.spent, self.t0, self.steps = 0.0, time.time(), 0
        self.step(count=False)

    def progress(self) -> float:
        return (self.spent + time.time() - self.t0) / self.budget

    def done(self) -> bool:
        return self.progress() >= 1.0

    def step(self, count: bool = True) -> None:
        self.steps += int(count)
        self.last = lr_at(self.kind, self.lr, self.progress(), self.warmup)
        for g in self.opt.param_groups:
            g["lr"] = self.last

    def get_last_lr(self) -> List[float]:
        return [self.last]

    def state_dict(self) -> dict:
        return {"spent": self.spent + time.time() - self.t0, "steps": self.steps}

    def load_state_dict(self, d: dict) -> None:
        self.spent, self.steps, self.t0 = d["spent"], d["steps"], time.time()
        self.step(count=False)
