"""The fast backend: :class:`FastExecutor`, the executor interface of :mod:`xnorcdl.backends`
run by the kernels of :mod:`xnorcdl.kernels`, each taken from its registry
(:mod:`xnorcdl.kernels.registry`).

Everything is prepared at construction (packed weight bit planes, padding corrections, folded
BN, GEMM matrices); a call only moves activations. The state between calls is the float32
``[N, C, H, W]`` array the reference also keeps, so ``select`` is a row selection and the head
reuses the reference's code.

Agreement with :class:`xnorcdl.backends.reference.ReferenceExecutor`:

* **Edge, bit for bit, on every machine.** The stem normalizes and sums its taps in the
  reference's fixed order (:mod:`~xnorcdl.kernels.ordered`, not BLAS) and then applies BN and
  ReLU in float32 in the same order; every quantized conv is exact by construction; residual
  additions, zero-pad shortcuts and edge 1x1 shortcut convs (unfolded and ordered, like the
  stem) are the same float32 operations; exits pool in the reference's order and sum their
  features in its fixed order. So edge outputs, exit logits, entropies and exit decisions are
  identical, whatever BLAS kernel the processor gets.
* **Cloud, within float32 rounding.** Cloud convs fold BN into the GEMM (one sgemm with a bias
  column), which rounds differently; see :class:`~xnorcdl.kernels.gemmconv.FloatGemmConv`.
"""
from __future__ import annotations

import numpy as np

from ..kernels.bitconv import BitConv
from ..kernels.registry import KERNELS, float_kernel_for, quant_kernel_for
from ..kernels.shapes import out_size
from ..model import Block, FloatConv, Model, QuantConv
from . import reference


def _float_conv(layer: FloatConv, exact: bool):
    return float_kernel_for(exact).build(layer.weight, layer.bn_scale, layer.bn_shift,
                                         layer.stride, layer.pad)


def _quant_conv(layer: QuantConv, in_shape):
    kernel = quant_kernel_for(layer.bits, in_shape, layer.stride)
    return kernel.build(layer.w_codes, layer.out_scale, layer.bn_scale, layer.bn_shift,
                        layer.bits, layer.v0, layer.stride)


class _PreparedBlock:
    """The convs of one residual block, ready to run."""

    def __init__(self, blk: Block):
        self.edge = blk.edge
        c_in, h, w = blk.in_shape
        if blk.edge:
            self.conv1 = _quant_conv(blk.conv1, blk.in_shape)
            side = out_size(h, 3, blk.conv1.stride, 1)
            self.conv2 = _quant_conv(blk.conv2, (blk.conv1.shape[0], side, side))
        else:
            self.conv1 = _float_conv(blk.conv1, exact=False)
            self.conv2 = _float_conv(blk.conv2, exact=False)
        sc = blk.shortcut
        self.shortcut_kind = sc.kind
        self.pad_channels = sc.pad_channels
        # an edge block's float shortcut conv runs unfolded, like the reference (bit-identical)
        self.shortcut_conv = _float_conv(sc.conv, exact=blk.edge) if sc.kind == "conv1x1" else None
        # two binary convs: the fused block kernel (one call, conv1's output never leaves bits)
        self.fused = None
        if blk.edge and isinstance(self.conv1, BitConv) and self.conv1.bits == 1:
            self.fused = KERNELS["binary_block_fused"].build(self.conv1, self.conv2, sc.kind,
                                                             sc.pad_channels)

    def add_shortcut(self, t: np.ndarray, x: np.ndarray) -> np.ndarray:
        """t += shortcut(x), in place (float32 additions, as the reference's ``t + shortcut``)."""
        if self.shortcut_kind == "identity":
            t += x
        elif self.shortcut_kind == "zero_pad":
            p = self.pad_channels
            t[:, p:p + x.shape[1]] += x[:, :, ::2, ::2]   # the zero channels add 0
        else:
            t += self.shortcut_conv(x)
        return t

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.fused is not None:
            sc = self.shortcut_conv(x) if self.shortcut_conv is not None else None
            return self.fused(x, sc)
        if self.edge:          # x + Q2(Q1(x)), no ReLU
            return self.add_shortcut(self.conv2(self.conv1(x)), x)
        t = self.conv2(self.conv1(x, relu=True))
        t = self.add_shortcut(t, x)
        return np.maximum(t, 0, out=t)


class FastExecutor:
    """Numba/BLAS backend with the interface of :class:`xnorcdl.backends.Executor`."""

    name = "fast"

    def __init__(self, model: Model):
        self.model = model
        self.normalize = KERNELS["normalize_padded"].build(model.mean, model.std)
        # a split's cloud half has no stem (xnorcdl.split)
        self.stem_conv = None if model.stem is None else _float_conv(model.stem, exact=True)
        self.blocks = [_PreparedBlock(blk) for blk in model.blocks]
        exit_kernel = KERNELS["pool_ordered_linear"]
        self.exits = [exit_kernel.build(e.weight, e.bias, e.pool) for e in model.exits]

    def stem(self, images: np.ndarray) -> np.ndarray:
        images = self.normalize.check(images)
        conv = self.stem_conv
        xp, cols = conv.padded_input(images.shape)
        self.normalize(images, conv.pad, xp)
        return conv.run_padded(xp, cols, images.shape, relu=True)

    def block(self, b: int, x: np.ndarray) -> np.ndarray:
        return self.blocks[b](x)

    def exit(self, k: int, x: np.ndarray) -> np.ndarray:
        return self.exits[k](x)

    def head(self, x: np.ndarray) -> np.ndarray:
        return reference.linear(x, self.model.head)

    def select(self, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return x[idx]
