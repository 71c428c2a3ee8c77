#!/usr/bin/env python
"""Train a conditionally deep hybrid ResNet on CIFAR-10 and export it in the xnorcdl format.

One command, the configuration as arguments (printed, resolved, at start)::

    python weights/recipe/train.py --depth 32 --edge-convs 20 --edge-bits 1 --exits 20 \
        --exit-weights 0.6 --epochs 30 --seed 0 --init weights/r32_fp.npz \
        --out weights/r32_20E.npz

The PyTorch model mirrors docs/FORMAT.md operation by operation (stem, edge blocks of QuanConv
without ReLU, BN before quantization, float cloud blocks, shortcuts, exits with 3x3/3 average
pooling, head). Quantized layers train XNOR-Net style on real-valued latent weights: the forward
uses the codes of eq. (1)/(3) and alpha of eq. (2) computed from the latent weights (gradient
through alpha included); the backward is a straight-through estimator, clipped identity for
activations (zero gradient where |y| > v0) and for weights.

Training strategies (paper section II.B):

* ``joint`` (eq. 5-6): loss = sum_k lambda_k L_k over the early exits (``--exit-weights``) plus
  (1 - sum lambda_k) times the loss of the final exit (the head); L_k is eq. (4).
* ``separate``: train the hybrid without exits (head loss only) for ``--epochs``, then freeze
  every conv and BN (BN in inference mode) and train each exit alone on eq. (4) for
  ``--exit-epochs`` (the exits share no parameters, so one pass trains all of them independently).

Data: the 50000 CIFAR-10 training images, of which the LAST 5000 are held out as validation and
never trained on; the test split is never read here. Augmentation: random crop with 4-pixel zero
padding and horizontal flip. SGD (momentum 0.9, Nesterov), weight decay on float conv and linear
weights only (not on BN, biases, or, by default, the latent weights of quantized convs),
OneCycle or cosine learning rate, batch 128. ``--time-budget S`` replaces ``--epochs``: the same
learning-rate curve is followed along the wall clock and training stops when S seconds are spent
(the epochs and steps done are recorded); on CUDA, convolutions use TF32 (exact for the codes).

Distillation (``--teacher FILE``, optional): every output (exits and head) also learns from the
head logits of a frozen model, typically the full-precision ResNet; see :func:`distill_loss`.
It changes the loss only, never the exported model's semantics. Distillation at T = 4 makes the
binary hybrid diverge within a few dozen steps at lr 0.1 (logits grow without bound, then NaN);
``--clip-grad N`` clips the global gradient norm (N = 5 keeps it stable; the plain
cross-entropy gradient norm is about 3 at the start).

``--cuda-graphs 1`` (CUDA, joint training) captures the training forward and backward once and
replays them (:func:`graph_model`); same kernels, fewer launches. ``--compile 1`` runs the
training forward/backward (and the teacher) through ``torch.compile`` instead: on two CPU cores a
batch-128 step of the 20E+10C hybrid takes 0.75 s instead of 1.05 s, after a one-time compilation
of about 100 s (2-4 minutes with a teacher); validation and export use the ordinary modules.

Exit thresholds are calibrated on the validation split only (see :func:`calibrate`): by default
the largest threshold such that the validation accuracy of the whole conditional network stays
within 0.5 points of the no-exit validation accuracy (``--threshold-rule within:0.5``);
``exits:P`` lets at most P % of the validation samples leave; ``fixed:T`` uses T for every exit
(:mod:`xnorcdl.calibrate`). Both the calibrated and the paper's fixed 0.5 figures are recorded in
the file's ``provenance``; ``python -m xnorcdl.tradeoff`` recalibrates a file without PyTorch.

Initialisation from an .npz (``--init``): arrays are copied by name where the layer has the same
role in both files. An edge conv's BN sits before the conv (on its input channels) and has no
counterpart in a full-precision file (whose BN follows the conv); it starts as the identity
(gamma 1, beta 0, running mean 0, running var 1), so the first batches quantize the block input
itself, and batch statistics take over from the first step. The latent weights start from the
full-precision conv weights. Exits missing from the source start at random.

Checkpoints are written atomically after every epoch to ``--ckpt-dir`` (default
``$XDG_CACHE_HOME/xnorcdl/runs/<name of --out>``), with the log file ``train.log``; rerunning the
same command resumes from the last completed epoch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from xnorcdl import calibrate as xcal
from xnorcdl.format import load_weights, save_weights
from xnorcdl.spec import CIFAR10_MEAN, CIFAR10_STD, ExitSpec, ModelSpec, expected_arrays

VAL_SIZE = 5000


# ============================================================================ model

class BN(nn.BatchNorm2d):
    """BatchNorm; in eval mode computed as the engine does: x * scale + shift with
    scale = gamma / sqrt(var + eps), shift = beta - mean * scale, both rounded to float32 once."""

    def forward(self, x):
        if self.training:
            return super().forward(x)
        scale = self.weight.double() / torch.sqrt(self.running_var.double() + self.eps)
        shift = self.bias.double() - self.running_mean.double() * scale
        scale, shift = scale.float(), shift.float()
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class _Codes(torch.autograd.Function):
    """Integer codes with a clipped straight-through gradient, as one forward and one backward
    elementwise pass (the autograd graph of the clamp/where/detach formulation costs several)."""

    @staticmethod
    def forward(ctx, y, bits: int, v0: float):
        ctx.save_for_backward(y)
        ctx.bits, ctx.v0 = bits, v0
        if bits == 1:
            return torch.where(y >= 0, 1.0, -1.0).to(y.dtype)
        z = (1 << bits) - 1
        v0t = torch.tensor(v0, dtype=torch.float32, device=y.device)
        k = torch.tensor(z / (2.0 * float(v0)), dtype=torch.float32, device=y.device)
        q = torch.floor((torch.clamp(y, -float(v0), float(v0)) + v0t) * k + 0.5)
        return 2 * q - z

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        if ctx.bits == 1:
            return g * (y.abs() <= 1.0).to(g.dtype), None, None
        slope = ((1 << ctx.bits) - 1) / float(ctx.v0)
        return g * ((y.abs() <= float(ctx.v0)).to(g.dtype) * slope), None, None


def quant_codes(y: torch.Tensor, bits: int, v0: float) -> torch.Tensor:
    """Integer codes of eq. (1)/(3) as float tensors, with a clipped straight-through gradient.

    p = 1: u = sign(y), sign(0) = +1, du/dy = 1 on |y| <= 1 (v0 plays no role for p = 1).
    p > 1: q = floor((clip(y, -v0, v0) + v0) * (Z / v1) + 0.5), u = 2q - Z; du/dy = Z / v0 on
    |y| <= v0. Forward values are exactly those of xnorcdl.quant (float32 arithmetic).
    """
    return _Codes.apply(y, bits, float(v0))


def quant_codes_autograd(y: torch.Tensor, bits: int, v0: float) -> torch.Tensor:
    """:func:`quant_codes` written with autograd primitives (clamp, where, detach): the
    definition the custom function is tested against."""
    if bits == 1:
        yc = torch.clamp(y, -1.0, 1.0)
        u = torch.where(y >= 0, torch.ones_like(y), -torch.ones_like(y))
        return yc + (u - yc).detach()
    z = (1 << bits) - 1
    v0t = torch.tensor(v0, dtype=torch.float32)
    k = torch.tensor(z / (2.0 * float(v0)), dtype=torch.float32)
    yc = torch.clamp(y, -float(v0), float(v0))
    q = torch.floor((yc.detach() + v0t) * k + 0.5)
    u = 2 * q - z
    lin = yc * (z / float(v0))
    return lin + (u - lin).detach()


class QuanConv(nn.Module):
    """QuanConv of Fig. 2: s[o] * conv3x3(Q_a(BN(x)), Q_w(W)) with the integer codes of eq. (1)/(3)
    and s[o] = alpha[o] (p = 1) or alpha[o] v0^2 / Z^2, alpha[o] = mean |W[o]| (eq. 2)."""

    def __init__(self, cin: int, cout: int, stride: int, bits: int, v0: float):
        super().__init__()
        self.bn = BN(cin)
        self.weight = nn.Parameter(torch.empty(cout, cin, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.stride, self.bits, self.v0 = stride, bits, v0

    def forward(self, x):
        ua = quant_codes(self.bn(x), self.bits, self.v0)
        uw = quant_codes(self.weight, self.bits, self.v0)
        alpha = self.weight.abs().mean(dim=(1, 2, 3))
        if self.bits > 1:
            alpha = alpha * (self.v0 / ((1 << self.bits) - 1)) ** 2
        acc = F.conv2d(ua, uw, None, self.stride, 1)
        return acc * alpha[None, :, None, None]


class Block(nn.Module):
    """Residual block b. Edge: x' = Q2(Q1(x)) + sc(x), no ReLU. Cloud: relu(BN(conv(relu(BN(conv x))))
    + sc(x)). Shortcut: identity, zero_pad (x[:, :, ::2, ::2] with w/2 zero channels each side) or
    BN(conv1x1 stride 2)."""

    def __init__(self, edge: bool, cin: int, cout: int, stride: int, shortcut: str,
                 bits: int, v0: float):
        super().__init__()
        self.edge = edge
        if edge:
            self.q1 = QuanConv(cin, cout, stride, bits, v0)
            self.q2 = QuanConv(cout, cout, 1, bits, v0)
        else:
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = BN(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = BN(cout)
            for c in (self.conv1, self.conv2):
                nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")
        self.kind = "identity" if stride == 1 else shortcut
        self.pad = cin // 2
        if self.kind == "conv1x1":
            self.sc_conv = nn.Conv2d(cin, cout, 1, 2, 0, bias=False)
            self.sc_bn = BN(cout)

    def shortcut(self, x):
        if self.kind == "identity":
            return x
        if self.kind == "zero_pad":
            return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return self.sc_bn(self.sc_conv(x))

    def forward(self, x):
        if self.edge:
            return self.q2(self.q1(x)) + self.shortcut(x)
        t = F.relu(self.bn1(self.conv1(x)))
        t = self.bn2(self.conv2(t))
        return F.relu(t + self.shortcut(x))


class HybridResNet(nn.Module):
    """The network of docs/FORMAT.md for a :class:`ModelSpec`; forward returns the logits of
    every early exit (in spec order) followed by the head's."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.stem_conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(self.stem_conv.weight, mode="fan_out", nonlinearity="relu")
        self.stem_bn = BN(16)
        blocks = []
        for b in range(spec.num_blocks):
            _, cin, cout, stride = spec.block_geometry(b)
            blocks.append(Block(spec.is_edge_conv(2 * b + 2), cin, cout, stride, spec.shortcut,
                                spec.edge_bits, float(spec.v0)))
        self.blocks = nn.ModuleList(blocks)
        self.exit_after = [e.after_conv // 2 - 1 for e in spec.exits]
        self.exits = nn.ModuleList(nn.Linear(spec.exit_features(e.after_conv), spec.num_classes)
                                   for e in spec.exits)
        self.head = nn.Linear(64, spec.num_classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = float(spec.bn_eps)
        mean = torch.tensor(spec.mean, dtype=torch.float32)[None, :, None, None]
        std = torch.tensor(spec.std, dtype=torch.float32)[None, :, None, None]
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """x = (pixels / 255 - mean[c]) / std[c] in float32, as the engine."""
        return (pixels.float() / 255.0 - self.mean) / self.std

    def features(self, x: torch.Tensor, upto: Optional[int] = None) -> List[torch.Tensor]:
        """Block outputs needed by the exits, then the last one computed."""
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        out = []
        last = len(self.blocks) - 1 if upto is None else upto
        for b in range(last + 1):
            x = self.blocks[b](x)
            if b in self.exit_after:
                out.append(x)
        out.append(x)
        return out

    def exit_logits(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """avg pool 3x3 stride 3 (floor), flatten (c, h, w), linear."""
        f = F.avg_pool2d(x, 3, 3).flatten(1)
        return self.exits[k](f)

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))

    def forward(self, pixels: torch.Tensor, with_head: bool = True) -> List[torch.Tensor]:
        x = self.normalize(pixels)
        if not x.is_contiguous(memory_format=torch.channels_last) and CHANNELS_LAST[0]:
            x = x.contiguous(memory_format=torch.channels_last)
        upto = None if with_head or not self.exit_after else max(self.exit_after)
        feats = self.features(x, upto)
        logits = [self.exit_logits(k, feats[k]) for k in range(len(self.exits))]
        if with_head:
            logits.append(self.head_logits(feats[-1]))
        return logits


CHANNELS_LAST = [False]


# ============================================================================ export / import

def _bn_arrays(prefix: str, bn: nn.BatchNorm2d) -> Dict[str, torch.Tensor]:
    return {f"{prefix}.bn.gamma": bn.weight, f"{prefix}.bn.beta": bn.bias,
            f"{prefix}.bn.mean": bn.running_mean, f"{prefix}.bn.var": bn.running_var}


def named_tensors(model: HybridResNet) -> Dict[str, torch.Tensor]:
    """Every array of the weights file, by its docs/FORMAT.md name, as the model's own tensors."""
    spec = model.spec
    out = {"stem.conv.weight": model.stem_conv.weight}
    out.update(_bn_arrays("stem", model.stem_bn))
    for b, blk in enumerate(model.blocks):
        i, j = 2 * b + 1, 2 * b + 2
        if blk.edge:
            for n, q in ((i, blk.q1), (j, blk.q2)):
                out[f"conv{n}.weight"] = q.weight
                out.update(_bn_arrays(f"conv{n}", q.bn))
        else:
            for n, c, bn in ((i, blk.conv1, blk.bn1), (j, blk.conv2, blk.bn2)):
                out[f"conv{n}.weight"] = c.weight
                out.update(_bn_arrays(f"conv{n}", bn))
        if blk.kind == "conv1x1":
            out[f"shortcut{b}.conv.weight"] = blk.sc_conv.weight
            out.update(_bn_arrays(f"shortcut{b}", blk.sc_bn))
    for k, e in enumerate(model.exits):
        out[f"exit{k}.weight"], out[f"exit{k}.bias"] = e.weight, e.bias
    out["head.weight"], out["head.bias"] = model.head.weight, model.head.bias
    assert set(out) == set(expected_arrays(spec)), "model and format disagree on the array list"
    return out


def export_arrays(model: HybridResNet) -> Dict[str, np.ndarray]:
    return {k: v.detach().cpu().to(torch.float32).contiguous().numpy().copy()
            for k, v in named_tensors(model).items()}


def export(model: HybridResNet, path: str, thresholds: Sequence[float],
           provenance: Optional[dict]) -> ModelSpec:
    """Write the model with the given exit thresholds through xnorcdl.format.save_weights."""
    import dataclasses
    spec = dataclasses.replace(model.spec, provenance=provenance).with_thresholds(list(thresholds))
    save_weights(path, spec, export_arrays(model))
    return spec


def model_from_file(path: str) -> HybridResNet:
    """A model holding exactly the arrays of a weights file (for evaluation and tests)."""
    spec, arrays = load_weights(path)
    model = HybridResNet(spec)
    with torch.no_grad():
        for k, t in named_tensors(model).items():
            t.copy_(torch.from_numpy(arrays[k]))
    return model


def init_from(model: HybridResNet, path: str, log=print) -> None:
    """Copy arrays from ``path`` where the layer has the same role (see the module docstring)."""
    src_spec, arrays = load_weights(path)
    dst = named_tensors(model)
    spec = model.spec
    copied, fresh = [], []
    with torch.no_grad():
        for name, t in dst.items():
            same_role = name in arrays and tuple(arrays[name].shape) == tuple(t.shape)
            if name.startswith("conv") and ".bn." in name:
                i = int(name[4:name.index(".")])
                same_role = same_role and src_spec.is_edge_conv(i) == spec.is_edge_conv(i)
            if name.startswith("exit"):
                k = int(name[4:name.index(".")])
                same_role = (same_role and k < len(src_spec.exits)
                             and src_spec.exits[k].after_conv == spec.exits[k].after_conv)
            if same_role:
                t.copy_(torch.from_numpy(arrays[name]))
                copied.append(name)
            else:
                fresh.append(name)
    for m in model.modules():  # identity init of edge BNs without a counterpart
        if isinstance(m, QuanConv):
            prefix = [n for n, t in dst.items() if t is m.bn.weight][0][:-len(".gamma")]
            if prefix + ".gamma" in fresh:
                with torch.no_grad():
                    m.bn.weight.fill_(1.0); m.bn.bias.zero_()
                    m.bn.running_mean.zero_(); m.bn.running_var.fill_(1.0)
    log(f"init from {path}: {len(copied)} arrays copied, {len(fresh)} initialised here "
        f"({', '.join(sorted(set(n.split('.')[0] + ('.bn' if '.bn.' in n else '') for n in fresh)))})")


# ============================================================================ data

class Data:
    """CIFAR-10 train split as uint8 tensors: train = first 50000 - val_size, val = the rest."""

    def __init__(self, val_size: int, limit_train: Optional[int], limit_val: Optional[int],
                 synthetic: bool = False, seed: int = 0):
        if synthetic:
            g = np.random.default_rng(seed)
            n = (limit_train or 256) + (limit_val or 128)
            x = g.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
            y = g.integers(0, 10, n).astype(np.int64)
            val_size = limit_val or 128
            self.source = "synthetic random images (smoke test)"
        else:
            from xnorcdl.data import load_cifar10
            x, y = load_cifar10("train")
            self.source = (f"CIFAR-10 train split: images 0..{len(x) - val_size - 1} train, "
                           f"{len(x) - val_size}..{len(x) - 1} validation (never trained on)")
        n_tr = len(x) - val_size
        self.x_train = torch.from_numpy(np.ascontiguousarray(x[:n_tr]))
        self.y_train = torch.from_numpy(np.ascontiguousarray(y[:n_tr]))
        self.x_val = torch.from_numpy(np.ascontiguousarray(x[n_tr:]))
        self.y_val = torch.from_numpy(np.ascontiguousarray(y[n_tr:]))
        if limit_train:
            self.x_train, self.y_train = self.x_train[:limit_train], self.y_train[:limit_train]
        if limit_val:
            self.x_val, self.y_val = self.x_val[:limit_val], self.y_val[:limit_val]
        self.padded = F.pad(self.x_train, (4, 4, 4, 4))  # zero pixels, uint8

    def to(self, device) -> "Data":
        """Keep the (padded) training images and labels on ``device``: augmentation then runs
        there as one gather per batch."""
        self.padded = self.padded.to(device)
        self.y_train = self.y_train.to(device)
        return self

    def batches(self, batch: int, gen: torch.Generator):
        """Shuffled, augmented batches: a random 32x32 crop of the 4-padded image, flipped
        horizontally with probability 1/2, gathered for the whole batch at once.

        The random draws (permutation, x and y offsets, flips) come from ``gen`` on the CPU in
        a fixed order, so a seed gives the same batches on every device. Output pixel (c, i, j)
        is ``padded[c, oy + i, ox + j]``, or ``padded[c, oy + i, ox + 31 - j]`` when flipped.
        """
        n = len(self.x_train)
        dev = self.padded.device
        ar = torch.arange(32, device=dev)
        ch = torch.arange(3, device=dev)[None, :, None, None]
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - batch + 1 if n >= batch else 1, batch):
            idx = perm[s:s + batch]
            ox = torch.randint(0, 9, (len(idx),), generator=gen)
            oy = torch.randint(0, 9, (len(idx),), generator=gen)
            flip = torch.rand(len(idx), generator=gen) < 0.5
            idx, ox, oy, flip = (t.to(dev, non_blocking=True) for t in (idx, ox, oy, flip))
            rows = (oy[:, None] + ar)[:, None, :, None]
            cols = torch.where(flip[:, None], ox[:, None] + 31 - ar, ox[:, None] + ar)
            imgs = self.padded[idx[:, None, None, None], ch, rows, cols[:, None, None, :]]
            yield imgs, self.y_train[idx]

    def steps_per_epoch(self, batch: int) -> int:
        n = len(self.x_train)
        return max(1, n // batch)


# ============================================================================ evaluation

def entropy(logits: torch.Tensor) -> np.ndarray:
    """Softmax entropy in nats, float64, as xnorcdl.engine.entropy."""
    z = logits.double()
    z = z - z.max(dim=1, keepdim=True).values
    e = z.exp()
    s = e.sum(1)
    p = e / s[:, None]
    return torch.clamp(s.log() - (p * z).sum(1), min=0.0).numpy()


@torch.no_grad()
def predict(model: HybridResNet, x: torch.Tensor, batch: int = 500, device="cpu"):
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


# ============================================================================ training

def distill_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: Optional[torch.Tensor],
                 alpha: float, temp: float) -> torch.Tensor:
    """Loss of one output (an early exit or the head).

    Without a teacher: eq. (4), the cross-entropy L = CE(y_hat, y). With a teacher's logits t
    (``--teacher``, knowledge distillation, Hinton et al. 2015):
    L = (1 - alpha) * CE(y_hat, y) + alpha * T^2 * KL(softmax(t / T) || softmax(y_hat / T)),
    Hinton's T^2 keeps the soft term's gradient T * (q_student - q_teacher) on the scale of the
    hard term's when logit gaps are small against T; with large gaps it is up to T times
    larger, which is why distilling a binary hybrid needs ``--clip-grad``.
    Every output (exits and head) learns from the same teacher logits; eq. (5) then weighs
    the outputs' losses as before.
    """
    ce = F.cross_entropy(logits, labels)
    if teacher is None or alpha == 0.0:
        return ce
    soft = F.kl_div(F.log_softmax(logits / temp, dim=1), F.log_softmax(teacher / temp, dim=1),
                    reduction="batchmean", log_target=True)
    return (1.0 - alpha) * ce + alpha * temp * temp * soft


def load_teacher(path: str, n_classes: int, device) -> HybridResNet:
    """The model of a weights file, frozen, in inference mode (BN uses running statistics)."""
    teacher = model_from_file(path)
    if teacher.spec.num_classes != n_classes:
        raise SystemExit(f"error: --teacher {path}: {teacher.spec.num_classes} classes, "
                         f"the student has {n_classes}")
    teacher.eval()
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    return teacher.to(device)


def param_groups(model: HybridResNet, wd: float, wd_latent: float):
    decay, latent, none = [], [], []
    for m in model.modules():
        if isinstance(m, QuanConv):
            latent.append(m.weight)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            decay.append(m.weight)
    seen = {id(p) for p in decay + latent}
    none = [p for p in model.parameters() if id(p) not in seen]
    return [{"params": decay, "weight_decay": wd}, {"params": latent, "weight_decay": wd_latent},
            {"params": none, "weight_decay": 0.0}]


def make_sched(opt, kind: str, lr: float, total: int, warmup_frac: float):
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=total, pct_start=warmup_frac, div_factor=10.0,
            final_div_factor=100.0, anneal_strategy="cos")
    warm = max(1, int(total * warmup_frac))
    f = lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def lr_at(kind: str, lr: float, p: float, warmup_frac: float) -> float:
    """Learning rate at progress p in [0, 1] (fraction of the budget spent), the shapes of
    :func:`make_sched`: ``onecycle`` rises from lr/10 to lr over ``warmup_frac`` along a half
    cosine, then falls to lr/1000 along a half cosine; ``cosine`` rises linearly, then falls to 0."""
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


def graph_model(model: HybridResNet, batch: int, log=print) -> HybridResNet:
    """Capture the training forward and backward of ``model`` (train mode, a batch of ``batch``
    images, all outputs) as CUDA graphs (torch.cuda.make_graphed_callables): one replay
    instead of some hundreds of kernel launches each way, which is what bounds a ResNet-32 step
    on a large GPU. Same kernels, same math; eval mode keeps the ordinary forward. The capture's
    warm-up passes (on zero images) must not leave traces in the BN running statistics, so
    those are restored afterwards."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    sample = torch.zeros(batch, 3, 32, 32, dtype=torch.uint8, device="cuda")
    t0 = time.time()
    graphed = torch.cuda.make_graphed_callables(model, (sample,))
    with torch.no_grad():
        for k, v in graphed.state_dict().items():
            v.copy_(saved[k])
    log(f"CUDA graphs captured for batch {batch} in {time.time() - t0:.1f}s")
    return graphed


class Logger:
    def __init__(self, path: Optional[str]):
        self.f = open(path, "a", buffering=1) if path else None

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}Z] {msg}"
        print(line, flush=True)
        if self.f:
            self.f.write(line + "\n")


def atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}"
            + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def init_record(path: Optional[str]) -> dict:
    """What a run started from: the --init file's path, sha256 and its own provenance, so a
    file fine-tuned from another carries the whole chain."""
    if not path:
        return {"init": None}
    spec, _ = load_weights(path)
    return {"init": path, "init_sha256": sha256_of(path), "init_provenance": spec.provenance}


def teacher_record(cfg: dict) -> dict:
    """The distillation teacher (--teacher): path, sha256, alpha, T and its own provenance."""
    if not cfg["teacher"]:
        return {"teacher": None}
    spec, _ = load_weights(cfg["teacher"])
    return {"teacher": {"path": cfg["teacher"], "sha256": sha256_of(cfg["teacher"]),
                        "kd_weight": cfg["kd_weight"], "kd_temp": cfg["kd_temp"],
                        "provenance": spec.provenance}}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = ap.add_argument
    a("--depth", type=int, default=32, help="6n+2")
    a("--edge-convs", type=int, default=0, help="M, quantized block convs at the edge (even)")
    a("--edge-bits", type=int, default=1, choices=(1, 2, 4))
    a("--exits", default="", help="comma-separated after_conv of the early exits, e.g. 20")
    a("--exit-weights", default="", help="lambda_k of eq. (5) per early exit; the head gets 1 - sum")
    a("--shortcut", default="zero_pad", choices=("zero_pad", "conv1x1"))
    a("--strategy", default="joint", choices=("joint", "separate"))
    a("--epochs", type=int, default=0, help="epochs (phase 1 of separate); or use --time-budget")
    a("--time-budget", type=float, default=0.0,
      help="seconds of training instead of --epochs: the learning rate follows the wall clock "
           "(separate: --exit-budget-frac of it trains the exits)")
    a("--exit-budget-frac", type=float, default=0.2, help="separate with --time-budget")
    a("--exit-epochs", type=int, default=0, help="separate: epochs for the exits (0: max(1, epochs // 4))")
    a("--batch", type=int, default=128)
    a("--lr", type=float, default=0.1, help="peak learning rate")
    a("--sched", default="onecycle", choices=("onecycle", "cosine"))
    a("--warmup", type=float, default=0.15, help="fraction of steps warming up")
    a("--wd", type=float, default=5e-4, help="weight decay on float conv and linear weights")
    a("--wd-latent", type=float, default=0.0, help="weight decay on latent quantized weights")
    a("--clip-grad", type=float, default=0.0, help="clip the global gradient norm to N (0: off)")
    a("--seed", type=int, default=0)
    a("--init", default=None, help="weights file to start from")
    a("--teacher", default=None,
      help="weights file whose head logits every output also learns from (distillation)")
    a("--kd-weight", type=float, default=0.9, help="alpha: weight of the teacher term (--teacher)")
    a("--kd-temp", type=float, default=4.0, help="T: softmax temperature of the teacher term")
    a("--out", required=True, help="weights file to write")
    a("--ckpt-dir", default=None, help="checkpoints and log (default: cache runs/<out name>)")
    a("--val-size", type=int, default=VAL_SIZE, help="last images of the train split held out")
    a("--threshold-rule", default="within:0.5",
      help="within:D (points), exits:P (%% leaving) or fixed:T (nats); xnorcdl.calibrate")
    a("--limit-train", type=int, default=None, help="use only the first N train images (smoke)")
    a("--limit-val", type=int, default=None, help="use only the first N validation images (smoke)")
    a("--max-steps", type=int, default=None, help="stop each epoch after N steps (smoke)")
    a("--synthetic", action="store_true", help="random images instead of CIFAR-10 (tests)")
    a("--threads", type=int, default=2)
    a("--channels-last", type=int, default=0, choices=(0, 1))
    a("--cuda-graphs", type=int, default=0, choices=(0, 1),
      help="replay the training forward/backward as CUDA graphs (cuda only)")
    a("--compile", type=int, default=0, choices=(0, 1),
      help="run the training forward/backward and the teacher through torch.compile")
    a("--device", default="cpu", choices=("cpu", "cuda"))
    a("--log-every", type=int, default=50)
    a("--eval-every", type=int, default=1, help="validate every N epochs (and after the last)")
    return ap


def resolve(args) -> dict:
    exits = [int(s) for s in args.exits.split(",") if s.strip()]
    weights = [float(s) for s in args.exit_weights.split(",") if s.strip()]
    if len(weights) == 1 and len(exits) > 1:
        weights = weights * len(exits)
    if len(weights) != len(exits):
        raise SystemExit(f"error: {len(weights)} exit weight(s) for {len(exits)} exit(s)")
    try:
        xcal.parse_rule(args.threshold_rule)
    except ValueError as exc:
        raise SystemExit(f"error: --threshold-rule: {exc}")
    if sum(weights) >= 1.0:
        raise SystemExit("error: the early-exit weights must sum to < 1 (the head gets the rest)")
    spec = ModelSpec(depth=args.depth, edge_convs=args.edge_convs, edge_bits=args.edge_bits,
                     shortcut=args.shortcut,
                     exits=tuple(ExitSpec(a, 0.0) for a in exits))
    try:
        spec.validate()
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    ckpt = args.ckpt_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "xnorcdl", "runs", os.path.splitext(os.path.basename(args.out))[0])
    if (args.epochs > 0) == (args.time_budget > 0):
        raise SystemExit("error: give exactly one of --epochs N (> 0) and --time-budget SECONDS")
    if args.teacher is not None and not (0.0 <= args.kd_weight <= 1.0 and args.kd_temp > 0):
        raise SystemExit("error: --kd-weight must lie in [0, 1] and --kd-temp be > 0")
    if args.compile and args.cuda_graphs:
        raise SystemExit("error: --compile 1 and --cuda-graphs 1 are alternatives; give one")
    if not 0.0 < args.exit_budget_frac < 1.0:
        raise SystemExit("error: --exit-budget-frac must lie strictly between 0 and 1")
    cfg = dict(vars(args))
    if args.teacher is None:  # nothing to weigh: keeps old checkpoints resumable
        cfg.update(kd_weight=None, kd_temp=None)
    cfg.update(exits=exits, exit_weights=weights, head_weight=1.0 - sum(weights), ckpt_dir=ckpt,
               exit_epochs=(args.exit_epochs or max(1, args.epochs // 4) if args.epochs else 0)
               if args.strategy == "separate" and exits else 0)
    return cfg


def train_epoch(model, data, opt, sched, cfg, gen, weights, log, epoch, total_epochs,
                frozen=False, teacher=None, fwd=None):
    """One pass over the shuffled training images (fewer steps with --max-steps, or when a
    --time-budget runs out). Running loss and accuracy stay on the device between log lines, so
    a GPU is never made to wait for the host. ``fwd`` (default ``model``) is the callable that
    runs the training forward, e.g. ``torch.compile(model)``; ``teacher`` may be compiled too.
    Returns (mean loss, seconds, steps done)."""
    fwd = model if fwd is None else fwd
    model.train()
    if frozen:  # separate optimisation, phase 2: BN in inference mode, convs frozen
        model.eval()
    steps = data.steps_per_epoch(cfg["batch"])
    if cfg["max_steps"]:
        steps = min(steps, cfg["max_steps"])
    timed = isinstance(sched, TimeSched)
    t0 = time.time()
    dev = cfg["device"]
    tot_loss = torch.zeros((), dtype=torch.float64, device=dev)
    tot_correct = torch.zeros(len(weights), dtype=torch.int64, device=dev)
    seen = done = 0
    of = "?" if timed else str(total_epochs)
    trained = [q for g in opt.param_groups for q in g["params"] if q.requires_grad]
    for step, (xb, yb) in enumerate(data.batches(cfg["batch"], gen)):
        if step >= steps or (timed and sched.done()):
            break
        xb, yb = xb.to(dev), yb.to(dev)
        if frozen:
            with torch.no_grad():
                x = model.normalize(xb)
                if CHANNELS_LAST[0]:
                    x = x.contiguous(memory_format=torch.channels_last)
                feats = model.features(x, max(model.exit_after))
            logits = [model.exit_logits(k, feats[k]) for k in range(len(model.exits))]
        else:
            logits = fwd(xb) if weights[-1] > 0 else fwd(xb, with_head=False)
        soft = None
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(xb)[-1]
        losses = [distill_loss(l, yb, soft, cfg["kd_weight"], cfg["kd_temp"]) for l in logits]
        loss = sum(w * l for w, l in zip(weights, losses) if w > 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["clip_grad"]:  # global norm, computed on the device (no host sync)
            torch.nn.utils.clip_grad_norm_(trained, cfg["clip_grad"], foreach=True)
        opt.step()
        sched.step()
        done += 1
        with torch.no_grad():
            tot_loss += loss.detach().double() * len(yb)
            for k, l in enumerate(logits):
                tot_correct[k] += (l.argmax(1) == yb).sum()
        seen += len(yb)
        if (step + 1) % cfg["log_every"] == 0 or step + 1 == steps:
            el = time.time() - t0
            acc = (tot_correct.double() / seen * 100).tolist()
            log(f"epoch {epoch + 1}/{of} step {step + 1}/{steps} loss {float(tot_loss) / seen:.4f} "
                f"train acc {' '.join(f'{a:.1f}' for a in acc)} "
                f"lr {sched.get_last_lr()[0]:.4f} {el / (step + 1):.3f}s/step "
                f"epoch eta {el / (step + 1) * (steps - step - 1):.0f}s")
    return float(tot_loss) / max(1, seen), time.time() - t0, done


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(args)
    torch.set_num_threads(cfg["threads"])
    CHANNELS_LAST[0] = bool(cfg["channels_last"])
    os.makedirs(cfg["ckpt_dir"], exist_ok=True)
    log = Logger(os.path.join(cfg["ckpt_dir"], "train.log"))
    command = "python weights/recipe/train.py " + " ".join(shlex.quote(a) for a in
                                                           (sys.argv[1:] if argv is None else argv))
    log(f"command: {command}")
    log("configuration: " + json.dumps(cfg, sort_keys=True))
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])

    spec = ModelSpec(depth=cfg["depth"], edge_convs=cfg["edge_convs"], edge_bits=cfg["edge_bits"],
                     shortcut=cfg["shortcut"], exits=tuple(ExitSpec(a, 0.0) for a in cfg["exits"]))
    model = HybridResNet(spec)
    if cfg["init"]:
        init_from(model, cfg["init"], log)
    dev = cfg["device"]
    if dev == "cuda":
        # TF32 rounds conv inputs to 10 mantissa bits and accumulates in float32: the +-1 (and
        # 2/4-bit) codes of quantized convs are exact in TF32, float convs see rounding noise.
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
    model.to(dev)
    if CHANNELS_LAST[0]:
        model.to(memory_format=torch.channels_last)
    data = Data(cfg["val_size"], cfg["limit_train"], cfg["limit_val"], cfg["synthetic"], cfg["seed"])
    data.to(dev)
    teacher = None
    if cfg["teacher"]:
        teacher = load_teacher(cfg["teacher"], spec.num_classes, dev)
        log(f"teacher: {cfg['teacher']} (alpha {cfg['kd_weight']}, T {cfg['kd_temp']})")
    fwd = model  # the training forward; validation and export use ``model`` itself
    if cfg["compile"]:  # same parameters and buffers, compiled on the first call
        fwd = torch.compile(model)
        teacher = None if teacher is None else torch.compile(teacher)
    log(f"data: {data.source}; {len(data.x_train)} train, {len(data.x_val)} validation images")

    n_early = len(cfg["exits"])
    joint_w = cfg["exit_weights"] + [cfg["head_weight"]]
    phases = []  # (name, epochs, loss weights, frozen, seconds of --time-budget)
    budget, timed = cfg["time_budget"], cfg["time_budget"] > 0
    many = 10 ** 9  # with --time-budget the clock, not an epoch count, ends a phase
    if cfg["strategy"] == "joint" or not n_early:
        phases.append(("joint" if n_early else "plain", many if timed else cfg["epochs"], joint_w,
                       False, budget))
    else:
        frac = cfg["exit_budget_frac"]
        phases.append(("hybrid", many if timed else cfg["epochs"], [0.0] * n_early + [1.0],
                       False, budget * (1 - frac)))
        phases.append(("exits", many if timed else cfg["exit_epochs"], [1.0] * n_early + [0.0],
                       True, budget * frac))

    steps = data.steps_per_epoch(cfg["batch"])
    if cfg["max_steps"]:
        steps = min(steps, cfg["max_steps"])
    ck_path = os.path.join(cfg["ckpt_dir"], "last.pt")
    state = {"phase": 0, "epoch": 0, "wall": 0.0, "history": []}
    resume = None
    if os.path.exists(ck_path):
        resume = torch.load(ck_path, map_location="cpu", weights_only=False)
        keys = ("depth", "edge_convs", "edge_bits", "exits", "exit_weights", "strategy",
                "batch", "lr", "sched", "seed", "init", "limit_train", "val_size", "shortcut",
                "time_budget", "teacher", "kd_weight", "kd_temp", "clip_grad")
        old = {"clip_grad": 0.0, **resume["cfg"]}  # checkpoints older than --clip-grad
        diff = {k: (old.get(k), cfg[k]) for k in keys if old.get(k) != cfg[k]}
        if diff:
            raise SystemExit(f"error: {ck_path} was made with another configuration {diff}; "
                             "use another --ckpt-dir or delete it")
        model.load_state_dict(resume["model"])
        state = resume["state"]
        if resume["cfg"]["epochs"] != cfg["epochs"]:
            if state["phase"] > 0 or state["epoch"] > cfg["epochs"]:
                raise SystemExit(f"error: {ck_path}: cannot change --epochs to {cfg['epochs']} "
                                 f"after epoch {state['epoch']} of phase {state['phase']}")
            # Re-plan the learning-rate schedule for the new length, continuing from the
            # completed steps (recorded in the provenance).
            state.setdefault("schedule_changes", []).append(
                {"after_epoch": state["epoch"], "from_epochs": resume["cfg"]["epochs"],
                 "to_epochs": cfg["epochs"]})
            resume.pop("sched", None)
            log(f"--epochs changed from {resume['cfg']['epochs']} to {cfg['epochs']} after epoch "
                f"{state['epoch']}: the schedule continues from step {state['epoch'] * steps} "
                f"of {cfg['epochs'] * steps}")
        log(f"resuming from {ck_path}: phase {state['phase']} epoch {state['epoch']}, "
            f"{state['wall']:.0f}s already spent")

    for p, (pname, epochs, weights, frozen, seconds) in enumerate(phases):
        if p < state["phase"]:
            continue
        for prm in model.parameters():
            prm.requires_grad_(not frozen)
        if frozen:
            for e in model.exits:
                for prm in e.parameters():
                    prm.requires_grad_(True)
            groups = [{"params": [e.weight for e in model.exits], "weight_decay": cfg["wd"]},
                      {"params": [e.bias for e in model.exits], "weight_decay": 0.0}]
        else:
            groups = param_groups(model, cfg["wd"], cfg["wd_latent"])
        opt = torch.optim.SGD(groups, lr=cfg["lr"], momentum=0.9, nesterov=True)
        if timed:
            sched = TimeSched(opt, cfg["sched"], cfg["lr"], seconds, cfg["warmup"])
        else:
            sched = make_sched(opt, cfg["sched"], cfg["lr"], epochs * steps, cfg["warmup"])
        gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + p)
        if resume is not None and state["phase"] == p and "opt" in resume:
            opt.load_state_dict(resume["opt"])
            if "sched" in resume:
                sched.load_state_dict(resume["sched"])
            else:
                for _ in range(state["epoch"] * steps):
                    sched.step()
            gen.set_state(resume["gen"])
        # Graphs need every output in the loss (an unused output would feed the captured
        # backward a stale gradient): joint training, or phase 1 of separate without exits.
        used = [w > 0 for w in weights]
        if cfg["cuda_graphs"] and dev == "cuda" and not frozen and all(used) \
                and len(data.x_train) >= cfg["batch"]:
            # The teacher stays an ordinary module: a hand-captured graph of its inference
            # forward replayed wrong logits (then NaN) on an H200 while the ordinary call was
            # exact; ungraphed it adds ~10 % to a graphed step.
            model = graph_model(model, cfg["batch"], log)
        log(f"phase {pname}: " + (f"{seconds:.0f} s budget" if timed else f"{epochs} epochs")
            + f" x {steps} steps, loss weights {weights}")
        for epoch in range(state["epoch"] if state["phase"] == p else 0, epochs):
            loss, secs, nsteps = train_epoch(model, data, opt, sched, cfg, gen, weights, log,
                                             epoch, epochs, frozen, teacher, fwd)
            if nsteps == 0:  # the budget ran out exactly at an epoch boundary
                break
            last = epoch + 1 == epochs or (timed and sched.done())
            t1 = time.time()
            entry = {"phase": pname, "epoch": epoch + 1, "steps": nsteps, "loss": round(loss, 5),
                     "seconds": round(secs, 1)}
            msg = ""
            if last or (epoch + 1) % max(1, cfg["eval_every"]) == 0:
                val = predict(model, data.x_val, device=dev)
                yv = data.y_val.numpy()
                accs = [float((l.argmax(1).numpy() == yv).mean()) for l in val]
                entry["val_acc"] = [round(a * 100, 2) for a in accs]
                msg = f", val acc per exit/head {' '.join(f'{a * 100:.2f}' for a in accs)}"
            state["wall"] += secs + (time.time() - t1)
            state["epoch"] = epoch + 1
            state["phase"] = p
            state["history"].append(entry)
            log(f"phase {pname} epoch {epoch + 1}/{'?' if timed else epochs} done in {secs:.1f}s: "
                f"loss {loss:.4f}{msg}; total {state['wall']:.0f}s")
            atomic_save({"cfg": cfg, "model": model.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "gen": gen.get_state(), "state": state},
                        ck_path)
            if last:
                break
        state.setdefault("phase_epochs", {})[pname] = state["epoch"]
        state["phase"], state["epoch"] = p + 1, 0
        resume = None
        atomic_save({"cfg": cfg, "model": model.state_dict(), "state": state}, ck_path)

    # ---- thresholds on validation, export
    val = predict(model, data.x_val, device=dev)
    yv = data.y_val.numpy()
    no_exit = float((val[-1].argmax(1).numpy() == yv).mean())
    figures = {"val_images": len(yv), "val_no_exit_acc": round(no_exit * 100, 2)}
    thresholds: List[float] = []
    if n_early:
        thresholds = calibrate_fast(val, yv, cfg["threshold_rule"])
        acc, fr = conditional(val, yv, thresholds)
        acc05, fr05 = conditional(val, yv, [0.5] * n_early)
        figures.update({
            "val_exit_acc": [round(float((l.argmax(1).numpy() == yv).mean()) * 100, 2)
                             for l in val[:-1]],
            "threshold_rule": cfg["threshold_rule"], "thresholds": thresholds,
            "val_acc": round(acc * 100, 2), "val_exit_fraction": [round(f * 100, 2) for f in fr],
            "val_acc_at_0.5": round(acc05 * 100, 2),
            "val_exit_fraction_at_0.5": [round(f * 100, 2) for f in fr05]})
    log("validation: " + json.dumps(figures))
    done = list(state.get("phase_epochs", {}).values()) or [cfg["epochs"], cfg["exit_epochs"]]
    prov = {"command": command, "strategy": cfg["strategy"], "epochs": done[0],
            "exit_epochs": done[1] if len(done) > 1 else cfg["exit_epochs"],
            "time_budget_s": cfg["time_budget"] or None,
            "steps": sum(h.get("steps", 0) for h in state["history"]),
            "batch": cfg["batch"], "lr": cfg["lr"], "exit_weights": cfg["exit_weights"],
            "clip_grad": cfg["clip_grad"] or None,
            "seed": cfg["seed"], **init_record(cfg["init"]), **teacher_record(cfg),
            "data": data.source,
            "wall_time_s": round(state["wall"], 1), "machine": machine(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "validation": figures, "history": state["history"],
            "schedule_changes": state.get("schedule_changes", [])}
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out"])), exist_ok=True)
    export(model, cfg["out"], thresholds, prov)
    log(f"wrote {cfg['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
