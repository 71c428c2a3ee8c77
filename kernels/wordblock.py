"""A binary edge block on pixel words (:mod:`~xnorcdl.kernels.wordconv`) in one call.

The same block as :func:`~xnorcdl.kernels.binaryblock.binary_block_forward`, ``x + Q2(Q1(x))``
(docs/FORMAT.md, step 4), for blocks of at most 64 channels in and out (conv1 stride 1 or 2),
with the same exact integer steps:

1. x -> BN1, sign -> conv1's input words (:func:`~xnorcdl.kernels.wordconv.pack_words`);
2. conv1's counts ``acc1 [O, Q1]``, one popcount per tap; ``A1 = base1 - 2 acc1``;
3. conv2's input bits straight from the integers, ``lo[o] <= A1 <= hi[o]``
   (:func:`~xnorcdl.kernels.binaryblock.sign_intervals`), bit o of each pixel's word, over
   conv1's output rows in one flat loop per pair of channels, then row by row into the
   interior of conv2's plane, whose padding words are never written;
4. conv2's counts, then ``out = float32(base2 - 2 acc2) * s2 + shortcut(x)``
   (:func:`~xnorcdl.kernels.nibbleblock.residual_rows`, shared with the nibble block).

So its output equals the reference block bit for bit, as the popcount block's does. The two
planes' words are 16, 32 or 64 bits (:func:`plane_bits`): five pairs, so the edge program
compiles five versions.
"""
from __future__ import annotations

import numpy as np

from .binaryblock import GIVEN, BinaryBlock, given_shortcut
from .bitconv import as_float32_nchw
from .jit import numba
from .nibbleblock import residual_rows
from .nibbleconv import geometry_jit, to_padded_rows
from .wordconv import (geometry, pack_words, plane_words, supports, tap_offsets, weight_words,
                       word_counts, word_dtype)


def plane_bits(c_in: int, o_n: int):
    """(bits of conv1's input words, bits of conv2's): the narrowest words that hold the
    channels, widened so the pair is one of (16, 16), (16, 32), (32, 32), (32, 64), (64, 64)."""
    b1, b2 = (8 * np.dtype(word_dtype(c)).itemsize for c in (c_in, o_n))
    b2 = max(b1, b2)
    return max(b1, b2 // 2), b2


@numba.njit(cache=True, nogil=True)
def sign_words(acc, base1, lo, hi, ho, wo, wq, tmp, xw):
    """Step 3: bit o of conv2's input word at pixel (y, x) = ``lo[o] <= base1[o, q] -
    2 acc[o, q] <= hi[o]`` with q = y Wq + x, written to ``xw[(y+1) Wp + x + 1]`` (Wp = Wo + 2).
    All in int16 (|A1| <= 9 x 64); tmp: scratch of Ho Wq words of xw's type."""
    hq = ho * wq
    wp = wo + 2
    o_n = acc.shape[0]
    bit = np.zeros(3, xw.dtype)      # the bits as words of xw's type: narrow lanes
    for q in range(hq):
        tmp[q] = 0
    for oa in range(0, o_n, 2):
        ob = min(oa + 1, o_n - 1)
        bit[0] = 1
        bit[0] <<= oa
        bit[1] = 1
        bit[1] <<= ob
        ba, bb, za = bit[0], bit[1], bit[2]
        a0, a1, b0, b1 = acc[oa], acc[ob], base1[oa], base1[ob]
        l0, l1, h0, h1 = lo[oa], lo[ob], hi[oa], hi[ob]
        for q in range(hq):
            v0 = np.int16(b0[q] - a0[q] - a0[q])
            v1 = np.int16(b1[q] - a1[q] - a1[q])
            tmp[q] |= (ba if (v0 >= l0) & (v0 <= h0) else za) | (
                bb if (v1 >= l1) & (v1 <= h1) else za)
    for y in range(ho):
        at = np.uint64((y + 1) * wp + 1)   # unsigned indices vectorize
        q0 = np.uint64(y * wq)
        for i in range(wo):
            u = np.uint64(i)
            xw[at + u] = tmp[q0 + u]
    return xw


@numba.njit(cache=True, nogil=True)
def word_block_forward(x, bn1_scale, bn1_shift, wt1, offs1, base1, lo, hi, stride, wt2, offs2,
                       base2, s2, shortcut_kind, pad_channels, given, xw1, xw2, acc, tmp64,
                       tmpw, tmp32, out):
    """One binary block per sample of x ``[N, C, H, W]`` into out ``[N, O, Ho, Wo]``.

    wt1/wt2, offs1/offs2: weight words and tap offsets of the two convs
    (:func:`~xnorcdl.kernels.wordconv.weight_words`,
    :func:`~xnorcdl.kernels.wordconv.tap_offsets`); base1 int16 ``[O, Q1]`` / base2 int16
    ``[O, Q2]``: the base planes in the convs' output rows; lo, hi int16; xw1, xw2: the planes
    of conv1's and conv2's input words (of :func:`plane_bits`), padding 0 (scratch; interiors
    overwritten); acc int16 ``[O, max(Q1, Q2)]``, tmp64 uint64 ``[1, 1, H, W]``, tmpw ``[Q1]``
    words of xw2's type, tmp32 float32 ``[Q2]`` scratch; given ``[N, O, Ho, Wo]`` the
    shortcut when shortcut_kind is GIVEN (ignored otherwise)."""
    n_s, c_in, h, w = x.shape
    o_n = out.shape[1]
    b1, b2 = 8 * xw1.itemsize, 8 * xw2.itemsize
    ho, wo, wq1, _, _, q1 = geometry_jit(h, w, stride, 512 // b1)
    _, _, wq2, _, _, q2 = geometry_jit(ho, wo, 1, 512 // b2)
    acc1 = acc.reshape(acc.size)[:o_n * q1].reshape(o_n, q1)
    acc2 = acc.reshape(acc.size)[:o_n * q2].reshape(o_n, q2)
    for n in range(n_s):
        pack_words(x[n], bn1_scale, bn1_shift, stride, xw1, tmp64)
        word_counts(wt1, xw1, offs1, acc1)
        sign_words(acc1, base1, lo, hi, ho, wo, wq1, tmpw, xw2)
        word_counts(wt2, xw2, offs2, acc2)
        residual_rows(acc2, base2, s2, shortcut_kind, pad_channels, x[n], given[n], wq2, tmp32,
                      out[n])
    return out


class WordBlock:
    """A binary edge block on pixel words, built from the prepared popcount block; calling it
    is ``BinaryBlock.__call__`` (and equals it bit for bit). Where :attr:`applies` is false it
    runs the popcount block."""

    def __init__(self, block: BinaryBlock):
        self.block = block
        c1, c2 = block.conv1, block.conv2
        self.kind, self.pad_channels, self.stride = block.kind, block.pad_channels, c1.stride
        self.applies = (supports(c1.in_channels, c1.stride)
                        and supports(c2.in_channels, c2.stride))
        if self.applies:
            self.bits = plane_bits(c1.in_channels, c1.out_channels)
            self.dtypes = tuple({16: np.uint16, 32: np.uint32, 64: np.uint64}[b]
                                for b in self.bits)
            self.wt1, self.wt2 = weight_words(c1.w_codes), weight_words(c2.w_codes)
            # the intervals in int16: they lie in [-9C, 9C] with C <= 64
            self.lo, self.hi = block.lo.astype(np.int16), block.hi.astype(np.int16)
        self._geo = {}

    def prepared(self, h: int, w: int):
        """(offs1, offs2, base1 int16 [O, Q1], base2 int16 [O, Q2]) for h x w inputs."""
        geo = self._geo.get((h, w))
        if geo is None:
            b = self.block
            ho, wo, base1, base2 = b._planes(h, w)
            _, _, wq1, _, _, q1 = geometry(h, w, self.stride, self.bits[0])
            _, _, wq2, _, _, q2 = geometry(ho, wo, 1, self.bits[1])
            geo = self._geo[(h, w)] = (
                tap_offsets(h, w, self.stride), tap_offsets(ho, wo, 1),
                to_padded_rows(base1, ho, wo, wq1, q1).astype(np.int16),
                to_padded_rows(base2, ho, wo, wq2, q2).astype(np.int16))
        return geo

    def scratch_sizes(self, h: int, w: int):
        """(words of conv1's plane, words of conv2's plane, int16 counts, words of tmpw,
        float32 scratch) for h x w inputs (tmp64 is H W words)."""
        ho, wo, _, _, _, q1 = geometry(h, w, self.stride, self.bits[0])
        q2 = geometry(ho, wo, 1, self.bits[1])[5]
        return (plane_words(h, w, self.stride, self.bits[0]),
                plane_words(ho, wo, 1, self.bits[1]),
                self.block.conv1.out_channels * max(q1, q2), q1, q2)

    def __call__(self, x: np.ndarray, shortcut: np.ndarray = None) -> np.ndarray:
        if not self.applies:
            return self.block(x, shortcut)
        b = self.block
        c1 = b.conv1
        x = as_float32_nchw(x, c1.in_channels)
        n_s, _, h, w = x.shape
        ho, wo = geometry(h, w, self.stride, 64)[:2]
        out = np.empty((n_s, c1.out_channels, ho, wo), np.float32)
        given = given_shortcut(shortcut, out.shape) if self.kind == GIVEN else out
        offs1, offs2, base1, base2 = self.prepared(h, w)
        n1, n2, n_acc, n_w, n32 = self.scratch_sizes(h, w)
        d1, d2 = self.dtypes
        return word_block_forward(
            x, c1.bn_scale, c1.bn_shift, self.wt1, offs1, base1, self.lo, self.hi,
            self.stride, self.wt2, offs2, base2, b.conv2.out_scale, self.kind,
            self.pad_channels, given, np.zeros(n1, d1), np.zeros(n2, d2),
            np.empty(n_acc, np.int16), np.empty((1, 1, h, w), np.uint64), np.empty(n_w, d2),
            np.empty(n32, np.float32), out)
