"""A binary edge block run by nibble tables (:mod:`~xnorcdl.kernels.nibbleconv`) in one call.

The same block as :func:`~xnorcdl.kernels.binaryblock.binary_block_forward`, ``x + Q2(Q1(x))``
(docs/FORMAT.md, step 4), for blocks whose channel counts are multiples of 4 (conv1 stride 1
or 2), with the same exact integer steps:

1. x -> BN1, sign -> nibble planes of conv1's input
   (:func:`~xnorcdl.kernels.nibbleconv.pack_nibbles`);
2. conv1's counts ``acc1 [O, Q1]`` by table lookups; ``A1 = base1 - 2 acc1`` (bitconv steps 3-4);
3. conv2's input bits straight from the integers, ``lo[o] <= A1 <= hi[o]``
   (:func:`~xnorcdl.kernels.binaryblock.sign_intervals`), four channels to a byte, over conv1's
   output rows in one flat loop, then row by row into the interior of conv2's (stride-1)
   nibble planes, whose padding bytes are never written;
4. conv2's counts, then ``out = float32(base2 - 2 acc2) * s2 + shortcut(x)``: the integer
   in int16 and converted once, which is the reference's float32 ``base2 - 2 float32(acc2)``
   exactly (an integer below 2^24), then its float32 operations (identity, zero-pad
   ``x[:, ::2, ::2]`` with explicit ``+ 0.0`` on the pad channels, or a given 1x1-conv
   shortcut).

So its output equals the reference block bit for bit, as the popcount block's does. Blocks of
other shapes (channels not a multiple of 4) run the popcount block.
"""
from __future__ import annotations

import numpy as np

from .binaryblock import GIVEN, ZERO_PAD, BinaryBlock, given_shortcut
from .bitconv import as_float32_nchw
from .jit import numba
from .rowtile import residual_vectors
from .nibbleconv import (geometry, geometry_jit, nibble_counts, pack_nibbles, plane_bytes,
                         supports, term_offsets, to_padded_rows, weight_tables)


@numba.njit(cache=True, nogil=True)
def sign_nibbles(acc, base1, lo, hi, ho, wo, wq, tmp, xn):
    """Step 3: bit r of conv2's input byte at pixel (y, x) = ``lo[o] <= base1[o, q] -
    2 acc[o, q] <= hi[o]`` for o = 4g + r and q = y Wq + x, written to
    ``xn[g Lp + (y+1) Wp + x + 1]`` (Wp = Wo + 2, Lp = (Ho + 2) Wp). All in int16
    (|A1| <= 9C < 2^15), so the flat loop runs 16 lanes to an AVX2 vector; tmp: uint8
    scratch of Ho Wq bytes."""
    hq = ho * wq
    wp = wo + 2
    lp = (ho + 2) * wp
    for g in range(acc.shape[0] // 4):
        o = 4 * g
        a0, a1, a2, a3 = acc[o], acc[o + 1], acc[o + 2], acc[o + 3]
        b0, b1, b2, b3 = base1[o], base1[o + 1], base1[o + 2], base1[o + 3]
        l0, l1, l2, l3 = lo[o], lo[o + 1], lo[o + 2], lo[o + 3]
        h0, h1, h2, h3 = hi[o], hi[o + 1], hi[o + 2], hi[o + 3]
        for q in range(hq):
            v0 = np.int16(b0[q] - a0[q] - a0[q])
            v1 = np.int16(b1[q] - a1[q] - a1[q])
            v2 = np.int16(b2[q] - a2[q] - a2[q])
            v3 = np.int16(b3[q] - a3[q] - a3[q])
            tmp[q] = (np.uint8((v0 >= l0) & (v0 <= h0))
                      | (np.uint8((v1 >= l1) & (v1 <= h1)) << np.uint8(1))
                      | (np.uint8((v2 >= l2) & (v2 <= h2)) << np.uint8(2))
                      | (np.uint8((v3 >= l3) & (v3 <= h3)) << np.uint8(3)))
        for y in range(ho):
            at = np.uint64(g * lp + (y + 1) * wp + 1)   # unsigned indices vectorize
            q0 = np.uint64(y * wq)
            for i in range(wo):
                u = np.uint64(i)
                xn[at + u] = tmp[q0 + u]
    return xn


@numba.njit(cache=True, nogil=True)
def nibble_block_forward(x, bn1_scale, bn1_shift, lut1, offs1, base1, lo, hi, stride, lut2,
                         offs2, base2, s2, shortcut_kind, pad_channels, given, xn1, xn2, acc,
                         tmp8, tmp32, out):
    """One binary block per sample of x ``[N, C, H, W]`` into out ``[N, O, Ho, Wo]``.

    lut1/lut2, offs1/offs2: tables and term offsets of the two convs
    (:func:`~xnorcdl.kernels.nibbleconv.weight_tables`,
    :func:`~xnorcdl.kernels.nibbleconv.term_offsets`);
    base1 int16 ``[O, Q1]`` / base2 int16 ``[O, Q2]``: the base planes in the convs' output
    rows; lo, hi int16; xn1, xn2: nibble planes of C and O channels whose padding bytes are 0
    (scratch; interiors overwritten); acc int16 ``[O, max(Q1, Q2)]``, tmp8 uint8 (H W and Q1
    bytes) and tmp32 float32 ``[Q2]`` scratch; given ``[N, O, Ho, Wo]`` the shortcut when
    shortcut_kind is GIVEN (ignored otherwise)."""
    n_s, c_in, h, w = x.shape
    o_n = out.shape[1]
    ho, wo, wq1, _, _, q1 = geometry_jit(h, w, stride)
    _, _, wq2, _, _, q2 = geometry_jit(ho, wo, 1)
    acc1 = acc.reshape(acc.size)[:o_n * q1].reshape(o_n, q1)
    acc2 = acc.reshape(acc.size)[:o_n * q2].reshape(o_n, q2)
    for n in range(n_s):
        pack_nibbles(x[n], bn1_scale, bn1_shift, stride, xn1, tmp8)
        nibble_counts(lut1, xn1, offs1, acc1)
        sign_nibbles(acc1, base1, lo, hi, ho, wo, wq1, tmp8, xn2)
        nibble_counts(lut2, xn2, offs2, acc2)
        residual_rows(acc2, base2, s2, shortcut_kind, pad_channels, x[n], given[n], wq2, tmp32,
                      out[n])
    return out


@numba.njit(cache=True, nogil=True)
def residual_rows(acc2, base2, s2, shortcut_kind, pad_channels, x, given, wq2, tmp32, out):
    """Step 4 for one sample: ``out[o] = float32(base2 - 2 acc2) * s2[o] + shortcut(x)[o]``
    with acc2, base2 int16 ``[O, Q2]`` in output rows of Wq2, x ``[C, H, W]``, given
    ``[O, Ho, Wo]`` (read when shortcut_kind is GIVEN), tmp32 float32 scratch of at least Wo,
    out ``[O, Ho, Wo]``, all C-contiguous; row by row in vectors
    (:func:`~xnorcdl.kernels.rowtile.residual_vectors`), then each row's last pixels."""
    o_n, ho, wo = out.shape
    c_in, h, w = x.shape
    q2 = acc2.shape[1]
    for i in range(wo):
        tmp32[i] = 0.0                   # the pad channels of zero-pad add an explicit +0.0
    a_at, b_at, d_at = acc2.ctypes.data, base2.ctypes.data, out.ctypes.data
    x_at, g_at, z_at = x.ctypes.data, given.ctypes.data, tmp32.ctypes.data
    zero_pad = shortcut_kind == ZERO_PAD
    for o in range(o_n):
        s = s2[o]
        c = o - pad_channels
        real = 0 <= c < c_in
        q0, p0 = o * q2, o * ho * wo
        if zero_pad and real:      # x[c, 2y, 2i]
            n = residual_vectors(b_at + 2 * q0, a_at + 2 * q0, x_at + 4 * c * h * w,
                                 d_at + 4 * p0, s, min(wo, w // 2), 2, ho, wq2, 2 * w, wo)
        elif zero_pad:             # a zero channel of the pad
            n = residual_vectors(b_at + 2 * q0, a_at + 2 * q0, z_at, d_at + 4 * p0, s, wo, 1,
                                 ho, wq2, 0, wo)
        else:
            n = residual_vectors(b_at + 2 * q0, a_at + 2 * q0,
                                 (g_at if shortcut_kind == GIVEN else x_at) + 4 * p0,
                                 d_at + 4 * p0, s, wo, 1, ho, wq2, wo, wo)
        for y in range(ho):
            for i in range(n, wo):
                t = np.float32(np.int16(base2[o, y * wq2 + i] - acc2[o, y * wq2 + i]
                                        - acc2[o, y * wq2 + i])) * s
                if zero_pad:
                    out[o, y, i] = t + (x[c, 2 * y, 2 * i] if real else np.float32(0.0))
                elif shortcut_kind == GIVEN:
                    out[o, y, i] = t + given[o, y, i]
                else:
                    out[o, y, i] = t + x[o, y, i]
    return out


class NibbleBlock:
    """A binary edge block by nibble tables, built from the prepared popcount block; calling it
    is ``BinaryBlock.__call__`` (and equals it bit for bit). Where :attr:`applies` is false it
    runs the popcount block."""

    def __init__(self, block: BinaryBlock):
        self.block = block
        c1, c2 = block.conv1, block.conv2
        self.kind, self.pad_channels, self.stride = block.kind, block.pad_channels, c1.stride
        self.applies = (supports(c1.in_channels, c1.out_channels, c1.stride)
                        and supports(c2.in_channels, c2.out_channels, c2.stride))
        if self.applies:
            self.lut1, self.lut2 = weight_tables(c1.w_codes), weight_tables(c2.w_codes)
            # the intervals in int16: they lie in [-9C, 9C], and supports() keeps 9C < 2^15
            self.lo, self.hi = block.lo.astype(np.int16), block.hi.astype(np.int16)
        self._geo = {}

    def prepared(self, h: int, w: int):
        """(offs1, offs2, base1 int16 [O, Q1], base2 int16 [O, Q2]) for h x w inputs."""
        geo = self._geo.get((h, w))
        if geo is None:
            b = self.block
            ho, wo, base1, base2 = b._planes(h, w)
            _, _, wq1, _, _, q1 = geometry(h, w, self.stride)
            _, _, wq2, _, _, q2 = geometry(ho, wo, 1)
            geo = self._geo[(h, w)] = (
                term_offsets(b.conv1.in_channels, h, w, self.stride),
                term_offsets(b.conv2.in_channels, ho, wo, 1),
                to_padded_rows(base1, ho, wo, wq1, q1).astype(np.int16),
                to_padded_rows(base2, ho, wo, wq2, q2).astype(np.int16))
        return geo

    def scratch_sizes(self, h: int, w: int):
        """(bytes of conv1's planes, bytes of conv2's planes, int16 counts, uint8 scratch,
        float32 scratch) for h x w inputs."""
        c1 = self.block.conv1
        ho, wo, _, _, _, q1 = geometry(h, w, self.stride)
        q2 = geometry(ho, wo, 1)[5]
        return (plane_bytes(c1.in_channels, h, w, self.stride),
                plane_bytes(c1.out_channels, ho, wo, 1), c1.out_channels * max(q1, q2),
                max(h * w, q1), q2)

    def __call__(self, x: np.ndarray, shortcut: np.ndarray = None) -> np.ndarray:
        if not self.applies:
            return self.block(x, shortcut)
        b = self.block
        c1 = b.conv1
        x = as_float32_nchw(x, c1.in_channels)
        n_s, _, h, w = x.shape
        ho, wo = geometry(h, w, self.stride)[:2]
        out = np.empty((n_s, c1.out_channels, ho, wo), np.float32)
        given = given_shortcut(shortcut, out.shape) if self.kind == GIVEN else out
        offs1, offs2, base1, base2 = self.prepared(h, w)
        n1, n2, n_acc, n8, n32 = self.scratch_sizes(h, w)
        return nibble_block_forward(
            x, c1.bn_scale, c1.bn_shift, self.lut1, offs1, base1, self.lo, self.hi,
            self.stride, self.lut2, offs2, base2, b.conv2.out_scale, self.kind,
            self.pad_channels, given, np.zeros(n1, np.uint8), np.zeros(n2, np.uint8),
            np.empty(n_acc, np.int16), np.empty(n8, np.uint8), np.empty(n32, np.float32), out)
