"""The table of convolution kernels: every variant under one name, tested through one suite.

Quantized kernels (:data:`QUANT_KERNELS`) all take the prepared-layer arguments of a QuanConv,
``build(w_codes, out_scale, bn_scale, bn_shift, bits, v0, stride)``, and must equal
``reference.quant_conv`` bit for bit on the precisions they list. Float kernels
(:data:`FLOAT_KERNELS`) take ``build(weight, bn_scale, bn_shift, stride, pad)`` and must stay
within the float32 bound documented in :class:`~xnorcdl.kernels.gemmconv.FloatGemmConv`
(``exact`` marks the variant that reproduces the reference's ``ordered=True`` operations one for
one).

:func:`quant_kernel_for` is the choice the fast executor makes per layer; benchmarks/RESULTS.md
holds the measurements behind it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Tuple

from .bitconv import BitConv
from .codeconv import CodeConv
from .gemmconv import CodeGemmConv, FloatGemmConv


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    bits: Tuple[int, ...]       # precisions it accepts (32 for float kernels)
    build: Callable
    exact: bool                 # bit-identical to the reference
    summary: str


def _bitconv(w_codes, out_scale, bn_scale, bn_shift, bits, v0, stride):
    return BitConv(w_codes, out_scale, bn_scale, bn_shift, bits, v0, stride)


def _codeconv(w_codes, out_scale, bn_scale, bn_shift, bits, v0, stride):
    return CodeConv(w_codes, out_scale, bn_scale, bn_shift, bits, v0, stride)


def _codegemm(w_codes, out_scale, bn_scale, bn_shift, bits, v0, stride):
    return CodeGemmConv(w_codes, out_scale, bn_scale, bn_shift, bits, v0, stride)


QUANT_KERNELS: Dict[str, Kernel] = {k.name: k for k in (
    Kernel("xnor_popcount", (1,), _bitconv, True,
           "binary: bit-im2col by kernel rows, K - 2 popcount(a XOR w), padding correction"),
    Kernel("bitplane_popcount", (2, 4), _bitconv, True,
           "k-bit as sign planes: sum 2^(i+j) (K - 2 popcount(A_i XOR W_j)), same kernel"),
    Kernel("direct_int16", (2, 4), _codeconv, True,
           "k-bit codes, direct 3x3 stencil, int16 partial sums, int32 accumulators"),
    Kernel("gemm_codes_blas", (2, 4), _codegemm, True,
           "k-bit codes as float32, im2col + BLAS sgemm, exact below 2^24"),
)}

FLOAT_KERNELS: Dict[str, Kernel] = {k.name: k for k in (
    Kernel("gemm_blas_folded", (32,),
           lambda w, s, t, stride, pad: FloatGemmConv(w, s, t, stride, pad, fold_bn=True), False,
           "float32 im2col + BLAS sgemm, BN folded into weights and a bias column"),
    Kernel("gemm_ordered_unfolded", (32,),
           lambda w, s, t, stride, pad: FloatGemmConv(w, s, t, stride, pad, fold_bn=False), True,
           "float32 im2col + taps summed in a fixed order (the edge's float convs), then BN"),
)}


def quant_kernel_for(bits: int, in_shape: Tuple[int, int, int], stride: int = 1) -> Kernel:
    """The kernel the fast executor uses for a QuanConv with input ``(C, H, W)``.

    From benchmarks/bench_convs.py on the 2-core AVX2 machine (benchmarks/RESULTS.md):

    * 1 bit: the XNOR-popcount kernel (6-11x NumPy's float32 GEMM conv).
    * 2 bits: the direct int16 kernel on 32x32 inputs, where its long pixel loops win; the
      bit-plane kernel (4 plane pairs) below that, where output pixels are few.
    * 4 bits: the direct int16 kernel while there are at least 256 output pixels; on smaller
      outputs its short loops lose to one BLAS sgemm over the codes. 16 plane pairs never win.
    """
    c, h, w = in_shape
    out_pixels = ((h - 1) // stride + 1) * ((w - 1) // stride + 1)
    if bits == 1:
        return QUANT_KERNELS["xnor_popcount"]
    if bits == 2:
        return QUANT_KERNELS["direct_int16" if h * w >= 1024 else "bitplane_popcount"]
    if bits == 4:
        return QUANT_KERNELS["direct_int16" if out_pixels >= 256 else "gemm_codes_blas"]
    raise ValueError(f"bits: expected 1, 2 or 4, got {bits!r}")
