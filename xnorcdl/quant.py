"""Quantizers of the paper, section II.A, as integer codes (docs/FORMAT.md, "Quantizers").

With Z = 2^p - 1 levels and the symmetric constants v1 = 2 v0, v2 = 1/2:

* eq. (1), p = 1: ``I_B = sign(I)``, with **sign(0) = +1** everywhere (a packed bit cannot hold 0).
* eq. (1), p > 1: ``I_Q = v1 (round((clip(I, -v0, v0) + v0) / v1 * Z) / Z - v2) = v0 u / Z``,
  with ``q = floor((I_c + v0) * (Z / v1) + 1/2)`` in {0..Z} (round half up) and the odd integer
  code ``u = 2q - Z`` in {-Z, -Z+2, ..., Z}.
* eq. (3): weights use the same map; eq. (2): ``alpha[o] = ||W[o]||_1 / n``, n = C k_h k_w.

So a quantized convolution is ``alpha[o] * (v0/Z)^2 * sum(u_a u_w)``: an exact integer sum
and one float32 scale per output channel (:func:`output_scale`). All float arithmetic here is
float32, in the order written, so every backend that follows it gets the same codes. The codes
themselves (:func:`levels`, :func:`sign_codes`, :func:`kbit_codes`, :func:`codes`) are defined
once, in :mod:`xnorcdl.kernels.codes` (plain NumPy; :mod:`xnorcdl.kernels.quantize` compiles
the scalar forms the kernels use).
"""
from __future__ import annotations

import numpy as np

from .kernels.codes import codes, kbit_codes, levels, sign_codes

__all__ = ["alpha", "codes", "dequantize", "kbit_codes", "levels", "output_scale", "sign_codes"]


def dequantize(u: np.ndarray, bits: int, v0: float = 1.0) -> np.ndarray:
    """The real value a code stands for: u (p = 1) or v0 u / Z (p > 1)."""
    if bits == 1:
        return u.astype(np.float32)
    return (u.astype(np.float64) * (float(v0) / levels(bits))).astype(np.float32)


def alpha(w: np.ndarray) -> np.ndarray:
    """eq. (2): per output filter alpha[o] = ||W[o]||_1 / n, n = C k_h k_w (float32)."""
    w = np.asarray(w, dtype=np.float64)
    return np.abs(w).reshape(w.shape[0], -1).mean(axis=1).astype(np.float32)


def output_scale(w: np.ndarray, bits: int, v0: float = 1.0) -> np.ndarray:
    """s[o] = alpha[o] (p = 1) or alpha[o] v0^2 / Z^2 (p > 1): the float32 factor on the integer sum."""
    a = alpha(w).astype(np.float64)
    if bits > 1:
        a = a * (float(v0) / levels(bits)) ** 2
    return a.astype(np.float32)
