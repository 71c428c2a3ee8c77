"""Quantizers of the paper, section II.A, as integer codes (docs/FORMAT.md, "Quantizers").

With Z = 2^p - 1 levels and the symmetric constants v1 = 2 v0, v2 = 1/2:

* eq. (1), p = 1: ``I_B = sign(I)``, with **sign(0) = +1** everywhere (a packed bit cannot hold 0).
* eq. (1), p > 1: ``I_Q = v1 (round((clip(I, -v0, v0) + v0) / v1 * Z) / Z - v2) = v0 u / Z``,
  with ``q = floor((I_c + v0) * (Z / v1) + 1/2)`` in {0..Z} (round half up) and the odd integer
  code ``u = 2q - Z`` in {-Z, -Z+2, ..., Z}.
* eq. (3): weights use the same map; eq. (2): ``alpha[o] = ||W[o]||_1 / n``, n = C k_h k_w.

So a quantized convolution is ``alpha[o] * (v0/Z)^2 * sum(u_a u_w)``: an exact integer sum
and one float32 scale per output channel (:func:`output_scale`). All float arithmetic here is
float32, in the order written, so every backend that follows it gets the same codes.
"""
from __future__ import annotations

import numpy as np


def levels(bits: int) -> int:
    """Z = 2^p - 1, the number of quantization steps."""
    if bits not in (1, 2, 4):
        raise ValueError(f"bits: expected 1, 2 or 4, got {bits!r}")
    return (1 << bits) - 1


def sign_codes(y: np.ndarray) -> np.ndarray:
    """sign with sign(0) = +1, as int8 in {-1, +1}. NaN maps to -1 (never produced by valid weights)."""
    return np.where(np.asarray(y) >= 0, np.int8(1), np.int8(-1))


def kbit_codes(y: np.ndarray, bits: int, v0: float = 1.0) -> np.ndarray:
    """Odd integer codes u = 2q - Z of eq. (1)/(3) for p = 2 or 4 (int8)."""
    z = levels(bits)
    y = np.asarray(y, dtype=np.float32)
    v0 = np.float32(v0)
    k = np.float32(z / (2.0 * float(v0)))  # Z / v1 with v1 = 2 v0
    yc = np.clip(y, -v0, v0)
    q = np.floor((yc + v0) * k + np.float32(0.5))
    return (2 * q.astype(np.int16) - z).astype(np.int8)


def codes(y: np.ndarray, bits: int, v0: float = 1.0) -> np.ndarray:
    """Integer codes of activations or weights at ``bits`` precision."""
    return sign_codes(y) if bits == 1 else kbit_codes(y, bits, v0)


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
