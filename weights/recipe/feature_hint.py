"""Feature hints (``--hint W``): the features an early exit reads learn the teacher's.

A FitNets-style hint (Romero et al. 2015) placed on the exit's own input. For the early exit k
after block b, s_k = avgpool3(x_b) is the student's block output pooled as the exit pools it
(3x3 stride 3, [N, C, 5, 5] at conv 20 of a ResNet-32) and t_k the same pooling of the
teacher's block b output. A training-only 1x1 adapter A_k (weight [C_t, C_s], bias) maps one to
the other, and the loss, added to eq. (5) with weight W, is the relative squared error

    L_hint = sum_k ||A_k s_k - t_k||^2 / ||t_k||^2        (sums over the batch)

Why this target: the exit is linear, so it can only use what is linearly present in s_k. On the
validation split a linear read-out of the full-precision ResNet-32's pooled block-10 output
reaches 84 % top-1, against 76 % for the 1-bit hybrid's exit on its own (both trained on the
same 45000 images); A_k lets the binary features match the teacher's up to a mixing of
channels, which the exit's own linear layer can absorb.

The adapters are not part of the model's file (the exported arrays, the exit and Algorithm 1
are unchanged); :func:`fit_least_squares` sets them by least squares before training starts,
so the hint's first gradients point at what the features lack, not at a random projection.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def pooled(x: torch.Tensor) -> torch.Tensor:
    """What an early exit reads of a block output: avg pool 3x3 stride 3 (floor)."""
    return F.avg_pool2d(x, 3, 3)


class Hints(nn.Module):
    """One 1x1 adapter per hinted block (student channels -> teacher channels)."""

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]):
        super().__init__()
        self.adapters = nn.ModuleList(nn.Conv2d(cs, ct, 1, bias=True)
                                      for cs, ct in zip(student_channels, teacher_channels))

    def loss(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]
             ) -> torch.Tensor:
        """L_hint of the module docstring from block outputs (unpooled)."""
        total = 0.0
        for a, s, t in zip(self.adapters, student, teacher):
            t = pooled(t.detach())
            total = total + (a(pooled(s)) - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
        return total


@torch.no_grad()
def fit_least_squares(hints: Hints, student: Sequence[torch.Tensor],
                      teacher: Sequence[torch.Tensor]) -> list:
    """Set every adapter to the least-squares map from the pooled student to the pooled teacher
    outputs given (block outputs of the same images); returns the relative error left per
    adapter."""
    errors = []
    for a, s, t in zip(hints.adapters, student, teacher):
        xs = pooled(s).permute(0, 2, 3, 1).reshape(-1, s.shape[1]).double().cpu()
        yt = pooled(t).permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double().cpu()
        xs1 = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], 1)
        sol = torch.linalg.lstsq(xs1, yt, driver="gelsd").solution  # [C_s + 1, C_t]
        a.weight.copy_(sol[:-1].T.reshape(a.weight.shape).to(a.weight))
        a.bias.copy_(sol[-1].to(a.bias))
        errors.append(float((xs1 @ sol - yt).pow(2).sum() / yt.pow(2).sum()))
    return errors
