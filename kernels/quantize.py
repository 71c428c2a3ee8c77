"""Scalar BN and quantizers for jitted kernels, operation for operation as :mod:`xnorcdl.quant`.

All arithmetic is float32 in the order written there; the kernels are compiled without
``fastmath``, so LLVM neither reorders these operations nor contracts ``x * s + t`` into one
fused multiply-add (which would skip a rounding and could flip the sign of a value near 0).
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, inline="always")
def batchnorm(x, scale, shift):
    """Inference BN of one float32 value: ``x * scale + shift`` (two roundings)."""
    return x * scale + shift


@numba.njit(cache=True, nogil=True, inline="always")
def kbit_level(y, v0, step):
    """q = floor((clip(y, -v0, v0) + v0) * step + 1/2) in {0..Z}, float32, with step = Z / v1
    as a float32 constant (``quant.kbit_codes``); the code is u = 2q - Z.

    The argument of floor is >= 1/2 (clip makes yc + v0 >= 0, and float32 rounding keeps that
    order), so floor equals truncation toward zero, which is what the integer conversion does;
    it vectorizes (to int32: AVX2 has no vector float -> int64 conversion) where floor would not."""
    yc = min(max(y, -v0), v0)
    return np.int32((yc + v0) * step + np.float32(0.5))


def kbit_step(bits: int, v0: float) -> np.float32:
    """The float32 constant Z / v1 = Z / (2 v0) used by :func:`kbit_level`."""
    return np.float32(((1 << bits) - 1) / (2.0 * float(v0)))
