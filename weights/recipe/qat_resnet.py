"""The training-side mirror of the xnorcdl network (docs/FORMAT.md), with export and import.

:class:`HybridResNet` computes what the engine computes, operation by operation: stem, edge
blocks of :class:`QuanConv` without ReLU (BN before quantization), float cloud blocks, shortcuts,
exits with 3x3/3 average pooling, head. Quantized layers train XNOR-Net style on real-valued
latent weights: the forward uses the codes of eq. (1)/(3) and alpha of eq. (2) computed from the
latent weights (gradient through alpha included); the backward is a straight-through estimator,
clipped identity for activations (zero gradient where |y| > v0) and for weights.

:func:`export` writes the documented ``.npz`` through :func:`xnorcdl.format.save_weights`;
:func:`model_from_file` reads one back exactly. :func:`init_from` copies arrays by name where
the layer has the same role in both files. An edge conv's BN sits before the conv (on its input
channels) and has no counterpart in a full-precision file (whose BN follows the conv); it starts
as the identity (gamma 1, beta 0, running mean 0, running var 1), so the first batches quantize
the block input itself, and batch statistics take over from the first step. The latent weights
start from the full-precision conv weights. Exits missing from the source start at random.
Two options change that start (``train.py --fit-ranges``, ``--init-edge``): the latent weights
and input BNs of 2/4-bit edge convs scaled into their quantizer's working range
(:func:`fit_quantizer_ranges`), and the stem and edge convs taken from a trained hybrid.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from xnorcdl.format import load_weights, save_weights
from xnorcdl.spec import ModelSpec, expected_arrays

#: channels-last activations in the forward (``--channels-last``); a list so it can be set
#: after import.
CHANNELS_LAST = [False]


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

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """:meth:`normalize`, channels-last when ``CHANNELS_LAST`` is set."""
        x = self.normalize(pixels)
        return x.contiguous(memory_format=torch.channels_last) if CHANNELS_LAST[0] else x

    def features(self, x: torch.Tensor, upto: Optional[int] = None) -> List[torch.Tensor]:
        """Outputs of the blocks the exits read, in block order, then the last one computed
        (block ``upto``, default the last block)."""
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
        x = self.prepare(pixels)
        upto = None if with_head or not self.exit_after else max(self.exit_after)
        feats = self.features(x, upto)
        logits = [self.exit_logits(k, feats[k]) for k in range(len(self.exits))]
        if with_head:
            logits.append(self.head_logits(feats[-1]))
        return logits


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


def init_from(model: HybridResNet, path: str, log=print, fit_ranges: bool = False,
              edge_path: Optional[str] = None) -> None:
    """Copy arrays from ``path`` where the layer has the same role (see the module docstring).

    ``edge_path``: then the stem, the edge convs (weights and BNs) that are edge convs in
    both networks, and the exits at the same place come from that file instead (a trained
    hybrid whose edge already learned the edge block's structure). ``fit_ranges``: then
    :func:`fit_quantizer_ranges` on the 2/4-bit edge convs whose weights did not come from an
    edge of the same bit depth."""
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
    origin = {i: src_spec for i in range(1, spec.num_convs + 1)}
    if edge_path:
        origin.update(_copy_edge(model, edge_path, log))
    if fit_ranges and spec.edge_bits > 1:
        fitted = [i for i in range(1, spec.num_convs + 1)
                  if spec.is_edge_conv(i) and not (origin[i].is_edge_conv(i)
                                                   and origin[i].edge_bits == spec.edge_bits)]
        c_a = fit_quantizer_ranges(model, fitted)
        log(f"quantizer ranges fitted for {spec.edge_bits}-bit codes: latent weights of "
            f"{len(fitted)} edge convs rescaled, their input BN scaled to |gamma| {c_a:.4f}")


def _copy_edge(model: HybridResNet, path: str, log) -> Dict[int, ModelSpec]:
    """The edge part of ``path`` into ``model`` (:func:`init_from`'s ``edge_path``); returns
    the convs copied, each mapped to the spec of ``path``."""
    src_spec, arrays = load_weights(path)
    spec = model.spec
    if src_spec.shortcut != spec.shortcut or src_spec.depth != spec.depth:
        raise ValueError(f"{path}: the edge must come from a ResNet-{spec.depth} with "
                         f"{spec.shortcut} shortcuts")
    both = min(spec.edge_convs, src_spec.edge_convs)
    names = [n for n in named_tensors(model) if n.startswith("stem.")]
    names += [n for n in named_tensors(model)
              if n.startswith("conv") and int(n[4:n.index(".")]) <= both]
    places = {e.after_conv: k for k, e in enumerate(src_spec.exits)}
    exits = {k: places[e.after_conv] for k, e in enumerate(spec.exits) if e.after_conv in places}
    dst = named_tensors(model)
    with torch.no_grad():
        for n in names:
            dst[n].copy_(torch.from_numpy(arrays[n]))
        for k, j in exits.items():
            for part in ("weight", "bias"):
                dst[f"exit{k}.{part}"].copy_(torch.from_numpy(arrays[f"exit{j}.{part}"]))
    log(f"edge from {path}: stem, convs 1..{both}"
        + (f", exits {sorted(exits)}" if exits else "") + f" ({src_spec.edge_bits}-bit there)")
    return {i: src_spec for i in range(1, both + 1)}


def _code_error(y: torch.Tensor, c: float, bits: int, v0: float) -> float:
    """Relative squared error of the codes of ``c * y`` as an approximation of ``y`` up to the
    best scale: min_s ||s u - y||^2 / ||y||^2 with u = codes(c y)."""
    u = quant_codes(y * c, bits, v0)
    s = (u * y).sum() / (u * u).sum().clamp_min(1e-30)
    return float(((s * u - y) ** 2).sum() / (y * y).sum().clamp_min(1e-30))


def fit_scale(y: torch.Tensor, bits: int, v0: float, lo: float, hi: float, n: int = 160) -> float:
    """The factor c in a geometric grid [lo, hi] minimising :func:`_code_error` of ``c * y``."""
    grid = np.geomspace(lo, hi, n)
    return float(min(grid, key=lambda c: _code_error(y, float(c), bits, v0)))


def fit_quantizer_ranges(model: HybridResNet, convs: Sequence[int]) -> float:
    """Put the p-bit quantizers (p > 1) of the given edge convs in their working range.

    Full-precision conv weights (|W| ~ 0.05) are far inside [-v0, v0]: eq. (3) maps nearly all
    of them to the two codes next to zero, so a 2/4-bit edge starts as a binary-weight one, and
    its residual branch, scaled by alpha v0^2 / Z^2 (eq. 2), starts Z/(v0 alpha)-fold too weak
    against the shortcut. Each conv's latent weights are multiplied by the c minimising the
    relative error of their codes (:func:`fit_scale`, one c per layer, so the filters keep
    their relative norms), and the BN before the quantizer is scaled per channel to |gamma| =
    c_a, the factor that does the same for a unit normal input (a fresh BN: gamma c_a, beta 0;
    one from a binary edge keeps the zero crossing -beta/gamma its sign learned). Returns c_a.
    """
    spec = model.spec
    bits, v0 = spec.edge_bits, float(spec.v0)
    gen = torch.Generator().manual_seed(0)
    c_a = fit_scale(torch.randn(1 << 18, generator=gen), bits, v0, 0.05, 4.0)
    qconvs = [m for b in model.blocks if b.edge for m in (b.q1, b.q2)]
    with torch.no_grad():
        for i in convs:
            m = qconvs[i - 1]
            w = m.weight
            w.mul_(fit_scale(w.detach().flatten(), bits, v0, 0.5, 500.0))
            g = m.bn.weight.abs().clamp_min(1e-6)
            m.bn.bias.mul_(c_a / g)
            m.bn.weight.mul_(c_a / g)
    return c_a
