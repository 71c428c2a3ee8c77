"""XNOR-popcount 3x3 convolution (pad 1, stride 1 or 2) for binary and bit-plane k-bit codes.

Shapes: x ``[N, C, H, W]`` float32 in, ``[N, O, Ho, Wo]`` float32 out, Ho = (H - 1) // s + 1;
K = 9 C taps per output; Z = 2^p - 1 (Z = 1 for binary); P = Ho Wo output pixels.

**What is computed** (exactly :func:`xnorcdl.kernels.reference.quant_conv`):
``out[o, p] = float32(A[o, p]) * out_scale[o]`` with the integer A[o, p] = sum over the *valid*
taps t of the 3x3 window of ``u_a[t] u_w[o, t]``, padded taps contributing 0.

**How.** Codes are sign planes (``u = sum_i 2^i s_i``, :mod:`xnorcdl.kernels.bitpack`), so

    A = sum_{i,j} 2^(i+j) sum_t s_ai[t] s_wj[o, t].

1. *Bit-im2col by kernel rows.* For every padded input row and output column the three taps of
   one kernel row are concatenated into a 3C-bit *row segment* (``rw = ceil(3C / 64)`` words, tap
   kx at bits kx*C .. kx*C + C - 1): for C = 16 a whole kernel row is one 48-bit word, so small
   channel counts waste few word bits. The receptive field of output pixel p is the three row
   segments of its rows; they are stored so that, for each kernel row, the segments of all P
   output pixels are contiguous (stride 2 keeps even and odd padded rows apart for that), and the
   popcount loop runs over pixels with unit stride.
2. *Popcount dot product.* Over all K positions, with padded taps read as zero bits (s = +1),
   ``sum_t s_ai s_wj = K - 2 popcount(S_ai XOR S_wj)`` (derivation in bitpack), so the kernel
   accumulates ``acc = sum_{i,j} 2^(i+j) popcount(S_ai XOR S_wj)`` and, since sum_i 2^i = Z,
   ``sum_{i,j} 2^(i+j) K = Z^2 K``:

       A_full = Z^2 K - 2 acc.

3. *Zero-padding correction.* A_full counted every padded tap as activation code
   ``sum_i 2^i (+1) = Z`` instead of 0, i.e. it added ``Z * sum_{padded t} u_w[o, t]``. That sum
   depends only on which window rows/columns fall outside the image, one of 16 border cases
   (top, bottom, left, right flags), so ``corr[case, o] = Z * sum_{padded t} u_w[o, t]`` is
   tabulated once from the weights and

       A = Z^2 K - 2 acc - corr[case(p), o],      case = 0 (corr = 0) inside the image.

4. *Output.* ``float32(A) * out_scale[o]``. |A| <= Z^2 K < 2^24, so the integers involved are
   exact in float32 and the interior epilogue may do the subtraction in float32.
"""
from __future__ import annotations

import numba
import numpy as np

from xnorcdl import quant

from .bitpack import n_words, pack_activations, pack_weight_rows
from .popcount import popcount

# border case flags: which window row / column falls on the zero padding
TOP, BOTTOM, LEFT, RIGHT = 1, 2, 4, 8
FLOAT32_EXACT = 1 << 24


def out_size(size: int, stride: int) -> int:
    """Output size of a 3x3, pad-1 convolution: (size + 2 - 3) // stride + 1."""
    return (size - 1) // stride + 1


def padding_corrections(w_codes: np.ndarray, bits: int) -> np.ndarray:
    """``corr[case, o] = Z * sum of u_w[o, c, r, k] over the padded taps of border case`` (int32
    ``[16, O]``); ``case`` ORs TOP (r = 0), BOTTOM (r = 2), LEFT (k = 0), RIGHT (k = 2)."""
    z = quant.levels(bits)
    w = np.asarray(w_codes, dtype=np.int64)
    corr = np.zeros((16, w.shape[0]), np.int64)
    for case in range(16):
        pad = np.zeros((3, 3), bool)
        pad[0, :] |= bool(case & TOP)
        pad[2, :] |= bool(case & BOTTOM)
        pad[:, 0] |= bool(case & LEFT)
        pad[:, 2] |= bool(case & RIGHT)
        corr[case] = z * (w * pad).sum(axis=(1, 2, 3))
    return corr.astype(np.int32)


@numba.njit(cache=True, nogil=True)
def row_slot(r, stride, even_rows):
    """Where padded input row r is stored: in order for stride 1; even rows first, then odd
    rows, for stride 2 (so output row oy reads rows 2oy, 2oy+1, 2oy+2 at slots oy, E+oy, oy+1)."""
    if stride == 1:
        return r
    return r // 2 if r % 2 == 0 else even_rows + r // 2


@numba.njit(cache=True, nogil=True)
def row_segments(act, channels, stride, wo, out):
    """act ``[planes, cw, H, W+2]`` (bitpack layout) -> out ``[planes, rw, (H+2) * Wo]``: the
    row segment of padded row r (row 0 and H+1 are the zero padding) and output column ox at
    ``out[i, k, row_slot(r) * Wo + ox]``, word k of the 3C-bit concatenation of the taps at
    padded columns ox*s, ox*s+1, ox*s+2 (tap kx at bit kx*C)."""
    planes, cw, h, _ = act.shape
    rw = out.shape[1]
    even_rows = (h + 3) // 2
    seg = np.empty(rw + 1, np.uint64)
    one = np.uint64(1)
    top = np.uint64(63)
    for i in range(planes):
        for r in range(h + 2):
            base = row_slot(r, stride, even_rows) * wo
            if r == 0 or r == h + 1:
                for k in range(rw):
                    out[i, k, base:base + wo] = 0
                continue
            row = act[i, :, r - 1]
            if cw == 1 and 3 * channels <= 64:     # whole kernel row in one word
                c1 = np.uint64(channels)
                c2 = np.uint64(2 * channels)
                dst = out[i, 0]
                src = row[0]
                for ox in range(wo):
                    x0 = ox * stride
                    dst[base + ox] = src[x0] | (src[x0 + 1] << c1) | (src[x0 + 2] << c2)
                continue
            for ox in range(wo):
                x0 = ox * stride
                seg[:] = 0
                for kx in range(3):
                    for j in range(cw):
                        v = row[j, x0 + kx]
                        off = kx * channels + 64 * j
                        sh = np.uint64(off & 63)
                        seg[off >> 6] |= v << sh
                        # the high part spills into the next word; (v >> 1) >> (63 - sh) is
                        # v >> (64 - sh) without the undefined shift by 64 when sh = 0
                        seg[(off >> 6) + 1] |= (v >> one) >> (top - sh)
                for k in range(rw):
                    out[i, k, base + ox] = seg[k]
    return out


@numba.njit(cache=True, nogil=True)
def border_pixels(h, w, ho, wo, stride):
    """Output pixels whose window touches the zero padding: (flat index, border case) arrays."""
    n = 0
    idx = np.empty(ho * wo, np.int64)
    case = np.empty(ho * wo, np.int64)
    for oy in range(ho):
        r0 = oy * stride                       # first window row, padded coordinates
        cy = (TOP if r0 == 0 else 0) | (BOTTOM if r0 + 2 > h else 0)
        for ox in range(wo):
            x0 = ox * stride                   # first window column, padded coordinates
            c = cy | (LEFT if x0 == 0 else 0) | (RIGHT if x0 + 2 > w else 0)
            if c != 0:
                idx[n] = oy * wo + ox
                case[n] = c
                n += 1
    return idx[:n], case[:n]


@numba.njit(cache=True, nogil=True)
def popcount_dot(rows, wp, corr, zzk, out_scale, stride, h, ho, wo, bidx, bcase, acc, out):
    """Step 2-4 of the module docstring for one sample.

    rows ``[pa, rw, (H+2) * Wo]`` (:func:`row_segments`), wp ``[O, pw, 3, rw]``
    (:func:`~xnorcdl.kernels.bitpack.pack_weight_rows`), corr ``[16, O]``, zzk = Z^2 K,
    acc int32 ``[P]`` scratch, out float32 ``[O, P]``.
    """
    o_n, pw, _, rw = wp.shape
    pa = rows.shape[0]
    p_n = ho * wo
    # start of kernel row r's segments for output pixel 0 (see row_slot)
    b0 = 0
    b1 = wo if stride == 1 else ((h + 3) // 2) * wo
    b2 = 2 * wo if stride == 1 else wo
    zzk_f = np.float32(zzk)
    two = np.float32(2.0)
    for o in range(o_n):
        first = True
        for j in range(pw):
            for i in range(pa):
                m = np.int32(1 << (i + j))
                for k in range(rw):
                    a = rows[i, k]
                    s0 = a[b0:b0 + p_n]
                    s1 = a[b1:b1 + p_n]
                    s2 = a[b2:b2 + p_n]
                    w0 = wp[o, j, 0, k]
                    w1 = wp[o, j, 1, k]
                    w2 = wp[o, j, 2, k]
                    if first:
                        for p in range(p_n):
                            acc[p] = np.int32(popcount(s0[p] ^ w0) + popcount(s1[p] ^ w1)
                                              + popcount(s2[p] ^ w2)) * m
                        first = False
                    else:
                        for p in range(p_n):
                            acc[p] += np.int32(popcount(s0[p] ^ w0) + popcount(s1[p] ^ w1)
                                               + popcount(s2[p] ^ w2)) * m
        s = out_scale[o]
        dst = out[o]
        for p in range(p_n):                       # interior: A = Z^2 K - 2 acc, exact in float32
            dst[p] = (zzk_f - two * np.float32(acc[p])) * s
        for n in range(bidx.shape[0]):             # border: A = Z^2 K - 2 acc - corr[case, o]
            p = bidx[n]
            dst[p] = np.float32(zzk - 2 * np.int64(acc[p]) - corr[bcase[n], o]) * s
    return out


@numba.njit(cache=True, nogil=True)
def bitconv_forward(x, bn_scale, bn_shift, bits, v0, wp, corr, out_scale, stride, out):
    """BN -> quantize -> pack -> row segments -> popcount dot for each sample of x."""
    n_s, c_in, h, w = x.shape
    o_n, pw, _, rw = wp.shape
    ho = out.shape[2]
    wo = out.shape[3]
    z = (1 << bits) - 1
    zzk = z * z * 9 * c_in
    act = np.empty((bits, (c_in + 63) // 64, h, w + 2), np.uint64)
    rows = np.empty((bits, rw, (h + 2) * wo), np.uint64)
    acc = np.empty(ho * wo, np.int32)
    bidx, bcase = border_pixels(h, w, ho, wo, stride)
    for n in range(n_s):
        pack_activations(x[n], bn_scale, bn_shift, bits, v0, act)
        row_segments(act, c_in, stride, wo, rows)
        popcount_dot(rows, wp, corr, zzk, out_scale, stride, h, ho, wo, bidx, bcase, acc,
                     out[n].reshape(o_n, ho * wo))
    return out


class BitConv:
    """A prepared QuanConv (3x3, pad 1): weight bit planes, padding corrections and scales are
    computed once here; calling it runs BN -> quantize -> XNOR-popcount conv -> scale.

    ``w_codes`` int8 ``[O, C, 3, 3]`` (odd codes of a ``bits``-bit quantizer, {-1, +1} for 1 bit),
    ``out_scale`` float32 ``[O]``, ``bn_scale``/``bn_shift`` float32 ``[C]``; ``stride`` 1 or 2.
    ``conv(x)`` with x float32 ``[N, C, H, W]`` equals
    ``reference.quant_conv(x, bn_scale, bn_shift, w_codes, out_scale, bits, v0, stride, 1)``
    bit for bit.
    """

    def __init__(self, w_codes, out_scale, bn_scale, bn_shift, bits: int = 1, v0: float = 1.0,
                 stride: int = 1):
        w_codes = np.asarray(w_codes)
        if w_codes.ndim != 4 or w_codes.shape[2:] != (3, 3):
            raise ValueError(f"w_codes: expected [O, C, 3, 3], got shape {w_codes.shape}")
        o_n, c_in = w_codes.shape[:2]
        if stride not in (1, 2):
            raise ValueError(f"stride: expected 1 or 2, got {stride!r}")
        z = quant.levels(bits)
        if z * z * 9 * c_in >= FLOAT32_EXACT:
            raise ValueError(f"{c_in} input channels at {bits} bits: integer sums could reach "
                             f"2^24 and stop being exact in float32")
        for name, arr, n in (("out_scale", out_scale, o_n), ("bn_scale", bn_scale, c_in),
                             ("bn_shift", bn_shift, c_in)):
            if np.shape(arr) != (n,):
                raise ValueError(f"{name}: expected shape ({n},), got {np.shape(arr)}")
        self.w_codes = w_codes.astype(np.int8)
        self.bits, self.v0, self.stride = int(bits), float(v0), int(stride)
        self.out_channels, self.in_channels = int(o_n), int(c_in)
        self.wp = pack_weight_rows(self.w_codes, bits)            # [O, bits, 3, rw]
        self.corr = padding_corrections(self.w_codes, bits)       # [16, O]
        self.out_scale = np.ascontiguousarray(out_scale, dtype=np.float32)
        self.bn_scale = np.ascontiguousarray(bn_scale, dtype=np.float32)
        self.bn_shift = np.ascontiguousarray(bn_shift, dtype=np.float32)

    @property
    def row_words(self) -> int:
        return n_words(3 * self.in_channels)

    def output_shape(self, x_shape):
        n, _, h, w = x_shape
        return (n, self.out_channels, out_size(h, self.stride), out_size(w, self.stride))

    def __call__(self, x: np.ndarray, out: np.ndarray = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected float32 [N, {self.in_channels}, H, W], got shape "
                             f"{x.shape}")
        if out is None:
            out = np.empty(self.output_shape(x.shape), np.float32)
        return bitconv_forward(x, self.bn_scale, self.bn_shift, self.bits, self.v0, self.wp,
                               self.corr, self.out_scale, self.stride, out)
