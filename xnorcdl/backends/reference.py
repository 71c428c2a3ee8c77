"""The reference backend: :class:`ReferenceExecutor`, plain NumPy, channels-first, written to be
read; the oracle every faster backend is compared with (interface: :mod:`xnorcdl.backends`).

The edge's float layers (stem, edge 1x1 shortcut convs, exits) sum their products in a fixed
order (``ordered=True``, :mod:`xnorcdl.kernels.ordered`), so the edge and every exit decision
are the same bits on every machine; the cloud's convs and the head use BLAS.
"""
from __future__ import annotations

import numpy as np

from ..kernels import reference as ref
from ..model import Block, Linear, Model, QuantConv, Shortcut


def linear(x: np.ndarray, layer: Linear, ordered: bool = False) -> np.ndarray:
    """Exit (pool 3, flatten (c, h, w)) or head (global average pool), then W f + b (summed
    over the features in order when ordered: the exits)."""
    if layer.pool:
        f = ref.avg_pool(x, layer.pool).reshape(x.shape[0], -1)
    else:
        f = x.mean(axis=(2, 3), dtype=np.float32)
    if ordered:
        return ref.ordered_linear(f, layer.weight, layer.bias)
    return f @ layer.weight.T + layer.bias


def conv(x: np.ndarray, layer, ordered: bool = False) -> np.ndarray:
    if isinstance(layer, QuantConv):
        return ref.quant_conv(x, layer.bn_scale, layer.bn_shift, layer.w_codes, layer.out_scale,
                              layer.bits, layer.v0, layer.stride, layer.pad)
    return ref.float_conv_bn(x, layer.weight, layer.bn_scale, layer.bn_shift,
                             layer.stride, layer.pad, ordered)


def shortcut(x: np.ndarray, sc: Shortcut, ordered: bool = False) -> np.ndarray:
    if sc.kind == "identity":
        return x
    if sc.kind == "zero_pad":
        p = sc.pad_channels
        return np.pad(x[:, :, ::2, ::2], ((0, 0), (p, p), (0, 0), (0, 0)))
    return conv(x, sc.conv, ordered)


def block(x: np.ndarray, blk: Block) -> np.ndarray:
    """Edge: x + Q2(Q1(x)) with no ReLU; cloud: relu(x' + BN(conv(relu(BN(conv(x))))))."""
    if blk.edge:
        t = conv(conv(x, blk.conv1), blk.conv2)
        return t + shortcut(x, blk.shortcut, ordered=True)
    t = np.maximum(conv(x, blk.conv1), 0)
    t = conv(t, blk.conv2)
    return np.maximum(t + shortcut(x, blk.shortcut), 0)


class ReferenceExecutor:
    """Plain NumPy, channels-first ``[N, C, H, W]`` float32 state."""

    name = "reference"

    def __init__(self, model: Model):
        self.model = model

    def stem(self, images: np.ndarray) -> np.ndarray:
        x = ref.normalize(images, self.model.mean, self.model.std)
        return np.maximum(conv(x, self.model.stem, ordered=True), 0)

    def block(self, b: int, x: np.ndarray) -> np.ndarray:
        return block(x, self.model.blocks[b])

    def exit(self, k: int, x: np.ndarray) -> np.ndarray:
        return linear(x, self.model.exits[k], ordered=True)

    def head(self, x: np.ndarray) -> np.ndarray:
        return linear(x, self.model.head)

    def select(self, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return x[idx]
