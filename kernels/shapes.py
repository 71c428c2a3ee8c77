"""Output geometry of a convolution, the one definition the kernels, the reference, the
backends and the operation counter share."""
from __future__ import annotations


def out_size(size: int, k: int, stride: int, pad: int) -> int:
    """Output length for k taps, stride s and padding p on each side: (n + 2p - k) // s + 1."""
    return (size + 2 * pad - k) // stride + 1
