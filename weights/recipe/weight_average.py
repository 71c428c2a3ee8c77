"""Stochastic weight averaging of the recipe (``--swa-every N --swa-start F``).

Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization" (2018):
once a fraction F of the run is spent, every N-th optimizer step's parameters are added to a
running mean,

    theta_swa <- theta_swa + (theta - theta_swa) / (n + 1),    n snapshots so far,

so theta_swa = (1/n) sum_i theta_i. For a quantized conv the mean is taken over its real-valued
latent weights; the exported codes are those of the mean (sign and alpha of eq. (3) and (2) for
1 bit), i.e. a weight whose latent value kept crossing zero ends with the sign it held on
balance. Batch norms are not averaged: their running statistics belong to the weights that
produced them, so :func:`Averager.finish` recomputes them for theta_swa as the cumulative
average over augmented training batches (``torch.optim.swa_utils.update_bn``). The averaged
model is exported besides ``--out`` (``<out>_swa.npz``).
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch.optim.swa_utils import AveragedModel, update_bn


class Averager:
    """Running mean of ``model``'s parameters (buffers excluded) over the optimizer steps
    after the fraction ``start`` of the run, one snapshot every ``every`` such steps
    (:meth:`after_step` is told the fraction of the run spent after each step)."""

    def __init__(self, model: torch.nn.Module, start: float, every: int):
        self.avg = AveragedModel(model, device=None, use_buffers=False)
        self.start, self.every, self.eligible = start, every, 0

    @property
    def snapshots(self) -> int:
        return int(self.avg.n_averaged)

    def after_step(self, model: torch.nn.Module, progress: float) -> None:
        if progress <= self.start:
            return
        self.eligible += 1
        if self.eligible % self.every == 0:
            self.avg.update_parameters(model)

    def state_dict(self) -> dict:
        return {"avg": self.avg.state_dict(), "eligible": self.eligible}

    def load_state_dict(self, d: dict) -> None:
        self.avg.load_state_dict(d["avg"])
        self.eligible = d["eligible"]

    def finish(self, batches: Iterable[torch.Tensor]) -> torch.nn.Module:
        """A copy of the averaged model with its BN running statistics recomputed over
        ``batches`` (the model in train mode, momentum None: cumulative averages)."""
        if self.snapshots == 0:
            raise ValueError("no snapshot was averaged: the run ended before --swa-start "
                             "(or before --swa-every steps after it)")
        model = copy.deepcopy(self.avg.module)
        update_bn(batches, model)
        model.eval()
        return model
