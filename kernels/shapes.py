"""Output geometry of a convolution, the one definition the kernels, the reference, the
backends and the operation counter share, and the argument checks of the quantized convs."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .codes import levels

FLOAT32_EXACT = 1 << 24     # every integer below this is a float32


def out_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length for k taps, stride s and padding p on each side: (n + 2p - k) // s + 1."""
    return (size + 2 * pad - k) // stride + 1


def check_quant_conv(w_codes, out_scale, bn_scale, bn_shift, bits: int,
                     stride: Optional[int]) -> Tuple[np.ndarray, int, int, int]:
    """Validate the prepared arguments of a 3x3 QuanConv; ``(w_codes, O, C, Z)``.

    The integer sums of a conv are bounded by Z^2 K (K = 9C taps); they are exact in float32,
    as every kernel needs, only while Z^2 K < 2^24. ``stride`` None: any stride is accepted."""
    w_codes = np.asarray(w_codes)
    if w_codes.ndim != 4 or w_codes.shape[2:] != (3, 3):
        raise ValueError(f"w_codes: expected [O, C, 3, 3], got shape {w_codes.shape}")
    o_n, c_in = w_codes.shape[:2]
    if stride is not None and stride not in (1, 2):
        raise ValueError(f"stride: expected 1 or 2, got {stride!r}")
    z = levels(bits)
    if z * z * 9 * c_in >= FLOAT32_EXACT:
        raise ValueError(f"{c_in} input channels at {bits} bits: integer sums could reach "
                         f"2^24 and stop being exact in float32")
    for name, arr, n in (("out_scale", out_scale, o_n), ("bn_scale", bn_scale, c_in),
                         ("bn_shift", bn_shift, c_in)):
        if np.shape(arr) != (n,):
            raise ValueError(f"{name}: expected shape ({n},), got {np.shape(arr)}")
    return w_codes, int(o_n), int(c_in), z
