"""The fast backend: :class:`FastExecutor`, the executor interface of :mod:`xnorcdl.backends`
run by the kernels of :mod:`xnorcdl.kernels`, each taken from its registry
(:mod:`xnorcdl.kernels.registry`).

Everything is prepared at construction (packed weight bit planes, padding corrections, folded
BN, GEMM matrices); a call only moves activations. The state between calls is the float32
``[N, C, H, W]`` array the reference also keeps, so ``select`` is a row selection. The edge
runs as one jitted call (:class:`~xnorcdl.kernels.edgeprogram.EdgeProgram`), the cloud blocks
and the head as another (:class:`~xnorcdl.kernels.cloudprogram.CloudProgram`, where NumPy's
sgemm is at hand); ``head`` alone reuses the reference's code.

Agreement with :class:`xnorcdl.backends.reference.ReferenceExecutor`:

* **Edge, bit for bit, on every machine.** The stem normalizes and sums its taps in the
  reference's fixed order (:mod:`~xnorcdl.kernels.ordered`, not BLAS) and then applies BN and
  ReLU in float32 in the same order; every quantized conv is exact by construction; residual
  additions, zero-pad shortcuts and edge 1x1 shortcut convs (unfolded and ordered, like the
  stem) are the same float32 operations; exits pool in the reference's order and sum their
  features in its fixed order. So edge outputs, exit logits, entropies and exit decisions are
  identical, whatever BLAS kernel the processor gets.
* **Cloud, within float32 rounding.** Cloud convs fold BN into the GEMM (one sgemm with a bias
  column), which rounds differently; see :class:`~xnorcdl.kernels.gemmconv.FloatGemmConv`. The
  cloud program's head pools and sums in the exits' fixed order, NumPy's mean and matmul in
  theirs.
"""
from __future__ import annotations

import numpy as np

from ..kernels import blas
from ..kernels.bitconv import BitConv
from ..kernels.cloudblock import CloudBlock
from ..kernels.cloudprogram import CloudProgram
from ..kernels.codeconv import CodeConv
from ..kernels.edgeprogram import EdgeProgram
from ..kernels.gemmconv import CodeGemmConv
from ..kernels.registry import (KERNELS, binary_block_kernel, cloud_block_kernel, float_kernel_for,
                                quant_kernel_for)
from ..kernels.shapes import out_size
from ..model import Block, FloatConv, Model, QuantConv
from ..spec import IMAGE_SHAPE
from . import reference


def _float_conv(layer: FloatConv, exact: bool):
    return float_kernel_for(exact).build(layer.weight, layer.bn_scale, layer.bn_shift,
                                         layer.stride, layer.pad)


def _quant_conv(layer: QuantConv, in_shape):
    kernel = quant_kernel_for(layer.bits, in_shape, layer.stride)
    return kernel.build(layer.w_codes, layer.out_scale, layer.bn_scale, layer.bn_shift,
                        layer.bits, layer.v0, layer.stride)


def _direct(conv, layer: QuantConv):
    """A k-bit conv the edge program can run: BLAS over codes becomes the direct int16 kernel
    (the same exact integers; BLAS cannot be called from the jitted program)."""
    if isinstance(conv, CodeGemmConv):
        return CodeConv(layer.w_codes, layer.out_scale, layer.bn_scale, layer.bn_shift,
                        layer.bits, layer.v0, layer.stride)
    return conv


class _PreparedBlock:
    """The convs of one residual block, ready to run."""

    def __init__(self, blk: Block):
        self.edge = blk.edge
        c_in, h, w = blk.in_shape
        if blk.edge:
            self.conv1 = _quant_conv(blk.conv1, blk.in_shape)
            side = out_size(h, 3, blk.conv1.stride, 1)
            self.conv2 = _quant_conv(blk.conv2, (blk.conv1.shape[0], side, side))
        sc = blk.shortcut
        self.shortcut_kind = sc.kind
        self.pad_channels = sc.pad_channels
        self.fused = None
        if not blk.edge:       # the cloud block kernel: BN folded, ReLUs in the glue passes
            c1, c2 = blk.conv1, blk.conv2
            self.cloud = cloud_block_kernel().build(
                c1, c2, sc.kind, sc.pad_channels, sc.conv if sc.kind == "conv1x1" else None)
            return
        # an edge block's float shortcut conv runs unfolded, like the reference (bit-identical)
        self.shortcut_conv = _float_conv(sc.conv, exact=True) if sc.kind == "conv1x1" else None
        # two binary convs: the fused block kernel (one call, conv1's output never leaves bits)
        if blk.edge and isinstance(self.conv1, BitConv) and self.conv1.bits == 1:
            self.fused = binary_block_kernel().build(self.conv1, self.conv2, sc.kind,
                                                     sc.pad_channels)

    def add_shortcut(self, t: np.ndarray, x: np.ndarray) -> np.ndarray:
        """t += shortcut(x), in place (float32 additions, as the reference's ``t + shortcut``),
        for a k-bit edge block."""
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
        return self.cloud(x)


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
        self.program = None if self.stem_conv is None else self._edge_program()
        self._first_cloud = sum(blk.edge for blk in model.blocks)     # edge blocks come first
        self.cloud = self.cloud_program()

    def _edge_program(self):
        """The stem, the edge blocks and the exits as one :class:`EdgeProgram`; records the
        program row where each edge block starts (``_block_row``) and each exit's row."""
        prog = EdgeProgram()
        prog.add_stem(self.normalize, self.stem_conv, IMAGE_SHAPE)
        self._block_row, self._exit_row = [], {}
        for b, (blk, prep) in enumerate(zip(self.model.blocks, self.blocks)):
            if not blk.edge:
                break
            if prep.fused is not None:
                row = prog.add_binary_block(prep.fused, prep.shortcut_conv, blk.in_shape)
            else:
                conv1, conv2 = (_direct(c, layer) for c, layer in
                                ((prep.conv1, blk.conv1), (prep.conv2, blk.conv2)))
                row = prog.add_quant_block(conv1, conv2, blk.shortcut.kind,
                                           blk.shortcut.pad_channels, prep.shortcut_conv,
                                           blk.in_shape)
            self._block_row.append(row)
            for k, e in enumerate(self.model.exits):
                if e.after_block == b:
                    self._exit_row[k] = prog.add_exit(k, self.exits[k], blk.out_shape)
        self._block_row.append(len(prog._rows))
        return prog.finish()

    def cloud_program(self):
        """The cloud blocks (those after the edge, every one a
        :class:`~xnorcdl.kernels.cloudblock.CloudBlock`) and the head as one
        :class:`~xnorcdl.kernels.cloudprogram.CloudProgram`, or None where there are none or
        another cloud kernel runs them (call again after replacing ``blocks[b].cloud``)."""
        cloud = [prep.cloud for prep in self.blocks[self._first_cloud:]]
        if not cloud or blas.sgemm() is None or not all(isinstance(c, CloudBlock) for c in cloud):
            return None
        head = self.model.head
        return CloudProgram(cloud, head.weight, head.bias,
                            self.model.blocks[self._first_cloud].in_shape)

    def segment(self, images, x, first, stop, k):
        """Blocks ``first .. stop-1`` and exit k (the engine's :func:`xnorcdl.engine.segment`):
        the edge part in one jitted call of the edge program, then the cloud blocks in one
        call of the cloud program, with the head when the segment ends the network (its
        logits returned in place of an exit's)."""
        prog = self.program
        n_edge = len(self._block_row) - 1 if prog is not None else 0
        logits = None
        if prog is not None and (x is None or first < n_edge):
            if x is None:
                images = self.normalize.check(images)
                row = 0
            else:
                x = np.ascontiguousarray(x, dtype=np.float32)
                row = self._block_row[first]
            end = self._exit_row[k] + 1 if k is not None else self._block_row[min(stop, n_edge)]
            if end > row:
                x, out = prog.run(row, end, images=images if x is None else None, x=x)
                if k is not None:
                    logits = out[:, k]
            first = min(stop, n_edge)
        elif x is None:
            x = self.stem(images)
        c0 = self._first_cloud
        if self.cloud is not None and c0 <= first < stop:
            last = stop == len(self.blocks) and k is None
            x, head = self.cloud.run(first - c0, stop - c0, x, head=last)
            if last:
                return x, head
            first = stop
        for b in range(first, stop):
            x = self.block(b, x)
        if k is not None and logits is None:
            logits = self.exit(k, x)
        return x, logits

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
