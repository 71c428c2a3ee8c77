"""The quantizers of the paper, section II.A, for the jitted kernels: the scalar forms of the
codes of :mod:`xnorcdl.kernels.codes` (the array definition, without Numba), compiled.

With Z = 2^p - 1 levels and the symmetric constants v1 = 2 v0, v2 = 1/2, eq. (1)/(3) map a
value I to

* p = 1: ``sign(I)`` with **sign(0) = +1** (a packed bit cannot hold 0): :func:`sign_codes`;
* p > 1: the level ``q = floor((clip(I, -v0, v0) + v0) * (Z / v1) + 1/2)`` in {0..Z} (round
  half up) and the odd code ``u = 2q - Z`` in {-Z, -Z+2, ..., Z}: :func:`kbit_codes`.

:func:`batchnorm` and :func:`kbit_level` are the same operations on one float32 value, for the
jitted kernels. All arithmetic is float32 in the order written; the kernels are compiled
without ``fastmath``, so LLVM neither reorders these operations nor contracts ``x * s + t``
into one fused multiply-add (which would skip a rounding and could flip the sign of a value
near 0).
"""
from __future__ import annotations

from .jit import numba
import numpy as np

from .codes import codes, kbit_codes, levels, sign_codes
from .codes import kbit_step as _kbit_step

#: the float32 constant Z / v1 = Z / (2 v0) of :func:`xnorcdl.kernels.codes.kbit_step`, jitted
kbit_step = numba.njit(cache=True, nogil=True, inline="always")(_kbit_step)

__all__ = ["batchnorm", "codes", "kbit_codes", "kbit_level", "kbit_step", "levels", "sign_codes"]


@numba.njit(cache=True, nogil=True, inline="always")
def batchnorm(x, scale, shift):
    """Inference BN of one float32 value: ``x * scale + shift`` (two roundings)."""
    return x * scale + shift


@numba.njit(cache=True, nogil=True, inline="always")
def kbit_level(y, v0, step):
    """q = floor((clip(y, -v0, v0) + v0) * step + 1/2) in {0..Z}, float32, with step = Z / v1
    (:func:`kbit_step`) as in :func:`kbit_codes`; the code is u = 2q - Z.

    The argument of floor is >= 1/2 (clip makes yc + v0 >= 0, and float32 rounding keeps that
    order), so floor equals truncation toward zero, which is what the integer conversion does;
    it vectorizes (to int32: AVX2 has no vector float -> int64 conversion) where floor would not."""
    yc = min(max(y, -v0), v0)
    return np.int32((yc + v0) * step + np.float32(0.5))
