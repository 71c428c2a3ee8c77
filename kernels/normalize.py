"""Input normalization of the stem, written straight into the stem conv's padded buffer.

``x[n, c] = (pixels / 255 - mean[c]) / std[c]`` in float32, the operations of
:func:`xnorcdl.kernels.reference.normalize` in its order (a division by 255, a subtraction, a
division), so the result is the same bits; the border of width ``pad`` is zero, ready for a
zero-padded convolution.
"""
from __future__ import annotations

from .jit import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def normalize_into(images, mean, std, pad, out):
    """``out[n, c, y + pad, x + pad] = (images[n, c, y, x] / 255 - mean[c]) / std[c]``
    (images uint8 ``[N, C, H, W]``, out float32 ``[N, C, H + 2 pad, W + 2 pad]``); the border is
    zeroed."""
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


class Normalize:
    """``Normalize(mean, std)(images, pad)``: normalized float32 images with a zero border of
    ``pad`` (a new array, or ``out`` when given)."""

    def __init__(self, mean, std):
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.std = np.ascontiguousarray(std, dtype=np.float32)

    def check(self, images) -> np.ndarray:
        """images as a C-contiguous uint8 ``[N, C, H, W]`` array, or a ValueError naming them."""
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != len(self.mean):
            raise ValueError(f"images: expected uint8 [N, {len(self.mean)}, H, W], got "
                             f"{images.dtype} {images.shape}")
        return images

    def __call__(self, images, pad=0, out=None):
        images = self.check(images)
        n, c, h, w = images.shape
        if out is None:
            out = np.empty((n, c, h + 2 * pad, w + 2 * pad), np.float32)
        return normalize_into(images, self.mean, self.std, pad, out)
