"""The quantizers of the paper, section II.A, as integer codes of NumPy arrays: the one
definition that :mod:`xnorcdl.quant` re-exports and every kernel follows (docs/FORMAT.md,
"Quantizers"). Plain NumPy, no Numba, so the reference backend and the file checks start
without the JIT; :mod:`xnorcdl.kernels.quantize` compiles the scalar forms from these.

With Z = 2^p - 1 levels and the symmetric constants v1 = 2 v0, v2 = 1/2, eq. (1)/(3) map a
value I to

* p = 1: ``sign(I)`` with **sign(0) = +1** (a packed bit cannot hold 0): :func:`sign_codes`;
* p > 1: the level ``q = floor((clip(I, -v0, v0) + v0) * (Z / v1) + 1/2)`` in {0..Z} (round
  half up) and the odd code ``u = 2q - Z`` in {-Z, -Z+2, ..., Z}: :func:`kbit_codes`.

All arithmetic is float32 in the order written.
"""
from __future__ import annotations

import numpy as np


def levels(bits: int) -> int:
    """Z = 2^p - 1, the number of quantization steps."""
    if bits not in (1, 2, 4):
        raise ValueError(f"bits: expected 1, 2 or 4, got {bits!r}")
    return (1 << bits) - 1


def kbit_step(bits, v0):
    """The float32 constant Z / v1 = Z / (2 v0), rounded once from float64."""
    return np.float32(((1 << bits) - 1) / (2.0 * v0))


def sign_codes(y: np.ndarray) -> np.ndarray:
    """sign with sign(0) = +1, as int8 in {-1, +1}. NaN maps to -1 (never produced by valid weights)."""
    return np.where(np.asarray(y) >= 0, np.int8(1), np.int8(-1))


def kbit_codes(y: np.ndarray, bits: int, v0: float = 1.0) -> np.ndarray:
    """Odd integer codes u = 2q - Z of eq. (1)/(3) for p = 2 or 4 (int8)."""
    z = levels(bits)
    y = np.asarray(y, dtype=np.float32)
    v0 = np.float32(v0)
    step = kbit_step(bits, float(v0))
    yc = np.clip(y, -v0, v0)
    q = np.floor((yc + v0) * step + np.float32(0.5))
    return (2 * q.astype(np.int16) - z).astype(np.int8)


def codes(y: np.ndarray, bits: int, v0: float = 1.0) -> np.ndarray:
    """Integer codes of activations or weights at ``bits`` precision."""
    return sign_codes(y) if bits == 1 else kbit_codes(y, bits, v0)
