"""A float32 cloud block in a few passes: ``relu(BN2(conv2(relu(BN1(conv1(x))))) + shortcut(x))``.

Shapes: x ``[N, C, H, W]``, conv1 C -> O (3x3, stride s, pad 1), conv2 O -> O (3x3, pad 1),
out ``[N, O, Ho, Wo]``.

BN's scale is folded into the weights, ``W'[o] = W[o] scale[o]``, and its shift is added in the
pass after each GEMM (``(W' x + shift[o])``, then ReLU or the residual). Around the GEMMs:

* **Stride 1: nine shifted GEMMs, no im2col.** The input is kept as ``xp [C, L]``, the
  zero-padded ``(H+2) x (W+2)`` image flattened (L = (H+2)(W+2) + 2; the border is written once,
  at allocation, and never again). Output pixel (oy, ox) at column ``q = oy (W+2) + ox`` of a
  ``[O, H (W+2)]`` plane then reads tap (ky, kx) at ``xp[c, q + ky (W+2) + kx]``: for each of
  the nine taps the whole input is one strided matrix ``xp[:, off : off + H (W+2)]`` (leading
  dimension L), so the conv is ``t = sum_tap W'_tap [O, C] xp_tap [C, H (W+2)]``, nine sgemm
  calls with beta = 1 after the first, per sample, reading the activations in place. The two
  columns per row past W are computed and never read (25 % more GEMM columns at 8 x 8); the
  im2col that this replaces copied 9C x H W values per conv in short rows, which cost a third
  of a block at 8 x 8 (window_rows: 20 us of 146 at batch 1 on a Xeon, two per block).
* **Direct convs where they fit** (``direct=True``, the fast backend's choice): a stride-1
  conv whose output rows are runs of 8 pixels and whose channels come in fours
  (:func:`~xnorcdl.kernels.directconv.supports`: every ResNet-32 conv at 32 x 32, 16 x 16 and
  8 x 8) runs as :func:`~xnorcdl.kernels.directconv.conv3x3_into` on the same padded flat images
  instead of the nine GEMMs: 4 channels x 16 pixels per register tile, no packing, nothing
  computed past W, its output in dense rows of W (``row = W`` below instead of W + 2).
* conv1's epilogue (:func:`relu_into_padded`) adds the shift and applies its ReLU while it
  writes conv2's padded input; conv2's epilogue (:func:`residual_relu`) adds the shift and the
  shortcut (identity, zero-pad ``x[:, o - pad, ::2, ::2]``, or a 1x1-conv GEMM's output) and
  applies the block's ReLU.
* A stride-2 conv1 runs as the same direct tiles where they fit
  (:func:`~xnorcdl.kernels.directconv.supports_stride2`: even input sides, an output the tiles
  cover) on the four phase images of the padded input
  (:func:`~xnorcdl.kernels.directconv.split_phases`; tap (ky, kx) of every output lies in
  phase (ky % 2, kx % 2) at a fixed offset, so each term's pixel runs are contiguous again):
  31 us less per sample on ResNet-32's 32 -> 64 block at 16 x 16 than the im2col + sgemm of
  64 x 64 x 288 (78 -> 47 us, Zen 5). Elsewhere it takes the ordinary im2col
  (:func:`im2col_pad1`, padding written inline) and one sgemm over the columns of up to
  :data:`CHUNK` samples (``t [O, N*Q] = W' cols [9C, N*Q]``).
  The 1x1-conv shortcut keeps its shift as a bias column against a row of ones.

With NumPy's own OpenBLAS at hand (:mod:`~xnorcdl.kernels.blas`), a chunk runs as one jitted
call (:func:`block_chunk`) that calls sgemm itself: one GIL release per block instead of a dozen
calls from Python. Otherwise the GEMMs go through ``np.matmul`` (the tap sums as ``t += W'_tap
xp_tap``, which is what sgemm's beta = 1 computes): the same sgemm calls, so the same bits,
except for products with one output row or column, where NumPy calls gemv.

Each output is a dot product over the same 9C terms as the reference's, summed in another order
(by sgemm, or by FMA in k order in the direct conv), so within the bound of ``FloatGemmConv``
(gamma_{9C+2}, any order).
"""
from __future__ import annotations

import numpy as np

from . import blas, directconv
from .jit import numba
from .shapes import out_size

#: samples per GEMM: enough columns for the sgemm to run near its best, few enough that a
#: block's cols buffers (about 0.4 MB per sample at 64 channels on 8 x 8) stay in L2
CHUNK = 4


@numba.njit(cache=True, nogil=True)
def im2col_pad1(x, stride, cols):
    """``cols[(c*3 + ky)*3 + kx, n, oy*Wo + ox] = x[n, c, oy*s + ky - 1, ox*s + kx - 1]``, 0 off
    the image; rows of cols past 9C are left untouched."""
    n_s, c_in, h, w = x.shape
    p_n = cols.shape[2]
    ho = (h - 1) // stride + 1
    wo = p_n // ho
    zero = np.float32(0.0)
    for n in range(n_s):
        xs = x[n].reshape(c_in * h * w)
        for c in range(c_in):
            for ky in range(3):
                for kx in range(3):
                    dst = cols[(c * 3 + ky) * 3 + kx, n]
                    for oy in range(ho):
                        yy = oy * stride + ky - 1
                        base = (c * h + yy) * w + kx - 1
                        for ox in range(wo):
                            xx = ox * stride + kx - 1
                            inside = 0 <= yy < h and 0 <= xx < w
                            dst[oy * wo + ox] = xs[base + ox * stride] if inside else zero
    return cols


@numba.njit(cache=True, nogil=True)
def pad_flat(x, xp):
    """x ``[N, C, H, W]`` into the interior of the padded flat images xp ``[N, C, L]``."""
    n_s, c_in, h, w = x.shape
    wp = w + 2
    for n in range(n_s):
        for c in range(c_in):
            dst = xp[n, c]
            for y in range(h):
                src = x[n, c, y]
                base = np.uint64((y + 1) * wp + 1)
                for xx in range(w):
                    dst[base + np.uint64(xx)] = src[xx]
    return xp


@numba.njit(cache=True, nogil=True)
def relu_into_padded(t, row, ho, wo, shift, xp):
    """``xp[n, o, (oy+1)(wo+2) + ox+1] = max(t[o, n, oy*row + ox] + shift[o], 0)``: conv1's BN
    shift and ReLU, written as conv2's padded input (t ``[O, N, >= ho*row]``)."""
    o_n, n_s, _ = t.shape
    wp = wo + 2
    zero = np.float32(0.0)
    for n in range(n_s):
        for o in range(o_n):
            src = t[o, n]
            dst = xp[n, o]
            b = shift[o]
            for oy in range(ho):
                d0 = np.uint64((oy + 1) * wp + 1)
                s0 = np.uint64(oy * row)
                for ox in range(wo):
                    dst[d0 + np.uint64(ox)] = max(src[s0 + np.uint64(ox)] + b, zero)
    return xp


@numba.njit(cache=True, nogil=True)
def residual_relu(t, row, shift, x, kind, pad_channels, given, out):
    """``out[n, o, oy, ox] = max((t[o, n, oy*row + ox] + shift[o]) + shortcut(x)[n, o, oy, ox],
    0)``; kind 0: identity, 1: zero-pad (output channel o is input channel o - pad at even rows
    and columns; the other channels add +0.0), 2: given (the shortcut conv's output,
    ``[O, N, Ho*Wo]``)."""
    n_s, o_n, ho, wo = out.shape
    c_in = x.shape[1]
    zero = np.float32(0.0)
    for n in range(n_s):
        for o in range(o_n):
            src = t[o, n]
            dst = out[n, o]
            b = shift[o]
            if kind == 0:
                sc = x[n, o]
                for oy in range(ho):
                    for ox in range(wo):
                        dst[oy, ox] = max((src[oy * row + ox] + b) + sc[oy, ox], zero)
            elif kind == 2:
                g = given[o, n]
                for oy in range(ho):
                    for ox in range(wo):
                        dst[oy, ox] = max((src[oy * row + ox] + b) + g[oy * wo + ox], zero)
            elif pad_channels <= o < pad_channels + c_in:
                sc = x[n, o - pad_channels]
                for oy in range(ho):
                    for ox in range(wo):
                        dst[oy, ox] = max((src[oy * row + ox] + b) + sc[2 * oy, 2 * ox], zero)
            else:
                for oy in range(ho):
                    for ox in range(wo):
                        dst[oy, ox] = max((src[oy * row + ox] + b) + zero, zero)
    return out


@numba.njit(cache=True, nogil=True)
def subsample2(x, cols):
    """The input of a 1x1 stride-2 conv: ``cols[c, n, oy*Wo + ox] = x[n, c, 2 oy, 2 ox]``."""
    n_s, c_in, h, w = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    for n in range(n_s):
        for c in range(c_in):
            dst = cols[c, n]
            for oy in range(ho):
                src = x[n, c, 2 * oy]
                for ox in range(wo):
                    dst[oy * wo + ox] = src[2 * ox]
    return cols


@numba.njit(cache=True, nogil=True)
def gemm_into(sgemm, w, cols, t):
    """``t[o, n, q] = sum_k w[o, k] cols[k, n, q]`` by the ctypes ``sgemm`` of
    :mod:`~xnorcdl.kernels.blas` (row-major, no transposes): the call ``np.matmul`` makes
    (except for a one-row or one-column product, which NumPy hands to gemv)."""
    o_n, k = w.shape
    nq = cols.shape[1] * cols.shape[2]
    sgemm(blas.ROW_MAJOR, blas.NO_TRANS, blas.NO_TRANS, o_n, nq, k, np.float32(1.0),
          w.ctypes.data, k, cols.ctypes.data, nq, np.float32(0.0), t.ctypes.data, nq)
    return t


@numba.njit(cache=True, nogil=True)
def taps_gemm_into(sgemm, w9, xp, h, w, t):
    """``t[o, n, oy (w+2) + ox] = sum_tap sum_c w9[tap, o, c] xp[n, c, off_tap + oy (w+2) +
    ox]`` (a stride-1 3x3 conv, before its shift): per sample, nine sgemm calls on the padded
    flat images read in place (leading dimension L), beta = 0 for the first tap, 1 after."""
    n_s, c_in, l_n = xp.shape
    o_n = w9.shape[1]
    q = h * (w + 2)
    ld = n_s * t.shape[2]
    offs = directconv.tap_offsets(w)
    for n in range(n_s):
        for tap in range(9):
            sgemm(blas.ROW_MAJOR, blas.NO_TRANS, blas.NO_TRANS, o_n, q, c_in, np.float32(1.0),
                  w9[tap].ctypes.data, c_in, xp[n].ctypes.data + 4 * int(offs[tap]), l_n,
                  np.float32(1.0 if tap else 0.0), t[0, n].ctypes.data, ld)
    return t


@numba.njit(cache=True, nogil=True)
def block_chunk(sgemm, x, stride, kind, pad_channels, w1, w1_taps, b1, w2_taps, b2, wsc, xp,
                cols1, cols_sc, t1, tp, t2, sc, row1, ho, wo, out, ap1, boff1, ap2, boff2, row2):
    """:meth:`CloudBlock._chunk` in one jitted call: every GEMM (conv1's nine or one, conv2's
    nine, the 1x1-conv shortcut's when ``wsc`` has rows) through ``sgemm``, except a stride-1
    conv whose term offsets ``boff`` are given (non-empty), which runs as
    :func:`~xnorcdl.kernels.directconv.conv3x3_into`, and a stride-2 conv1 with ``boff1``
    given, which runs as :func:`~xnorcdl.kernels.directconv.conv3x3_s2_into` on the phase
    images in ``xp``; the passes between them as there."""
    h, w = x.shape[2], x.shape[3]
    if stride == 1 and boff1.shape[0] > 0:
        directconv.conv3x3_into(ap1, boff1, pad_flat(x, xp), h, w, t1)
    elif stride == 1:
        taps_gemm_into(sgemm, w1_taps, pad_flat(x, xp), h, w, t1)
    elif boff1.shape[0] > 0:
        directconv.conv3x3_s2_into(ap1, boff1, directconv.split_phases(x, xp), ho, wo, t1)
    else:
        gemm_into(sgemm, w1, im2col_pad1(x, stride, cols1), t1)
    relu_into_padded(t1, row1, ho, wo, b1, tp)
    if boff2.shape[0] > 0:
        directconv.conv3x3_into(ap2, boff2, tp, ho, wo, t2)
    else:
        taps_gemm_into(sgemm, w2_taps, tp, ho, wo, t2)
    if wsc.shape[0] > 0:
        gemm_into(sgemm, wsc, subsample2(x, cols_sc), sc)
    residual_relu(t2, row2, b2, x, kind, pad_channels, sc, out)
    return out


def _scaled(weight, scale):
    """``W[o] scale[o]`` in float32, ``[O, C, kh, kw]``."""
    w = np.asarray(weight, np.float32)
    return w * np.asarray(scale, np.float32)[:, None, None, None]


def _taps(weight, scale):
    """The folded 3x3 weights as ``[9, O, C]``, tap t = 3 ky + kx."""
    w = _scaled(weight, scale)
    o_n, c_in = w.shape[:2]
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1).reshape(9, o_n, c_in))


def _folded(weight, scale, shift):
    """``[W[o] scale[o], shift[o]]`` as ``[O, K + 1]`` (the shift as a bias column)."""
    o_n = weight.shape[0]
    return np.ascontiguousarray(np.concatenate(
        [_scaled(weight, scale).reshape(o_n, -1), np.asarray(shift, np.float32)[:, None]],
        axis=1))


class CloudBlock:
    """``CloudBlock(w1, s1, t1, w2, s2, t2, stride, kind, pad_channels, shortcut=None)(x)``:
    weights ``[O, C, 3, 3]`` and ``[O, O, 3, 3]`` with their BN scales and shifts; kind
    ``identity``, ``zero_pad`` or ``conv1x1`` (``shortcut`` = (weight ``[O, C, 1, 1]``, scale,
    shift) of the stride-2 1x1 conv). ``direct=True``: the stride-1 convs whose shapes
    :func:`~xnorcdl.kernels.directconv.supports` run as the direct conv instead of nine
    GEMMs. Buffers are kept per input shape, so an instance is not for concurrent use."""

    def __init__(self, w1, s1, t1, w2, s2, t2, stride, kind, pad_channels=0, shortcut=None,
                 direct=False):
        self.in_channels, self.out_channels = int(w1.shape[1]), int(w1.shape[0])
        self.stride = int(stride)
        # stride 1: nine tap matrices; stride 2: one [O, 9C] matrix for the im2col
        self.w1_taps = _taps(w1, s1) if self.stride == 1 else np.zeros((9, 0, 0), np.float32)
        self.w1 = (np.zeros((0, 0), np.float32) if self.stride == 1 else
                   np.ascontiguousarray(_scaled(w1, s1).reshape(self.out_channels, -1)))
        self.w2_taps = _taps(w2, s2)
        self.b1, self.b2 = (np.ascontiguousarray(t, dtype=np.float32) for t in (t1, t2))
        self.kind = {"identity": 0, "zero_pad": 1, "conv1x1": 2}[kind]
        self.pad_channels = int(pad_channels)
        if (self.kind == 2) != (shortcut is not None):
            raise ValueError("a conv1x1 shortcut needs its (weight, scale, shift), others none")
        self.wsc = None if shortcut is None else _folded(*shortcut)
        self._buffers = {}
        self._sgemm = blas.sgemm()
        self._no_wsc = np.zeros((0, 1), np.float32)
        # the direct conv's packed weights, where its 4-channel tiles fit (else empty)
        self._no_ap = np.zeros((0, 0, directconv.ROWS), np.float32)
        self._no_boff = np.zeros(0, np.int64)
        direct = bool(direct) and self.out_channels % directconv.ROWS == 0
        if direct:          # both strides: stride 2 runs the tiles on phase images
            self.ap1 = directconv.pack(self.w1_taps if self.stride == 1 else _taps(w1, s1))
        else:
            self.ap1 = self._no_ap
        self.ap2 = directconv.pack(self.w2_taps) if direct else self._no_ap

    def _scratch(self, shape):
        buf = self._buffers.get(shape)
        if buf is None:
            buf = self._buffers[shape] = self.new_scratch(shape)
        return buf

    def new_scratch(self, shape):
        """The buffers and sizes :func:`block_chunk` takes for an input of ``shape`` (zero
        borders and the shortcut's row of ones written here, once)."""
        n, c, h, w = shape
        o, s = self.out_channels, self.stride
        ho, wo = out_size(h, 3, s, 1), out_size(w, 3, s, 1)
        b = {"ho": ho, "wo": wo, "boff1": self._no_boff, "boff2": self._no_boff}
        length_in, length_t = (h + 2) * (w + 2) + 2, (ho + 2) * (wo + 2) + 2
        direct1 = self.ap1.shape[0] > 0 and directconv.supports(o, h, w)
        if s == 1:      # conv1 on the padded input: direct (dense rows) or nine GEMMs
            b["xp"] = np.zeros((n, c, length_in), np.float32)
            b["cols1"] = np.zeros((1, 1, 1), np.float32)
            b["row1"] = wo if direct1 else wo + 2
            if direct1:
                b["boff1"] = directconv.offsets(c, h, w, length_in)
        elif self.ap1.shape[0] > 0 and directconv.supports_stride2(o, h, w):
            # conv1 by the direct tiles on the four phase images of the padded input
            b["xp"] = np.zeros((n, 4 * c, directconv.phase_length(ho, wo)), np.float32)
            b["cols1"] = np.zeros((1, 1, 1), np.float32)
            b["row1"] = wo
            b["boff1"] = directconv.phase_offsets(c, ho, wo)
        else:           # conv1 by im2col: output rows of wo
            b["xp"] = np.zeros((n, c, 1), np.float32)
            b["cols1"] = np.empty((9 * c, n, ho * wo), np.float32)
            b["row1"] = wo
        direct2 = self.ap2.shape[0] > 0 and directconv.supports(o, ho, wo)
        b["row2"] = wo if direct2 else wo + 2
        if direct2:
            b["boff2"] = directconv.offsets(o, ho, wo, length_t)
        b["t1"] = np.empty((o, n, ho * b["row1"]), np.float32)
        b["tp"] = np.zeros((n, o, length_t), np.float32)
        b["t2"] = np.empty((o, n, ho * b["row2"]), np.float32)
        b["cols_sc"] = np.zeros((1, 1, 1), np.float32)      # no 1x1-conv shortcut
        b["sc"] = np.zeros((1, 1, 1), np.float32)
        if self.wsc is not None:
            b["cols_sc"] = np.empty((c + 1, n, ho * wo), np.float32)
            b["cols_sc"][c] = 1.0                           # against the bias column
            b["sc"] = np.empty((o, n, ho * wo), np.float32)
        return b

    def __call__(self, x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected float32 [N, {self.in_channels}, H, W], got shape "
                             f"{x.shape}")
        n = x.shape[0]
        ho, wo = (out_size(side, 3, self.stride, 1) for side in x.shape[2:])
        out = np.empty((n, self.out_channels, ho, wo), np.float32)
        for a in range(0, n, CHUNK):
            self._chunk(x[a:a + CHUNK], out[a:a + CHUNK])
        return out

    def _chunk(self, x, out):
        """The block on at most CHUNK samples (the stride-2 im2col GEMM multiplies by all their
        columns at once; the stride-1 convs are nine GEMMs per sample)."""
        b = self._scratch(x.shape)
        ho, wo = b["ho"], b["wo"]
        wsc = self._no_wsc if self.wsc is None else self.wsc
        if self._sgemm is not None:
            return block_chunk(self._sgemm, x, self.stride, self.kind, self.pad_channels,
                               self.w1, self.w1_taps, self.b1, self.w2_taps, self.b2, wsc,
                               b["xp"], b["cols1"], b["cols_sc"], b["t1"], b["tp"], b["t2"],
                               b["sc"], b["row1"], ho, wo, out, self.ap1, b["boff1"],
                               self.ap2, b["boff2"], b["row2"])
        h, w = x.shape[2:]
        if self.stride == 1 and b["boff1"].shape[0] > 0:
            directconv.conv3x3_into(self.ap1, b["boff1"], pad_flat(x, b["xp"]), h, w, b["t1"])
        elif self.stride == 1:
            _taps_matmul(self.w1_taps, pad_flat(x, b["xp"]), h, w, b["t1"])
        elif b["boff1"].shape[0] > 0:
            directconv.conv3x3_s2_into(self.ap1, b["boff1"],
                                       directconv.split_phases(x, b["xp"]), ho, wo, b["t1"])
        else:
            _gemm(self.w1, im2col_pad1(x, self.stride, b["cols1"]), b["t1"])
        tp = relu_into_padded(b["t1"], b["row1"], ho, wo, self.b1, b["tp"])
        if b["boff2"].shape[0] > 0:
            directconv.conv3x3_into(self.ap2, b["boff2"], tp, ho, wo, b["t2"])
        else:
            _taps_matmul(self.w2_taps, tp, ho, wo, b["t2"])
        if self.wsc is not None:
            _gemm(self.wsc, subsample2(x, b["cols_sc"]), b["sc"])
        residual_relu(b["t2"], b["row2"], self.b2, x, self.kind, self.pad_channels, b["sc"],
                      out)
        return out


def _gemm(w, cols, t):
    """``t[o, n, q] = sum_k w[o, k] cols[k, n, q]``: one sgemm over the columns of all n."""
    k, n, q = cols.shape
    np.matmul(w, cols.reshape(k, n * q), out=t.reshape(t.shape[0], n * q))
    return t


def _taps_matmul(w9, xp, h, w, t):
    """:func:`taps_gemm_into` through ``np.matmul``: ``t = W'_0 xp_0``, then ``t += W'_tap
    xp_tap`` (sgemm's beta = 1 adds each product to t with one rounding, as here)."""
    q = h * (w + 2)
    offs = directconv.tap_offsets(w)
    for n in range(xp.shape[0]):
        dst = t[:, n, :q]
        np.matmul(w9[0], xp[n, :, offs[0]:offs[0] + q], out=dst)
        for tap in range(1, 9):
            dst += np.matmul(w9[tap], xp[n, :, offs[tap]:offs[tap] + q])
    return t
