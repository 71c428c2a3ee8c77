"""The fast backend: :class:`FastExecutor`, the executor interface of :mod:`xnorcdl.executor`
backed by the Numba and BLAS kernels of this package.

Everything is prepared at construction (packed weight bit planes, padding corrections, folded
BN, GEMM matrices); a call only moves activations. The state between calls is the float32
``[N, C, H, W]`` array the reference also keeps, so ``select`` is a row selection and exits and
head reuse the reference's pooling and linear code.

Agreement with :class:`xnorcdl.executor.ReferenceExecutor`:

* **Edge, bit for bit, on every machine.** The stem sums its taps in the reference's fixed order
  (:mod:`~xnorcdl.kernels.ordered`, not BLAS) and then applies BN and ReLU in float32 in the
  same order; every quantized conv is exact by construction; residual additions, zero-pad
  shortcuts and edge 1x1 shortcut convs (unfolded and ordered, like the stem) are the same
  float32 operations; exits pool in the reference's order and sum their features in its fixed
  order. So edge outputs, exit logits, entropies and exit decisions are identical, whatever
  BLAS kernel the processor gets.
* **Cloud, within float32 rounding.** Cloud convs fold BN into the GEMM (one sgemm with a bias
  column), which rounds differently; see :class:`~xnorcdl.kernels.gemmconv.FloatGemmConv`.
"""
from __future__ import annotations

import numba
import numpy as np

from xnorcdl import executor as reference_executor
from xnorcdl.model import Block, FloatConv, Model, QuantConv

from .binaryblock import BinaryBlock
from .bitconv import BitConv
from .gemmconv import FloatGemmConv
from .ordered import ordered_linear
from .registry import quant_kernel_for


@numba.njit(cache=True, nogil=True)
def normalize_into(images, mean, std, pad, out):
    """``out[n, c, y + pad, x + pad] = (pixels / 255 - mean[c]) / std[c]`` in float32, the
    operations of :func:`xnorcdl.executor.normalize` in its order; the border is zeroed."""
    n_s, c_in, h, w = images.shape
    k255 = np.float32(255.0)
    out[:] = 0
    for n in range(n_s):
        for c in range(c_in):
            m = mean[c]
            s = std[c]
            for y in range(h):
                src = images[n, c, y]
                dst = out[n, c, y + pad]
                for x in range(w):
                    dst[x + pad] = (np.float32(src[x]) / k255 - m) / s
    return out


@numba.njit(cache=True, nogil=True)
def avg_pool_flat(x, k, out):
    """Average pooling, kernel k, stride k, no padding, floor mode, flattened per sample in
    (c, h, w) order: ``out [N, C * (H//k) * (W//k)]`` (:func:`xnorcdl.executor.avg_pool`).

    float32 sums in NumPy's order for ``x.reshape(n, c, ho, k, wo, k).mean(axis=(3, 5))``: the
    k values of each window row left to right, then the k row sums top to bottom, then one
    division by k*k. The backend tests compare exit logits bit for bit, so a change of that order
    would show there.
    """
    n_s, c_in, h, w = x.shape
    ho, wo = h // k, w // k
    count = np.float32(k * k)
    for n in range(n_s):
        for c in range(c_in):
            for i in range(ho):
                for j in range(wo):
                    total = np.float32(0.0)
                    for di in range(k):
                        row = np.float32(0.0)
                        src = x[n, c, i * k + di]
                        for dj in range(k):
                            row += src[j * k + dj]
                        total += row
                    out[n, (c * ho + i) * wo + j] = total / count
    return out


def _float_conv(layer: FloatConv, exact: bool) -> FloatGemmConv:
    return FloatGemmConv(layer.weight, layer.bn_scale, layer.bn_shift, layer.stride, layer.pad,
                         fold_bn=not exact)


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
            side = (h - 1) // blk.conv1.stride + 1
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
            self.fused = BinaryBlock(self.conv1, self.conv2, blk.conv2.bn_scale,
                                     blk.conv2.bn_shift, sc.kind, sc.pad_channels)

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
    """Numba/BLAS backend with the interface of :class:`xnorcdl.executor.ReferenceExecutor`."""

    name = "fast"

    def __init__(self, model: Model):
        self.model = model
        self.mean = np.ascontiguousarray(model.mean, dtype=np.float32)
        self.std = np.ascontiguousarray(model.std, dtype=np.float32)
        self.stem_conv = _float_conv(model.stem, exact=True)
        self.blocks = [_PreparedBlock(blk) for blk in model.blocks]
        self.exit_weight_t = [np.ascontiguousarray(e.weight.T, dtype=np.float32)
                              for e in model.exits]
        self.exit_bias = [np.ascontiguousarray(e.bias, dtype=np.float32) for e in model.exits]

    def stem(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected uint8 [N, 3, H, W], got {images.dtype} "
                             f"{images.shape}")
        conv = self.stem_conv
        xp, cols = conv.padded_input(images.shape)
        normalize_into(images, self.mean, self.std, conv.pad, xp)
        return conv.run_padded(xp, cols, images.shape, relu=True)

    def block(self, b: int, x: np.ndarray) -> np.ndarray:
        return self.blocks[b](x)

    def exit(self, k: int, x: np.ndarray) -> np.ndarray:
        layer = self.model.exits[k]
        n, c, h, w = x.shape
        f = np.empty((n, c * (h // layer.pool) * (w // layer.pool)), np.float32)
        avg_pool_flat(x, layer.pool, f)
        out = np.empty((n, self.exit_bias[k].shape[0]), np.float32)
        return ordered_linear(f, self.exit_weight_t[k], self.exit_bias[k], out)

    def head(self, x: np.ndarray) -> np.ndarray:
        return reference_executor.linear(x, self.model.head)

    def select(self, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return x[idx]
