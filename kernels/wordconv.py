"""Binary 3x3 convolution (pad 1, stride 1 or 2) on whole-pixel words: one ``vpopcntw`` per 32
pixels' taps.

Shapes: C <= 64 input channels, O output channels, an H x W image. The sign bits of a pixel's
C channels are one *word* (bit c set for -1, the packing of :mod:`~xnorcdl.kernels.bitpack`)
of B = 16, 32 or 64 bits, the narrowest that holds C (:func:`word_dtype`).

**The sum.** The binary conv's integer (step 2 of :mod:`~xnorcdl.kernels.bitconv`) is

    acc[o, p] = sum_{t < 9} popcount(a[p + off(t)] XOR w[o, t]),

one popcount per tap: with the pixel's word as the unit, the nine taps of an output are nine
words at fixed offsets of a zero-padded plane, so no im2col and no row segments are built. A
vector of 512 bits holds 32, 16 or 8 pixels' words, and AVX-512 BITALG / VPOPCNTDQ count the
bits of each 16-, 32- or 64-bit lane in one instruction (``vpopcntw``, ``vpopcntd``,
``vpopcntq``): per tap and output channel one XOR (with the weight word broadcast), one
popcount and one add per vector, for 16 x 32 = 512 binary MACs at C = 16. The row-segment
kernel's 48-bit segments in 64-bit lanes do the same work on 8 pixels per vector, plus the
segment build, truncations and shifts. The result is the same integer, so every epilogue of
bitconv applies unchanged: ``A = Z^2 K - corr[case(p), o] - 2 acc`` (the *base plane*).

**Layout.** The geometry of :mod:`~xnorcdl.kernels.nibbleconv` with one word group: the
zero-padded image's words in a plane of rows Wq = W + 2 (four phase planes of Wq = Wo + 1 for
stride 2, so every tap is a unit-stride view), outputs q = y Wq + x for q < Q (Ho Wq rounded up
to whole vectors of 512 / B words; the columns x >= Wo and the tail are junk, never read back),
the nine offsets of :func:`~xnorcdl.kernels.nibbleconv.term_offsets` for four channels (one
group). Counts are int16 (at most 9 x 64 = 576).

On a target without those instructions LLVM lowers the same loop to a nibble-table popcount
per lane (correct, slower than :mod:`~xnorcdl.kernels.nibbleconv`, which the fast backend then
runs); :func:`preferred` says which. With ``NUMBA_DISABLE_JIT=1`` the counts are NumPy's.
"""
from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import intrinsic

from .bitconv import BitConv, as_float32_nchw
from .bitpack import pack_activations
from .jit import numba, target_has
from .nibbleconv import geometry as nibble_geometry, geometry_jit, term_offsets, to_padded_rows

MAX_CHANNELS = 64
_DTYPES = {16: np.uint16, 32: np.uint32, 64: np.uint64}


def word_dtype(channels: int):
    """The unsigned type of one pixel's word: 16, 32 or 64 bits, the narrowest that holds the
    channels."""
    for bits, dt in _DTYPES.items():
        if channels <= bits:
            return dt
    raise ValueError(f"channels: a pixel's word holds at most {MAX_CHANNELS}, got {channels}")


def supports(c_in: int, stride: int) -> bool:
    """Whether a binary conv of this shape runs on words: stride 1 or 2, 1..64 input channels."""
    return stride in (1, 2) and 0 < c_in <= MAX_CHANNELS


def vectorized() -> bool:
    """Whether the compile target counts 16-, 32- and 64-bit lanes in one instruction
    (AVX-512 BITALG for ``vpopcntw``, VPOPCNTDQ for ``vpopcntd`` / ``vpopcntq``)."""
    return target_has("avx512bitalg") and target_has("avx512vpopcntdq")


preferred = vectorized
"""Whether the fast backend runs binary blocks on words (where the lane popcounts exist;
benchmarks/RESULTS.md has the measurements against the row-segment and nibble kernels)."""


def geometry(h, w, stride, bits):
    """(Ho, Wo, Wq, Lq, phases, Q) of an h x w input with words of ``bits``: the plane
    geometry of :func:`~xnorcdl.kernels.nibbleconv.geometry`, outputs computed rounded up to
    whole 512-bit vectors of words (output (y, x) is q = y Wq + x)."""
    return nibble_geometry(h, w, stride, 512 // bits)


def plane_words(h: int, w: int, stride: int, bits: int) -> int:
    """Length in words of one padded plane buffer (the reads of junk outputs included)."""
    _, _, wq, lq, phases, q = geometry(h, w, stride, bits)
    return phases * lq + q + 2 * wq + 2


def tap_offsets(h: int, w: int, stride: int = 1) -> np.ndarray:
    """int32 ``[9]``: where tap t = 3 ky + kx of output 0 lies in the plane buffer."""
    return term_offsets(4, h, w, stride)


def weight_words(w_codes: np.ndarray) -> np.ndarray:
    """Sign codes ``[O, C, 3, 3]`` -> uint64 ``[O, 9]``: bit c of tap t's word set when the code
    of channel c is -1 (the value of a B-bit word, held in 64 bits)."""
    w = np.asarray(w_codes)
    o_n, c_in = w.shape[:2]
    neg = (w < 0).transpose(0, 2, 3, 1).reshape(o_n, 9, c_in).astype(np.uint64)
    return (neg << np.arange(c_in, dtype=np.uint64)).sum(axis=2, dtype=np.uint64)


@intrinsic
def _ctpop(typingctx, x):
    """``llvm.ctpop`` on an unsigned integer of any width, returning the same type."""
    if not isinstance(x, types.Integer) or x.signed:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return x(x), codegen


@numba.njit(cache=True, nogil=True)
def _counts_loops(wt, xw, offs, acc):
    """:data:`word_counts` as a flat loop per pair of output channels (the JIT on)."""
    o_n, q_n = acc.shape
    w9 = np.empty(18, xw.dtype)          # weights as words of the plane's type: narrow lanes
    t0, t1, t2 = xw[offs[0]:offs[0] + q_n], xw[offs[1]:offs[1] + q_n], xw[offs[2]:offs[2] + q_n]
    t3, t4, t5 = xw[offs[3]:offs[3] + q_n], xw[offs[4]:offs[4] + q_n], xw[offs[5]:offs[5] + q_n]
    t6, t7, t8 = xw[offs[6]:offs[6] + q_n], xw[offs[7]:offs[7] + q_n], xw[offs[8]:offs[8] + q_n]
    for oa in range(0, o_n, 2):
        ob = min(oa + 1, o_n - 1)
        for t in range(9):
            w9[t] = wt[oa, t]
            w9[9 + t] = wt[ob, t]
        a0, a1, a2, a3, a4, a5, a6, a7, a8 = (w9[0], w9[1], w9[2], w9[3], w9[4], w9[5], w9[6],
                                              w9[7], w9[8])
        b0, b1, b2, b3, b4, b5, b6, b7, b8 = (w9[9], w9[10], w9[11], w9[12], w9[13], w9[14],
                                              w9[15], w9[16], w9[17])
        da, db = acc[oa], acc[ob]
        for q in range(q_n):
            x0, x1, x2, x3, x4 = t0[q], t1[q], t2[q], t3[q], t4[q]
            x5, x6, x7, x8 = t5[q], t6[q], t7[q], t8[q]
            da[q] = np.int16(_ctpop(x0 ^ a0) + _ctpop(x1 ^ a1) + _ctpop(x2 ^ a2)
                             + _ctpop(x3 ^ a3) + _ctpop(x4 ^ a4) + _ctpop(x5 ^ a5)
                             + _ctpop(x6 ^ a6) + _ctpop(x7 ^ a7) + _ctpop(x8 ^ a8))
            db[q] = np.int16(_ctpop(x0 ^ b0) + _ctpop(x1 ^ b1) + _ctpop(x2 ^ b2)
                             + _ctpop(x3 ^ b3) + _ctpop(x4 ^ b4) + _ctpop(x5 ^ b5)
                             + _ctpop(x6 ^ b6) + _ctpop(x7 ^ b7) + _ctpop(x8 ^ b8))
    return acc


def _counts_numpy(wt, xw, offs, acc):
    """:data:`word_counts` in NumPy (the JIT disabled)."""
    q_n = acc.shape[1]
    a = xw[np.asarray(offs, np.int64)[:, None] + np.arange(q_n)[None]]        # [9, Q] words
    w = wt.astype(xw.dtype)
    for o in range(acc.shape[0]):
        x = (a ^ w[o][:, None]).view(np.uint8)
        acc[o] = np.unpackbits(x).reshape(9, q_n, -1).sum(axis=(0, 2))
    return acc


word_counts = _counts_numpy if numba.config.DISABLE_JIT else _counts_loops
"""``word_counts(wt, xw, offs, acc)``: ``acc[o, q] = sum_t popcount(xw[offs[t] + q] XOR
wt[o, t])`` (int16 ``[O, Q]``) for the weight words of :func:`weight_words` (uint64, values
below 2^B), the plane ``xw`` (uint16/32/64, :func:`plane_words` long) and the offsets of
:func:`tap_offsets`."""


@numba.njit(cache=True, nogil=True)
def pack_words(x, scale, shift, stride, xw, tmp):
    """BN and sign of one sample x float32 ``[C, H, W]`` into the interior of the plane xw:
    bit c of pixel (y, x)'s word set when sign(BN(x[c, y, x])) = -1 (sign(0) = +1), at padded
    pixel (y + 1, x + 1) (stride 1), or in phase plane ``((y + 1) % 2, (x + 1) % 2)`` at
    ``((y + 1) // 2, (x + 1) // 2)`` (stride 2). The padding words are not written (they stay
    0). tmp: uint64 ``[1, 1, H, W]`` scratch (the words of
    :func:`~xnorcdl.kernels.bitpack.pack_activations`, narrowed while placed)."""
    c_in, h, w = x.shape
    _, _, wq, lq, _, _ = geometry_jit(h, w, stride)
    pack_activations(x, scale, shift, 1, 1.0, tmp)
    src = tmp.reshape(h * w)
    for y in range(h):
        p0 = np.uint64(y * w)            # unsigned indices vectorize
        if stride == 1:
            at = np.uint64((y + 1) * wq + 1)
            for i in range(w):
                u = np.uint64(i)
                xw[at + u] = src[p0 + u]
        else:
            row = 2 * ((y + 1) % 2) * lq + ((y + 1) // 2) * wq
            ph1 = np.uint64(row + lq)    # phase (., 1): even x, at column x / 2
            ph0 = np.uint64(row + 1)     # phase (., 0): odd x, at column (x + 1) / 2
            two = np.uint64(2)
            for i in range((w + 1) // 2):
                u = np.uint64(i)
                xw[ph1 + u] = src[p0 + two * u]
            for i in range(w // 2):
                u = np.uint64(i)
                xw[ph0 + u] = src[p0 + two * u + np.uint64(1)]
    return xw


@numba.njit(cache=True, nogil=True)
def wordconv_forward(x, bn_scale, bn_shift, stride, wt, offs, base, out_scale, xw, tmp, acc,
                     out):
    """BN -> sign -> words -> counts -> ``(base - 2 acc) * out_scale`` for each sample of x
    ``[N, C, H, W]`` into out ``[N, O, Ho, Wo]`` (bitconv steps 2-4); base int16 ``[O, Q]`` in
    output rows (``base - 2 acc`` is an integer below 2^15: in int16, converted once, it is
    bitconv's float32 ``base - 2 float32(acc)`` exactly); xw/tmp/acc scratch
    (:func:`plane_words` words whose padding is 0, ``[1, 1, H, W]`` uint64, int16 ``[O, Q]``)."""
    n_s, c_in, h, w = x.shape
    o_n = out.shape[1]
    ho, wo, wq, _, _, _ = geometry_jit(h, w, stride)
    for n in range(n_s):
        pack_words(x[n], bn_scale, bn_shift, stride, xw, tmp)
        word_counts(wt, xw, offs, acc)
        for o in range(o_n):
            bo, ac, s = base[o], acc[o], out_scale[o]
            d = out[n, o].reshape(ho * wo)
            for y in range(ho):
                q0 = np.uint64(y * wq)          # unsigned indices vectorize
                p0 = np.uint64(y * wo)
                for i in range(wo):
                    u = np.uint64(i)
                    d[p0 + u] = np.float32(np.int16(bo[q0 + u] - ac[q0 + u] - ac[q0 + u])) * s
    return out


class WordConv:
    """A prepared binary QuanConv (3x3, pad 1, stride 1 or 2) on pixel words where
    :func:`supports` holds (else by the row-segment kernel); ``conv(x)`` equals
    :class:`~xnorcdl.kernels.bitconv.BitConv` (and so the reference) bit for bit."""

    def __init__(self, w_codes, out_scale, bn_scale, bn_shift, bits: int = 1, v0: float = 1.0,
                 stride: int = 1):
        if bits != 1:
            raise ValueError(f"bits: WordConv is binary (1 bit), got {bits!r}")
        self.bitconv = c = BitConv(w_codes, out_scale, bn_scale, bn_shift, bits, v0, stride)
        self.applies = supports(c.in_channels, c.stride)
        if self.applies:
            self.dtype = word_dtype(c.in_channels)
            self.bits = 8 * np.dtype(self.dtype).itemsize
            self.wt = weight_words(c.w_codes)
        self._geo = {}

    def prepared(self, h: int, w: int):
        """(offsets, base plane in output rows, int16 ``[O, Q]``) for inputs of h x w."""
        geo = self._geo.get((h, w))
        if geo is None:
            c = self.bitconv
            ho, wo, wq, _, _, q = geometry(h, w, c.stride, self.bits)
            geo = self._geo[(h, w)] = (tap_offsets(h, w, c.stride),
                                       to_padded_rows(c.base_plane(h, w), ho, wo, wq, q)
                                       .astype(np.int16))
        return geo

    def __call__(self, x: np.ndarray) -> np.ndarray:
        c = self.bitconv
        if not self.applies:
            return c(x)
        x = as_float32_nchw(x, c.in_channels)
        n_s, _, h, w = x.shape
        offs, base = self.prepared(h, w)
        ho, wo, _, _, _, q_n = geometry(h, w, c.stride, self.bits)
        return wordconv_forward(x, c.bn_scale, c.bn_shift, c.stride, self.wt, offs, base,
                                c.out_scale,
                                np.zeros(plane_words(h, w, c.stride, self.bits), self.dtype),
                                np.empty((1, 1, h, w), np.uint64),
                                np.empty((c.out_channels, q_n), np.int16),
                                np.empty((n_s, c.out_channels, ho, wo), np.float32))
