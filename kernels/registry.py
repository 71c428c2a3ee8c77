"""The table of kernels: every variant the fast backend can run, under one name, tested through
one suite (tests/test_kernels_conv.py iterates :data:`KERNELS`) and timed by
benchmarks/bench_convs.py.

Each kernel has a kind; a kind fixes how a kernel is built and what it must equal:

========================  =====================================================================
kind                      ``build(...)`` and the contract of what it returns
========================  =====================================================================
``quant_conv``            ``build(w_codes, out_scale, bn_scale, bn_shift, bits, v0, stride)``
                          -> ``conv(x)``; equals ``reference.quant_conv`` bit for bit on the
                          precisions in ``bits``.
``float_conv``            ``build(weight, bn_scale, bn_shift, stride, pad)`` ->
                          ``conv(x, relu=False)``; within the float32 bound documented in
                          :class:`~xnorcdl.kernels.gemmconv.FloatGemmConv`, or, where ``exact``,
                          equal to ``reference.float_conv_bn(..., ordered=True)``.
``binary_block``          ``build(conv1, conv2, shortcut, pad_channels)`` with two 1-bit
                          :class:`~xnorcdl.kernels.bitconv.BitConv` -> ``block(x, given)``;
                          equals ``quant_conv(quant_conv(x)) + shortcut(x)`` bit for bit.
``cloud_block``           ``build(conv1, conv2, shortcut, pad_channels, shortcut_conv)`` with
                          objects carrying ``weight``, ``bn_scale``, ``bn_shift`` (and conv1's
                          ``stride``) -> ``block(x)``; within the float32 bound of
                          ``FloatGemmConv`` per conv of the reference's cloud block.
``pooled_linear``         ``build(weight, bias, pool)`` -> ``exit(x)``; equals
                          ``reference.ordered_linear(reference.avg_pool(x, pool))`` bit for bit.
``normalize``             ``build(mean, std)`` -> ``normalize(images, pad)``; equals
                          ``reference.normalize`` with a zero border of ``pad``, bit for bit.
========================  =====================================================================

:func:`quant_kernel_for` is the choice the fast backend makes per quantized conv;
benchmarks/RESULTS.md holds the measurements behind it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Tuple

from .binaryblock import BinaryBlock
from .bitconv import BitConv
from .cloudblock import CloudBlock
from .codeconv import CodeConv
from .exits import PooledLinear
from .gemmconv import CodeGemmConv, FloatGemmConv
from .nibbleblock import NibbleBlock
from .nibbleconv import NibbleConv, preferred
from .wordblock import WordBlock
from .wordconv import WordConv, preferred as words_preferred
from .normalize import Normalize
from .shapes import out_size

KINDS = ("quant_conv", "float_conv", "binary_block", "cloud_block", "pooled_linear",
         "normalize")


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    kind: str                   # one of KINDS
    bits: Tuple[int, ...]       # precisions it accepts (32 for float kernels)
    build: Callable
    exact: bool                 # bit-identical to the reference
    summary: str


def _binary_block(conv1: BitConv, conv2: BitConv, shortcut: str, pad_channels: int):
    return BinaryBlock(conv1, conv2, conv2.bn_scale, conv2.bn_shift, shortcut, pad_channels)


def _nibble_block(conv1: BitConv, conv2: BitConv, shortcut: str, pad_channels: int):
    return NibbleBlock(_binary_block(conv1, conv2, shortcut, pad_channels))


def _word_block(conv1: BitConv, conv2: BitConv, shortcut: str, pad_channels: int):
    return WordBlock(_binary_block(conv1, conv2, shortcut, pad_channels))


def _cloud_block(conv1, conv2, shortcut: str, pad_channels: int, shortcut_conv=None,
                 direct=False):
    sc = None if shortcut_conv is None else (shortcut_conv.weight, shortcut_conv.bn_scale,
                                             shortcut_conv.bn_shift)
    return CloudBlock(conv1.weight, conv1.bn_scale, conv1.bn_shift, conv2.weight,
                      conv2.bn_scale, conv2.bn_shift, conv1.stride, shortcut, pad_channels, sc,
                      direct=direct)


def _cloud_block_direct(conv1, conv2, shortcut: str, pad_channels: int, shortcut_conv=None):
    return _cloud_block(conv1, conv2, shortcut, pad_channels, shortcut_conv, direct=True)


KERNELS: Dict[str, Kernel] = {k.name: k for k in (
    Kernel("xnor_popcount", "quant_conv", (1,), BitConv, True,
           "binary: bit-im2col by kernel rows, K - 2 popcount(a XOR w), padding correction"),
    Kernel("xnor_nibble_lut", "quant_conv", (1,), NibbleConv, True,
           "binary: 4-channel nibbles looked up in popcount tables (vpshufb), C % 4 == 0"),
    Kernel("xnor_words", "quant_conv", (1,), WordConv, True,
           "binary: a pixel's channels as one 16/32/64-bit word, one lane popcount per tap"),
    Kernel("bitplane_popcount", "quant_conv", (2, 4), BitConv, True,
           "k-bit as sign planes: sum 2^(i+j) (K - 2 popcount(A_i XOR W_j)), same kernel"),
    Kernel("direct_int16", "quant_conv", (2, 4), CodeConv, True,
           "k-bit codes, direct 3x3 stencil, int16 partial sums, int32 accumulators"),
    Kernel("gemm_codes_blas", "quant_conv", (2, 4), CodeGemmConv, True,
           "k-bit codes as float32, im2col + BLAS sgemm, exact below 2^24"),
    Kernel("gemm_blas_folded", "float_conv", (32,),
           lambda w, s, t, stride, pad: FloatGemmConv(w, s, t, stride, pad, fold_bn=True), False,
           "float32 im2col + BLAS sgemm, BN folded into weights and a bias column"),
    Kernel("gemm_ordered_unfolded", "float_conv", (32,),
           lambda w, s, t, stride, pad: FloatGemmConv(w, s, t, stride, pad, fold_bn=False), True,
           "float32 im2col + taps summed in a fixed order (the edge's float convs), then BN"),
    Kernel("binary_block_fused", "binary_block", (1,), _binary_block, True,
           "two binary convs and the residual in one call; BN2 and sign as integer intervals"),
    Kernel("binary_block_nibble", "binary_block", (1,), _nibble_block, True,
           "the fused block by nibble tables where the channels come in fours"),
    Kernel("binary_block_words", "binary_block", (1,), _word_block, True,
           "the fused block on pixel words (vpopcntw/d/q lanes) where C and O are at most 64"),
    Kernel("cloud_block_folded", "cloud_block", (32,), _cloud_block, False,
           "float32 block: im2col with the padding and ReLU inline, sgemm, residual + ReLU"),
    Kernel("cloud_block_direct", "cloud_block", (32,), _cloud_block_direct, False,
           "float32 block: 3x3 convs by direct FMA tiles (stride 2 on phases), rest as folded"),
    Kernel("pool_ordered_linear", "pooled_linear", (32,), PooledLinear, True,
           "exit: average pool in NumPy's order, then features summed in a fixed order"),
    Kernel("normalize_padded", "normalize", (8,), Normalize, True,
           "uint8 pixels -> (x / 255 - mean) / std, written inside a zero border"),
)}


def of_kind(kind: str) -> Dict[str, Kernel]:
    """The registered kernels of one kind, by name."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    return {name: k for name, k in KERNELS.items() if k.kind == kind}


QUANT_KERNELS = of_kind("quant_conv")
FLOAT_KERNELS = of_kind("float_conv")


def quant_kernel_for(bits: int, in_shape: Tuple[int, int, int], stride: int = 1) -> Kernel:
    """The kernel the fast backend uses for a QuanConv with input ``(C, H, W)``.

    From benchmarks/bench_convs.py on the 2-core AVX2 machine (benchmarks/RESULTS.md):

    * 1 bit: the XNOR-popcount kernel (6-11x NumPy's float32 GEMM conv).
    * 2 bits: the direct int16 kernel on 32x32 inputs, where its long pixel loops win; the
      bit-plane kernel (4 plane pairs) below that, where output pixels are few.
    * 4 bits: the direct int16 kernel while there are at least 256 output pixels; on smaller
      outputs its short loops lose to one BLAS sgemm over the codes. 16 plane pairs never win.
    """
    c, h, w = in_shape
    out_pixels = out_size(h, 3, stride, 1) * out_size(w, 3, stride, 1)
    if bits == 1:
        return KERNELS["xnor_popcount"]
    if bits == 2:
        return KERNELS["direct_int16" if h * w >= 1024 else "bitplane_popcount"]
    if bits == 4:
        return KERNELS["direct_int16" if out_pixels >= 256 else "gemm_codes_blas"]
    raise ValueError(f"bits: expected 1, 2 or 4, got {bits!r}")


def binary_block_kernel() -> Kernel:
    """The fast backend's binary block: on pixel words where the target counts 16-, 32- and
    64-bit lanes (AVX-512 BITALG and VPOPCNTDQ, :func:`~xnorcdl.kernels.wordconv.preferred`),
    by nibble tables on AVX2 targets without VPOPCNTDQ
    (:func:`~xnorcdl.kernels.nibbleconv.preferred`), else by row-segment popcounts."""
    if words_preferred():
        return KERNELS["binary_block_words"]
    return KERNELS["binary_block_nibble" if preferred() else "binary_block_fused"]


def cloud_block_kernel() -> Kernel:
    """The fast backend's cloud block: the direct FMA tile (512-bit vectors on AVX-512 targets,
    256-bit elsewhere), measured against NumPy's BLAS (folded) in benchmarks/RESULTS.md: direct
    1.2x faster on an AVX2 EPYC, and with 512-bit tiles 1.04x (batch 1) and 1.08x (batch 32)
    faster on an AVX-512 Xeon, where the 256-bit tile had been 1.13x slower than BLAS."""
    return KERNELS["cloud_block_direct"]


def float_kernel_for(exact: bool) -> Kernel:
    """The fast backend's float conv: the fixed-order kernel at the edge (``exact``: the same
    bits as the reference on every machine), BLAS with BN folded in the cloud."""
    return KERNELS["gemm_ordered_unfolded" if exact else "gemm_blas_folded"]
