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

from .jit import numba
import numpy as np

from .bitpack import n_words, pack_activations, pack_weight_rows
from .popcount import popcount
from .quantize import levels
from .shapes import check_quant_conv, out_size

# border case flags: which window row / column falls on the zero padding
TOP, BOTTOM, LEFT, RIGHT = 1, 2, 4, 8


def padding_corrections(w_codes: np.ndarray, bits: int) -> np.ndarray:
    """``corr[case, o] = Z * sum of u_w[o, c, r, k] over the padded taps of border case`` (int32
    ``[16, O]``); ``case`` ORs TOP (r = 0), BOTTOM (r = 2), LEFT (k = 0), RIGHT (k = 2)."""
    z = levels(bits)
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


@numba.njit(cache=True, nogil=True, inline="always")
def _tap(row, xx, w):
    """Word of column xx of an unpadded row, or 0 (the zero padding) outside 0..w-1."""
    return row[xx] if 0 <= xx < w else np.uint64(0)


@numba.njit(cache=True, nogil=True, inline="always")
def _part(v, kx, k, channels):
    """The bits of tap kx's word v (C channels at bit kx*C of the segment) that land in segment
    word k: ``v << sh`` in word kx*C // 64, its spill ``v >> (64 - sh)`` in the next one."""
    off = kx * channels
    sh = np.uint64(off & 63)
    if off >> 6 == k:
        return v << sh
    if (off >> 6) + 1 == k and (off & 63) + channels > 64:
        return (v >> np.uint64(1)) >> (np.uint64(63) - sh)   # v >> (64 - sh), sh > 0 here
    return np.uint64(0)


@numba.njit(cache=True, nogil=True)
def _segment_word(src, w, stride, k, channels, inner_end, dst):
    """``dst[ox]`` = word k of the segment of output column ox, taps from the unpadded row src
    (one word per pixel). The part each tap contributes to word k is a fixed shift (or nothing),
    so the interior loop is three loads, shifts and ORs per column, which vectorizes."""
    wo = dst.shape[0]
    one = np.uint64(1)
    if stride == 1:                  # two copies so that each loop has a constant stride
        for ox in range(1, inner_end):
            x0 = np.uint64(ox)       # the centre tap; unsigned keeps it vectorizable
            dst[ox] = (_part(src[x0 - one], 0, k, channels) | _part(src[x0], 1, k, channels)
                       | _part(src[x0 + one], 2, k, channels))
    else:
        for ox in range(1, inner_end):
            x0 = np.uint64(2 * ox)
            dst[ox] = (_part(src[x0 - one], 0, k, channels) | _part(src[x0], 1, k, channels)
                       | _part(src[x0 + one], 2, k, channels))
    for ox in range(inner_end - 1, wo):      # the border columns: 0 and inner_end..wo-1
        if ox == inner_end - 1:
            ox = 0
        xc = ox * stride
        dst[ox] = (_part(_tap(src, xc - 1, w), 0, k, channels)
                   | _part(_tap(src, xc, w), 1, k, channels)
                   | _part(_tap(src, xc + 1, w), 2, k, channels))


@numba.njit(cache=True, nogil=True)
def row_segments(act, channels, stride, wo, out):
    """act ``[planes, cw, H, W]`` (bitpack layout) -> out ``[planes, rw, (H+2) * Wo]``: the
    row segment of padded row r (rows 0 and H+1 are the zero padding) and output column ox at
    ``out[i, k, row_slot(r) * Wo + ox]``, word k of the 3C-bit concatenation of the taps at
    columns ox*s - 1, ox*s, ox*s + 1 (tap kx at bit kx*C; columns outside the image are zero).

    Up to 21 channels the segment is one word, ``t0 | t1 << C | t2 << 2C``; up to 64 channels
    (one word per pixel) tap kx lands at word kx*C // 64, shifted left by kx*C % 64, its top
    bits spilling into the next word (:func:`_part`). Either way the loops over output columns
    vectorize; for stride 1 they run over the whole image at once. Wider inputs take a scalar
    path that appends word by word.
    """
    planes, cw, h, w = act.shape
    rw = out.shape[1]
    even_rows = (h + 3) // 2
    seg = np.empty(rw + 1, np.uint64)
    one = np.uint64(1)
    top = np.uint64(63)
    # output columns whose three taps all lie inside the image: 1 <= ox < inner_end
    inner_end = max(1, min(wo, (w - 2) // stride + 1))
    if stride == 1 and cw == 1 and w >= 2:
        # one word per pixel, stride 1: one flat loop over the image per segment word (rows
        # 1..H are contiguous in out for stride 1), then the two border columns of every row
        n_px = h * w
        for i in range(planes):
            src = act[i, 0].reshape(n_px)
            for k in range(rw):
                dst = out[i, k]
                for q in range(w):
                    dst[q] = 0
                    dst[(h + 1) * w + q] = 0
                body = dst[w:w + n_px]
                for q in range(1, n_px - 1):
                    u = np.uint64(q)
                    body[q] = (_part(src[u - one], 0, k, channels)
                               | _part(src[u], 1, k, channels)
                               | _part(src[u + one], 2, k, channels))
                for y in range(h):
                    q0 = y * w
                    q1 = q0 + w - 1
                    body[q0] = _part(src[q0], 1, k, channels) | _part(src[q0 + 1], 2, k, channels)
                    body[q1] = _part(src[q1 - 1], 0, k, channels) | _part(src[q1], 1, k, channels)
        return out
    for i in range(planes):
        for r in range(h + 2):
            base = row_slot(r, stride, even_rows) * wo
            if r == 0 or r == h + 1 or cw > 1:
                for k in range(rw):                # zero rows, or the words the taps OR into
                    dst = out[i, k]
                    for ox in range(wo):
                        dst[base + ox] = 0
            if r == 0 or r == h + 1:               # the zero padding rows
                continue
            src = act[i, 0, r - 1]
            if cw == 1 and 3 * channels <= 64:     # a whole kernel row fits one word
                c1 = np.uint64(channels)
                c2 = np.uint64(2 * channels)
                dst = out[i, 0, base:base + wo]
                if stride == 1:                    # two copies so each loop has a constant stride
                    for ox in range(1, inner_end):
                        x0 = np.uint64(ox)         # the centre tap; unsigned keeps it vectorizable
                        dst[ox] = src[x0 - one] | (src[x0] << c1) | (src[x0 + one] << c2)
                else:
                    for ox in range(1, inner_end):
                        x0 = np.uint64(2 * ox)
                        dst[ox] = src[x0 - one] | (src[x0] << c1) | (src[x0 + one] << c2)
                for ox in range(inner_end - 1, wo):    # border columns: 0, inner_end..wo-1
                    if ox == inner_end - 1:
                        ox = 0
                    xc = ox * stride
                    dst[ox] = (_tap(src, xc - 1, w) | (_tap(src, xc, w) << c1)
                               | (_tap(src, xc + 1, w) << c2))
                continue
            if cw == 1:                            # one word per pixel, 2 or 3 segment words
                for k in range(rw):
                    _segment_word(src, w, stride, k, channels, inner_end,
                                  out[i, k, base:base + wo])
                continue
            for ox in range(wo):
                seg[:] = 0
                for kx in range(3):
                    xx = ox * stride - 1 + kx
                    if xx < 0 or xx >= w:
                        continue
                    for j in range(cw):
                        v = act[i, j, r - 1, xx]
                        off = kx * channels + 64 * j
                        sh = np.uint64(off & 63)
                        seg[off >> 6] |= v << sh
                        # the high part spills into the next word; (v >> 1) >> (63 - sh) is
                        # v >> (64 - sh) without the undefined shift by 64 when sh = 0
                        seg[(off >> 6) + 1] |= (v >> one) >> (top - sh)
                for k in range(rw):
                    out[i, k, base + ox] = seg[k]
    return out


def border_cases(h: int, w: int, stride: int) -> np.ndarray:
    """int ``[Ho * Wo]``: the border case of every output pixel (0 inside the image), i.e. which
    rows/columns of its 3x3 window fall on the zero padding."""
    ho, wo = out_size(h, 3, stride, 1), out_size(w, 3, stride, 1)
    r0 = np.arange(ho) * stride                  # first window row / column, padded coordinates
    x0 = np.arange(wo) * stride
    cy = np.where(r0 == 0, TOP, 0) | np.where(r0 + 2 > h, BOTTOM, 0)
    cx = np.where(x0 == 0, LEFT, 0) | np.where(x0 + 2 > w, RIGHT, 0)
    return (cy[:, None] | cx[None, :]).reshape(-1)


def base_plane(corr: np.ndarray, zzk: int, h: int, w: int, stride: int) -> np.ndarray:
    """float32 ``[O, Ho * Wo]``: ``Z^2 K - corr[case(p), o]``, the part of A that does not depend
    on the activations (exact: integers below 2^24)."""
    return np.ascontiguousarray((zzk - corr[border_cases(h, w, stride)]).T, dtype=np.float32)


@numba.njit(cache=True, nogil=True)
def row_starts(stride, h, wo):
    """Offsets of kernel rows 0, 1, 2 of output pixel 0 in a row-segment plane (see row_slot);
    output pixel p adds p to each."""
    if stride == 1:
        return 0, wo, 2 * wo
    return 0, ((h + 3) // 2) * wo, wo


@numba.njit(cache=True, nogil=True)
def pair_popcounts(rows, wp, oa, ob, starts, p_n, acc):
    """``acc[0, p]`` / ``acc[1, p]`` = sum over plane pairs (i, j), words k and kernel rows r of
    ``2^(i+j) popcount(S_ai XOR S_wj)`` for output channels oa / ob at every output pixel p
    (step 2 of the module docstring). Two channels share each activation word loaded."""
    pw, rw = wp.shape[1], wp.shape[3]
    pa = rows.shape[0]
    b0, b1, b2 = starts
    acc0 = acc[0]
    acc1 = acc[1]
    first = True
    for j in range(pw):
        for i in range(pa):
            sh = np.int32(i + j)                     # weight 2^(i+j) of plane pair (i, j)
            for k in range(rw):
                a = rows[i, k]
                s0 = a[b0:b0 + p_n]
                s1 = a[b1:b1 + p_n]
                s2 = a[b2:b2 + p_n]
                w0, w1, w2 = wp[oa, j, 0, k], wp[oa, j, 1, k], wp[oa, j, 2, k]
                v0, v1, v2 = wp[ob, j, 0, k], wp[ob, j, 1, k], wp[ob, j, 2, k]
                if first:
                    for p in range(p_n):
                        x0, x1, x2 = s0[p], s1[p], s2[p]
                        acc0[p] = np.int32(popcount(x0 ^ w0) + popcount(x1 ^ w1)
                                           + popcount(x2 ^ w2)) << sh
                        acc1[p] = np.int32(popcount(x0 ^ v0) + popcount(x1 ^ v1)
                                           + popcount(x2 ^ v2)) << sh
                    first = False
                else:
                    for p in range(p_n):
                        x0, x1, x2 = s0[p], s1[p], s2[p]
                        acc0[p] += np.int32(popcount(x0 ^ w0) + popcount(x1 ^ w1)
                                            + popcount(x2 ^ w2)) << sh
                        acc1[p] += np.int32(popcount(x0 ^ v0) + popcount(x1 ^ v1)
                                            + popcount(x2 ^ v2)) << sh
    return acc


@numba.njit(cache=True, nogil=True)
def popcount_dot(rows, wp, base, out_scale, stride, h, ho, wo, acc, out):
    """Steps 2-4 of the module docstring for one sample:
    ``out[o, p] = (base[o, p] - 2 acc[o, p]) * out_scale[o]``.

    rows ``[pa, rw, (H+2) * Wo]`` (:func:`row_segments`), wp ``[O, pw, 3, rw]``
    (:func:`~xnorcdl.kernels.bitpack.pack_weight_rows`), base ``[O, P]`` (:func:`base_plane`),
    acc int32 ``[2, P]`` scratch, out float32 ``[O, P]``. base - 2 acc is an integer below 2^24,
    so computing it in float32 is exact and the single rounding is the final product, as in
    ``float32(A) * out_scale[o]``. Output channels go through :func:`pair_popcounts` in pairs;
    an odd last channel is paired with itself.
    """
    o_n = wp.shape[0]
    p_n = ho * wo
    starts = row_starts(stride, h, wo)
    two = np.float32(2.0)
    for oa in range(0, o_n, 2):
        ob = min(oa + 1, o_n - 1)
        pair_popcounts(rows, wp, oa, ob, starts, p_n, acc)
        for o in range(oa, ob + 1):
            ac = acc[o - oa]
            bo = base[o]
            s = out_scale[o]
            dst = out[o]
            for p in range(p_n):
                dst[p] = (bo[p] - two * np.float32(ac[p])) * s
    return out


@numba.njit(cache=True, nogil=True)
def bitconv_forward(x, bn_scale, bn_shift, bits, v0, wp, out_scale, stride, base, out):
    """BN -> quantize -> pack -> row segments -> popcount dot for each sample of x; base from
    :func:`base_plane` for this input size."""
    n_s, c_in, h, w = x.shape
    o_n, pw, _, rw = wp.shape
    ho = out.shape[2]
    wo = out.shape[3]
    act = np.empty((bits, (c_in + 63) // 64, h, w), np.uint64)
    rows = np.empty((bits, rw, (h + 2) * wo), np.uint64)
    acc = np.empty((2, ho * wo), np.int32)
    for n in range(n_s):
        pack_activations(x[n], bn_scale, bn_shift, bits, v0, act)
        row_segments(act, c_in, stride, wo, rows)
        popcount_dot(rows, wp, base, out_scale, stride, h, ho, wo, acc,
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
        w_codes, o_n, c_in, z = check_quant_conv(w_codes, out_scale, bn_scale, bn_shift, bits,
                                                 stride)
        self.w_codes = w_codes.astype(np.int8)
        self.bits, self.v0, self.stride = int(bits), float(v0), int(stride)
        self.out_channels, self.in_channels = int(o_n), int(c_in)
        self.wp = pack_weight_rows(self.w_codes, bits)            # [O, bits, 3, rw]
        self.corr = padding_corrections(self.w_codes, bits)       # [16, O]
        self.out_scale = np.ascontiguousarray(out_scale, dtype=np.float32)
        self.bn_scale = np.ascontiguousarray(bn_scale, dtype=np.float32)
        self.bn_shift = np.ascontiguousarray(bn_shift, dtype=np.float32)
        self.zzk = z * z * 9 * c_in          # Z^2 K
        self._bases = {}

    @property
    def row_words(self) -> int:
        return n_words(3 * self.in_channels)

    def output_shape(self, x_shape):
        n, _, h, w = x_shape
        s = self.stride
        return (n, self.out_channels, out_size(h, 3, s, 1), out_size(w, 3, s, 1))

    def __call__(self, x: np.ndarray, out: np.ndarray = None) -> np.ndarray:
        x = as_float32_nchw(x, self.in_channels)
        ho, wo, base = self.geometry(*x.shape[2:])
        if out is None:
            out = np.empty((x.shape[0], self.out_channels, ho, wo), np.float32)
        return bitconv_forward(x, self.bn_scale, self.bn_shift, self.bits, self.v0, self.wp,
                               self.out_scale, self.stride, base, out)

    def geometry(self, h: int, w: int):
        """(Ho, Wo, base plane) for inputs of h x w, built on first use of that size."""
        geo = self._bases.get((h, w))
        if geo is None:
            s = self.stride
            geo = self._bases[(h, w)] = (out_size(h, 3, s, 1), out_size(w, 3, s, 1),
                                         base_plane(self.corr, self.zzk, h, w, self.stride))
        return geo

    def base_plane(self, h: int, w: int) -> np.ndarray:
        """``Z^2 K - corr[case(p), o]`` for inputs of h x w."""
        return self.geometry(h, w)[2]


def as_float32_nchw(x, channels: int) -> np.ndarray:
    """x as a C-contiguous float32 ``[N, channels, H, W]`` array (no copy when it already is)."""
    if not (type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous):
        x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"x: expected float32 [N, {channels}, H, W], got shape {x.shape}")
    return x
