"""Pure-NumPy reference kernels: the oracle the fast kernels are tested against.

Layout is channels-first, ``x[N, C, H, W]`` and ``w[O, C, kh, kw]``. Convolution is im2col
followed by one matrix product; with float64 operands holding small integers (codes) the
products and sums are exact, which is how :func:`quant_conv` gets its exact integer sums.
Float products at the edge sum in a fixed order (:func:`ordered_matmul`, ``ordered=True``), so
they do not depend on the BLAS kernel a processor gets (:mod:`xnorcdl.kernels.ordered`).
"""
from __future__ import annotations

import numpy as np

from .codes import codes
from .shapes import out_size


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


def ordered_matmul(w: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """[O, K] x [N, K, P] -> [N, O, P]: ``sum_k w[o, k] cols[n, k, p]`` added for k = 0..K-1 in
    order, every product and partial sum rounded to the operands' dtype (one ufunc each)."""
    acc = w[None, :, 0, None] * cols[:, None, 0, :]
    for k in range(1, w.shape[1]):
        acc += w[None, :, k, None] * cols[:, None, k, :]
    return acc


def conv2d(x: np.ndarray, w: np.ndarray, stride: int = 1, pad: int = 0,
           ordered: bool = False) -> np.ndarray:
    """Cross-correlation with zero padding, no bias; result in the operands' dtype. The product
    is one ``np.matmul`` (BLAS's summation order), or :func:`ordered_matmul` when ordered."""
    n, _, h, wd = x.shape
    o, c, kh, kw = w.shape
    cols = im2col(x, kh, kw, stride, pad)
    wmat = w.reshape(o, c * kh * kw).astype(x.dtype)
    y = ordered_matmul(wmat, cols) if ordered else np.matmul(wmat, cols)
    return y.reshape(n, o, out_size(h, kh, stride, pad), out_size(wd, kw, stride, pad))


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """x = (pixels / 255 - mean[c]) / std[c], float32."""
    x = images.astype(np.float32) / np.float32(255.0)
    return (x - mean[None, :, None, None]) / std[None, :, None, None]


def avg_pool(x: np.ndarray, k: int) -> np.ndarray:
    """Average pooling, kernel k, stride k, no padding, floor mode: [N,C,H,W] -> [N,C,H//k,W//k]."""
    n, c, h, w = x.shape
    ho, wo = h // k, w // k
    x = x[:, :, :ho * k, :wo * k].reshape(n, c, ho, k, wo, k)
    # summation order made explicit (each window row, then the rows), so that a fast kernel can
    # reproduce the float32 result bit for bit
    return x.sum(axis=5, dtype=np.float32).sum(axis=3, dtype=np.float32) / np.float32(k * k)


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
    acc = int_conv(codes(y, bits, v0), w_codes, stride, pad)
    return acc.astype(np.float32) * out_scale[None, :, None, None]


def float_conv_bn(x: np.ndarray, w: np.ndarray, bn_scale: np.ndarray, bn_shift: np.ndarray,
                  stride: int, pad: int, ordered: bool = False) -> np.ndarray:
    """float32 conv (taps summed in a fixed order when ordered) followed by inference BN."""
    return batchnorm(conv2d(x.astype(np.float32), w, stride, pad, ordered), bn_scale, bn_shift)


def ordered_linear(f: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``f [N, K] -> [N, O]``: ``sum_k f[n, k] weight[o, k]`` for k = 0..K-1 in order, then
    ``+ bias[o]``; every operation rounded to float32 (the edge's exits): :func:`ordered_matmul`
    with the batch as its P columns."""
    return np.ascontiguousarray(ordered_matmul(weight, f.T[None])[0].T) + bias
