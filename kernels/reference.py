"""Pure-NumPy reference kernels: the oracle the fast kernels are tested against.

Layout is channels-first, ``x[N, C, H, W]`` and ``w[O, C, kh, kw]``. Convolution is im2col
followed by one matrix product; with float64 operands holding small integers (codes) the
products and sums are exact, which is how :func:`quant_conv` gets its exact integer sums.
"""
from __future__ import annotations

import numpy as np

from xnorcdl import quant


def out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def im2col(x: np.ndarray, kh: int, kw: int, stride: int, pad: int) -> np.ndarray:
    """[N, C, H, W] -> [N, C*kh*kw, Ho*Wo], rows ordered (c, i, j) like ``w.reshape(O, -1)``."""
    n, c, h, w = x.shape
    ho, wo = out_size(h, kh, stride, pad), out_size(w, kw, stride, pad)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    cols = np.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
    return cols.reshape(n, c * kh * kw, ho * wo)


def conv2d(x: np.ndarray, w: np.ndarray, stride: int = 1, pad: int = 0) -> np.ndarray:
    """Cross-correlation with zero padding, no bias; result in the operands' dtype."""
    n, _, h, wd = x.shape
    o, c, kh, kw = w.shape
    cols = im2col(x, kh, kw, stride, pad)
    y = np.matmul(w.reshape(o, c * kh * kw).astype(x.dtype), cols)
    return y.reshape(n, o, out_size(h, kh, stride, pad), out_size(wd, kw, stride, pad))


def batchnorm(x: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Inference BN as one float32 multiply-add per element: x * scale[c] + shift[c]."""
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def int_conv(a_codes: np.ndarray, w_codes: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Exact integer convolution of codes (int64 result); padding contributes 0."""
    acc = conv2d(a_codes.astype(np.float64), w_codes.astype(np.float64), stride, pad)
    return np.rint(acc).astype(np.int64)  # exact: |sum| < 2^53


def quant_conv(x: np.ndarray, bn_scale: np.ndarray, bn_shift: np.ndarray, w_codes: np.ndarray,
               out_scale: np.ndarray, bits: int, v0: float, stride: int, pad: int = 1) -> np.ndarray:
    """QuanConv (Fig. 2): BN -> quantize activations -> integer conv -> s[o] * sum (float32)."""
    y = batchnorm(x.astype(np.float32), bn_scale, bn_shift)
    acc = int_conv(quant.codes(y, bits, v0), w_codes, stride, pad)
    return acc.astype(np.float32) * out_scale[None, :, None, None]


def float_conv_bn(x: np.ndarray, w: np.ndarray, bn_scale: np.ndarray, bn_shift: np.ndarray,
                  stride: int, pad: int) -> np.ndarray:
    """float32 conv followed by inference BN."""
    return batchnorm(conv2d(x.astype(np.float32), w, stride, pad), bn_scale, bn_shift)
