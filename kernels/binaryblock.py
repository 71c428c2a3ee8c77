"""A whole binary edge block in one call: ``x + Q2(Q1(x))`` (docs/FORMAT.md, step 4).

Shapes: x ``[N, C, H, W]`` float32, conv1 C -> O (stride s), conv2 O -> O, out ``[N, O, Ho, Wo]``.

Run as two :class:`~xnorcdl.kernels.bitconv.BitConv` calls and an addition, the block writes
conv1's float output, reads it back for conv2's BN and sign, and adds the shortcut in a third
pass. Here the two convs share one jitted call and two of those passes disappear, exactly:

* **conv1 -> sign bits of conv2's input.** conv2 packs ``sign(BN2(t))`` with
  ``t = float32(A1) * s1[o]`` and A1 the integer sum of conv1, an integer in [-K1, K1]
  (K1 = 9C). So the bit is a function of the integer A1 alone, ``neg_o(A) = not
  (fl(fl(fl(A) s1[o]) bn2_scale[o]) + bn2_shift[o]) >= 0)``, which :func:`sign_intervals`
  evaluates in float32 for *every* A in [-K1, K1] at preparation. Each rounding step is
  monotone, so the set of A with a set bit is an interval ``[lo[o], hi[o]]`` (empty, a prefix,
  a suffix or everything); that is checked, not assumed, and the epilogue of conv1 then tests
  ``lo <= A <= hi`` on the integer sums and packs the bits directly (LCE's "BN and sign fold into
  an integer threshold", made exact by enumerating the whole domain).
* **conv2 + residual.** conv2's epilogue adds the shortcut to ``float32(A2) * s2[o]`` as the
  reference's ``t + shortcut(x)`` does (identity, zero-pad with explicit +0.0, or a precomputed
  1x1-conv shortcut).
"""
from __future__ import annotations

from .jit import numba
import numpy as np

from .bitconv import BitConv, as_float32_nchw, pair_popcounts, row_segments, row_starts
from .bitpack import pack_activations

IDENTITY, ZERO_PAD, GIVEN = 0, 1, 2         # shortcut kinds understood by the jitted block


def sign_intervals(out_scale, bn_scale, bn_shift, k):
    """``lo, hi`` int32 ``[O]`` with ``neg_o(A)`` true exactly for integers A in [lo, hi]
    (empty when lo > hi), over the domain -k <= A <= k; raises if some channel's set is not an
    interval (impossible for the monotone map above, but verified)."""
    a = np.arange(-k, k + 1, dtype=np.int64)
    af = a.astype(np.float32)
    o_n = len(out_scale)
    lo = np.empty(o_n, np.int32)
    hi = np.empty(o_n, np.int32)
    for o in range(o_n):
        t = af * np.float32(out_scale[o])                       # conv1 output, float32
        y = t * np.float32(bn_scale[o]) + np.float32(bn_shift[o])  # conv2's BN, float32
        neg = ~(y >= 0)
        idx = np.flatnonzero(neg)
        if len(idx) == 0:
            lo[o], hi[o] = 1, 0
            continue
        if idx[-1] - idx[0] + 1 != len(idx):
            raise ValueError(f"channel {o}: the negative set of BN(sign) is not an interval")
        lo[o], hi[o] = a[idx[0]], a[idx[-1]]
    return lo, hi


@numba.njit(cache=True, nogil=True)
def binary_block_forward(x, bn1_scale, bn1_shift, wp1, base1, lo, hi, stride,
                         wp2, base2, s2, shortcut_kind, pad_channels, given, out):
    """One binary edge block per sample of x (see the module docstring).

    base1 int32 ``[O, P]`` and base2 float32 ``[O, P]`` are the base planes
    (:func:`~xnorcdl.kernels.bitconv.base_plane`) of conv1 and conv2; ``given`` is the shortcut
    ``[N, O, Ho, Wo]`` when shortcut_kind is GIVEN (ignored otherwise).
    """
    n_s, c_in, h, w = x.shape
    o_n = wp1.shape[0]
    ho, wo = out.shape[2], out.shape[3]
    p_n = ho * wo
    act1 = np.empty((1, (c_in + 63) // 64, h, w), np.uint64)
    rows1 = np.empty((1, wp1.shape[3], (h + 2) * wo), np.uint64)
    act2 = np.empty((1, (o_n + 63) // 64, ho, wo), np.uint64)
    rows2 = np.empty((1, wp2.shape[3], (ho + 2) * wo), np.uint64)
    acc = np.empty((2, p_n), np.int32)
    halves = np.empty((2 * act2.shape[1], p_n), np.uint32)
    starts1 = row_starts(stride, h, wo)
    starts2 = row_starts(1, ho, wo)
    two = np.float32(2.0)
    zero = np.float32(0.0)
    for n in range(n_s):
        # conv1: pack x, popcount, and pack the signs of conv2's input from the integer sums
        pack_activations(x[n], bn1_scale, bn1_shift, 1, 1.0, act1)
        row_segments(act1, c_in, stride, wo, rows1)
        # bits of channel o go to 32-bit half word o // 32 (8 AVX2 lanes), joined below
        halves[:] = 0
        for oa in range(0, o_n, 2):
            ob = min(oa + 1, o_n - 1)
            pair_popcounts(rows1, wp1, oa, ob, starts1, p_n, acc)
            for o in range(oa, ob + 1):
                ac = acc[o - oa]
                bo = base1[o]
                lo_o, hi_o = lo[o], hi[o]
                dst = halves[o >> 5]
                b = np.uint32(o & 31)
                for p in range(p_n):
                    # A1, an exact integer; int32 throughout keeps the loop 8 lanes wide
                    a = np.int32(bo[p] - np.int32(2) * ac[p])
                    dst[p] |= np.uint32((a >= lo_o) & (a <= hi_o)) << b
        a2 = act2.reshape(act2.shape[1], p_n)
        for j in range(a2.shape[0]):
            dst64 = a2[j]
            lo_half = halves[2 * j]
            hi_half = halves[2 * j + 1]
            for p in range(p_n):
                dst64[p] = np.uint64(lo_half[p]) | (np.uint64(hi_half[p]) << np.uint64(32))
        # conv2 on those bits, then + shortcut(x)
        row_segments(act2, o_n, 1, wo, rows2)
        dst_n = out[n].reshape(o_n, p_n)
        for oa in range(0, o_n, 2):
            ob = min(oa + 1, o_n - 1)
            pair_popcounts(rows2, wp2, oa, ob, starts2, p_n, acc)
            for o in range(oa, ob + 1):
                ac = acc[o - oa]
                bo = base2[o]
                s = s2[o]
                dst = dst_n[o]
                if shortcut_kind == IDENTITY:
                    src = x[n, o].reshape(p_n)
                    for p in range(p_n):
                        dst[p] = (bo[p] - two * np.float32(ac[p])) * s + src[p]
                elif shortcut_kind == GIVEN:
                    src = given[n, o].reshape(p_n)
                    for p in range(p_n):
                        dst[p] = (bo[p] - two * np.float32(ac[p])) * s + src[p]
                elif pad_channels <= o < pad_channels + c_in:     # zero-pad: x[:, ::2, ::2]
                    src2 = x[n, o - pad_channels]
                    for oy in range(ho):
                        for ox in range(wo):
                            p = oy * wo + ox
                            dst[p] = (bo[p] - two * np.float32(ac[p])) * s + src2[2 * oy, 2 * ox]
                else:                                             # a zero channel of the pad
                    for p in range(p_n):
                        dst[p] = (bo[p] - two * np.float32(ac[p])) * s + zero
    return out


def given_shortcut(shortcut, shape) -> np.ndarray:
    """The 1x1-conv shortcut a GIVEN block adds, as float32 of the block's output ``shape``, or
    a ValueError naming it."""
    if shortcut is None or shortcut.shape != shape:
        raise ValueError(f"shortcut: expected {shape}, got "
                         f"{None if shortcut is None else shortcut.shape}")
    return np.ascontiguousarray(shortcut, dtype=np.float32)


class BinaryBlock:
    """A prepared binary edge block. ``block(x, shortcut=None)`` equals
    ``conv2(conv1(x)) + shortcut(x)`` of the reference bit for bit; ``shortcut`` must be given
    (the 1x1-conv shortcut's output) when ``shortcut_kind`` is ``"conv1x1"``."""

    def __init__(self, conv1: BitConv, conv2: BitConv, bn2_scale, bn2_shift, shortcut_kind: str,
                 pad_channels: int = 0):
        if conv1.bits != 1 or conv2.bits != 1 or conv2.stride != 1:
            raise ValueError("BinaryBlock takes two binary convs, the second with stride 1")
        if conv2.in_channels != conv1.out_channels:
            raise ValueError("conv2's input channels must be conv1's output channels")
        self.conv1, self.conv2 = conv1, conv2
        self.kind = {"identity": IDENTITY, "zero_pad": ZERO_PAD, "conv1x1": GIVEN}[shortcut_kind]
        self.pad_channels = int(pad_channels)
        self.lo, self.hi = sign_intervals(conv1.out_scale, bn2_scale, bn2_shift, conv1.zzk)
        self._bases = {}
        self._no_shortcut = np.zeros((1, 1, 1, 1), np.float32)

    def _planes(self, h, w):
        """(Ho, Wo, conv1 base plane as int32, conv2 base plane) for inputs of h x w."""
        planes = self._bases.get((h, w))
        if planes is None:
            ho, wo, base1 = self.conv1.geometry(h, w)
            planes = self._bases[(h, w)] = (ho, wo, base1.astype(np.int32),
                                            self.conv2.base_plane(ho, wo))
        return planes

    def __call__(self, x: np.ndarray, shortcut: np.ndarray = None) -> np.ndarray:
        c1 = self.conv1
        x = as_float32_nchw(x, c1.in_channels)
        ho, wo, base1, base2 = self._planes(*x.shape[2:])
        out = np.empty((x.shape[0], c1.out_channels, ho, wo), np.float32)
        given = given_shortcut(shortcut, out.shape) if self.kind == GIVEN else self._no_shortcut
        return binary_block_forward(x, c1.bn_scale, c1.bn_shift, c1.wp, base1, self.lo, self.hi,
                                    c1.stride, self.conv2.wp, base2, self.conv2.out_scale,
                                    self.kind, self.pad_channels, given, out)
