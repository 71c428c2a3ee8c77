"""An early exit in one pass: average pooling, then the fixed-order linear layer.

``logits[n] = W f[n] + b`` with ``f[n]`` the average pool (kernel k, stride k, no padding,
floor mode) of ``x[n]`` flattened in (c, h, w) order: the operations of
:func:`xnorcdl.kernels.reference.avg_pool` and :func:`~xnorcdl.kernels.reference.ordered_linear`
in their order, so exit logits, entropies and exit decisions are the same bits.
"""
from __future__ import annotations

from .jit import numba
import numpy as np

from .ordered import ordered_linear, pad_classes


@numba.njit(cache=True, nogil=True)
def avg_pool_flat(x, k, out):
    """Average pooling, kernel k, stride k, no padding, floor mode, flattened per sample in
    (c, h, w) order: ``out [N, C * (H//k) * (W//k)]``.

    float32 sums in NumPy's order for ``x.reshape(n, c, ho, k, wo, k).sum(axis=5).sum(axis=3)``
    while k < 8: the k values of each window row left to right, then the k row sums top to
    bottom, then one division by k*k (from 8 terms on NumPy sums in eight interleaved partial
    sums, so there the order is only this one's). The kernel tests compare with the reference bit for bit, so a change of
    that order would show there.
    """
    if k == 3:          # the windows of the exits of ResNet-32 (and 2, 4): k a constant for
        return _pool_windows(x, 3, out)     # LLVM, so it unrolls them (2.4-4x the loops)
    if k == 2:
        return _pool_windows(x, 2, out)
    if k == 4:
        return _pool_windows(x, 4, out)
    return _pool_windows(x, k, out)


@numba.njit(cache=True, nogil=True, inline="always")
def _pool_windows(x, k, out):
    """The sums of :func:`avg_pool_flat` (inlined into it with k a constant)."""
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


class PooledLinear:
    """``PooledLinear(weight [O, K], bias [O], pool)(x [N, C, H, W]) -> float32 [N, O]`` with
    K = C (H // pool) (W // pool)."""

    def __init__(self, weight, bias, pool):
        if pool < 1:
            raise ValueError(f"pool: expected a window of at least 1, got {pool!r}")
        self.pool = int(pool)
        # [K, O'] with O' the classes padded to whole register tiles (ordered.pad_classes)
        self.weight_t = pad_classes(np.asarray(weight, np.float32).T)
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)

    def __call__(self, x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        n, c, h, w = x.shape
        k = self.pool
        features = c * (h // k) * (w // k)
        if features != self.weight_t.shape[0]:
            raise ValueError(f"x: {c}x{h}x{w} pools to {features} features, the layer takes "
                             f"{self.weight_t.shape[0]}")
        f = np.empty((n, features), np.float32)
        avg_pool_flat(x, k, f)
        out = np.empty((n, self.bias.shape[0]), np.float32)
        return ordered_linear(f, self.weight_t, self.bias, out)
