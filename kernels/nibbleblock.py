"""A binary edge block run by nibble tables (:mod:`~xnorcdl.kernels.nibbleconv`) in one call.

The same block as :func:`~xnorcdl.kernels.binaryblock.binary_block_forward`, ``x + Q2(Q1(x))``
(docs/FORMAT.md, step 4), for stride-1 blocks whose channel counts are multiples of 4, with
the same exact integer steps:

1. x -> BN1, sign -> nibble planes of conv1's input (:func:`~xnorcdl.kernels.nibbleconv.pack_nibbles`);
2. conv1's counts ``acc1 [O, Q]`` by table lookups; ``A1 = base1 - 2 acc1`` (bitconv steps 3-4);
3. conv2's input bits straight from the integers, ``lo[o] <= A1 <= hi[o]``
   (:func:`~xnorcdl.kernels.binaryblock.sign_intervals`), four channels to a byte, written into
   the interior of conv2's nibble planes: output q = y Wp + x of conv1 is pixel (y, x), whose
   byte lies at ``q + Wp + 1`` of the padded plane, and the junk columns x = W, W + 1 land on
   padding bytes, so they are masked to 0 there (:func:`~xnorcdl.kernels.nibbleconv.valid_mask`);
4. conv2's counts, then ``out = (base2 - 2 float32(acc2)) * s2 + shortcut(x)`` in float32, the
   reference's operations.

So its output equals the reference block bit for bit, as the popcount block's does. Blocks of
other shapes (stride 2, channels not a multiple of 4) run the popcount block.
"""
from __future__ import annotations

import numpy as np

from .binaryblock import GIVEN, IDENTITY, BinaryBlock
from .bitconv import as_float32_nchw
from .jit import numba
from .nibbleconv import (geometry, nibble_counts, pack_nibbles, plane_bytes, supports,
                         term_offsets, to_padded_rows, valid_mask, weight_tables)


@numba.njit(cache=True, nogil=True)
def sign_nibbles(acc, base1, lo, hi, valid, wp, lp, xn):
    """Step 3: bit r of byte ``xn[g Lp + Wp + 1 + q]`` = ``lo[o] <= base1[o, q] - 2 acc[o, q]
    <= hi[o]`` for o = 4g + r, over the H Wp outputs of ``valid``. All in int16 (|A1| <= 9C
    < 2^15), so the loop runs 16 lanes to an AVX2 vector."""
    hq = valid.shape[0]
    for g in range(acc.shape[0] // 4):
        o = 4 * g
        at = g * lp + wp + 1
        dst = xn[at:at + hq]
        a0, a1, a2, a3 = acc[o], acc[o + 1], acc[o + 2], acc[o + 3]
        b0, b1, b2, b3 = base1[o], base1[o + 1], base1[o + 2], base1[o + 3]
        l0, l1, l2, l3 = lo[o], lo[o + 1], lo[o + 2], lo[o + 3]
        h0, h1, h2, h3 = hi[o], hi[o + 1], hi[o + 2], hi[o + 3]
        for q in range(hq):
            v0 = np.int16(b0[q] - a0[q] - a0[q])
            v1 = np.int16(b1[q] - a1[q] - a1[q])
            v2 = np.int16(b2[q] - a2[q] - a2[q])
            v3 = np.int16(b3[q] - a3[q] - a3[q])
            byte = (np.uint8((v0 >= l0) & (v0 <= h0))
                    | (np.uint8((v1 >= l1) & (v1 <= h1)) << np.uint8(1))
                    | (np.uint8((v2 >= l2) & (v2 <= h2)) << np.uint8(2))
                    | (np.uint8((v3 >= l3) & (v3 <= h3)) << np.uint8(3)))
            dst[q] = byte & valid[q]
    return xn


@numba.njit(cache=True, nogil=True)
def nibble_block_forward(x, bn1_scale, bn1_shift, lut1, offs1, base1, lo, hi, lut2, offs2,
                         base2, s2, valid, shortcut_kind, given, xn1, xn2, acc, tmp8, tmp32,
                         out):
    """One stride-1 binary block per sample of x ``[N, C, H, W]`` into out ``[N, O, H, W]``.

    lut1/lut2, offs1/offs2: tables and term offsets of the two convs
    (:func:`~xnorcdl.kernels.nibbleconv.weight_tables`, :func:`~xnorcdl.kernels.nibbleconv.term_offsets`);
    base1 int16 / base2 float32 ``[O, Q]``: the base planes in padded rows; lo, hi int16;
    xn1, xn2: nibble planes of C and O channels whose padding bytes are 0 (scratch; interiors
    overwritten); acc int16 ``[O, Q]``, tmp8 uint8 ``[H W]`` and tmp32 float32 ``[Q]`` scratch;
    given ``[N, O, H, W]`` the shortcut when shortcut_kind is GIVEN, else x is added
    (identity)."""
    n_s, c_in, h, w = x.shape
    o_n = out.shape[1]
    wp = w + 2
    lp = (h + 2) * wp
    hq = h * wp
    two = np.float32(2.0)
    for n in range(n_s):
        pack_nibbles(x[n], bn1_scale, bn1_shift, wp, lp, xn1, tmp8)
        nibble_counts(lut1, xn1, offs1, acc)
        sign_nibbles(acc, base1, lo, hi, valid, wp, lp, xn2)
        nibble_counts(lut2, xn2, offs2, acc)
        src = given[n] if shortcut_kind == GIVEN else x[n]
        for o in range(o_n):
            ac, bo, s = acc[o], base2[o], s2[o]
            for q in range(hq):          # the padded rows in one flat loop, then row by row
                tmp32[q] = (bo[q] - two * np.float32(ac[q])) * s
            d = out[n, o].reshape(h * w)
            r = src[o].reshape(h * w)
            for y in range(h):
                q0 = np.uint64(y * wp)   # unsigned indices vectorize
                p0 = np.uint64(y * w)
                for i in range(w):
                    u = np.uint64(i)
                    d[p0 + u] = tmp32[q0 + u] + r[p0 + u]
    return out


class NibbleBlock:
    """A binary edge block by nibble tables, built from the prepared popcount block; calling it
    is ``BinaryBlock.__call__`` (and equals it bit for bit). Where :func:`applies` is false it
    runs the popcount block."""

    def __init__(self, block: BinaryBlock):
        self.block = block
        c1, c2 = block.conv1, block.conv2
        self.kind = block.kind
        self.applies = (supports(c1.in_channels, c1.out_channels, c1.stride)
                        and supports(c2.in_channels, c2.out_channels, c2.stride)
                        and block.kind in (IDENTITY, GIVEN))
        if self.applies:
            self.lut1, self.lut2 = weight_tables(c1.w_codes), weight_tables(c2.w_codes)
            # the intervals in int16 (|A1| <= 9C < 2^15: the clip changes nothing)
            self.lo, self.hi = (np.clip(v, -2**15, 2**15 - 1).astype(np.int16)
                                for v in (block.lo, block.hi))
        self._geo = {}

    def prepared(self, h: int, w: int):
        """(offs1, offs2, base1 int16 [O, Q], base2 float32 [O, Q], valid) for h x w inputs."""
        geo = self._geo.get((h, w))
        if geo is None:
            b = self.block
            _, _, base1, base2 = b._planes(h, w)
            geo = self._geo[(h, w)] = (
                term_offsets(b.conv1.in_channels, h, w), term_offsets(b.conv2.in_channels, h, w),
                to_padded_rows(base1, h, w).astype(np.int16), to_padded_rows(base2, h, w),
                valid_mask(h, w))
        return geo

    def scratch_sizes(self, h: int, w: int):
        """(bytes of conv1's planes, bytes of conv2's planes, int16 counts) for h x w inputs."""
        c1 = self.block.conv1
        return (plane_bytes(c1.in_channels, h, w), plane_bytes(c1.out_channels, h, w),
                c1.out_channels * geometry(h, w)[2])

    def __call__(self, x: np.ndarray, shortcut: np.ndarray = None) -> np.ndarray:
        if not self.applies:
            return self.block(x, shortcut)
        b = self.block
        c1 = b.conv1
        x = as_float32_nchw(x, c1.in_channels)
        n_s, _, h, w = x.shape
        out = np.empty((n_s, c1.out_channels, h, w), np.float32)
        if self.kind == GIVEN:
            if shortcut is None or shortcut.shape != out.shape:
                raise ValueError(f"shortcut: expected {out.shape}, got "
                                 f"{None if shortcut is None else shortcut.shape}")
            given = np.ascontiguousarray(shortcut, dtype=np.float32)
        else:
            given = x
        offs1, offs2, base1, base2, valid = self.prepared(h, w)
        n1, n2, n_acc = self.scratch_sizes(h, w)
        xn1, xn2 = np.zeros(n1, np.uint8), np.zeros(n2, np.uint8)
        q_n = geometry(h, w)[2]
        acc = np.empty((c1.out_channels, q_n), np.int16)
        return nibble_block_forward(x, c1.bn_scale, c1.bn_shift, self.lut1, offs1, base1, self.lo,
                                    self.hi, self.lut2, offs2, base2, b.conv2.out_scale, valid,
                                    self.kind, given, xn1, xn2, acc, np.empty(h * w, np.uint8),
                                    np.empty(q_n, np.float32), out)
