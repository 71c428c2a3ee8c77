"""A float32 cloud block in a few passes: ``relu(BN2(conv2(relu(BN1(conv1(x))))) + shortcut(x))``.

Shapes: x ``[N, C, H, W]``, conv1 C -> O (3x3, stride s, pad 1), conv2 O -> O (3x3, pad 1),
out ``[N, O, Ho, Wo]``; K = 9C + 1 (conv1) or 9O + 1 (conv2).

As :class:`~xnorcdl.kernels.gemmconv.FloatGemmConv` with BN folded, each conv is a GEMM with
``W'[o] = [W[o] scale[o], shift[o]]`` (the shift as a bias column against a row of ones), here
one sgemm over the columns of up to :data:`CHUNK` samples at once, ``t [O, N*Q] = W' cols [K,
N*Q]`` (cols laid out ``[K, N, Q]``): a wider GEMM runs closer to the sgemm's best than one per
sample, and each output element is still one dot product over the same K. Around the GEMMs:

* **Padded flat images.** A stride-1 conv's input is kept as ``xp [C, L]``, the zero-padded
  ``(H+2) x (W+2)`` image flattened (L = (H+2)(W+2) + 2, the border written once, at
  allocation, and never again), so its 3x3 windows need no bounds tests: row
  ``9c + 3ky + kx`` of cols holds ``xp[c, (oy + ky)(W+2) + ox + kx]`` at column
  ``oy W + ox``, one contiguous copy of W values per (c, ky, kx, oy) (:func:`window_rows`).
  (One copy of H (W+2) values per (c, ky, kx) would be cheaper to build but computes the 2
  padding columns of every row too: at 8 x 8, 25 % more GEMM work; the block ran 16 % slower
  that way.)
* conv1's epilogue (:func:`relu_into_padded`) applies its ReLU while it writes conv2's padded
  input; conv2's epilogue (:func:`residual_relu`) adds the shortcut (identity, zero-pad
  ``x[:, o - pad, ::2, ::2]``, or a 1x1-conv GEMM's output) and applies the block's ReLU.
* A stride-2 conv1 takes the ordinary im2col (:func:`im2col_pad1`, padding written inline).

With NumPy's own OpenBLAS at hand (:mod:`~xnorcdl.kernels.blas`), a chunk runs as one jitted
call (:func:`block_chunk`) that calls sgemm itself: one GIL release per block instead of seven
calls from Python. Otherwise the GEMMs go through ``np.matmul``: the same sgemm call, so the
same bits, except for products with one output row or column, where NumPy calls gemv.

The values are those of the per-layer folded path: the same products, summed by the same sgemm
over the same K, so within the bound of ``FloatGemmConv`` of the reference.
"""
from __future__ import annotations

import numpy as np

from . import blas
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
def window_rows(xp, h, w, cols):
    """``cols[9c + 3ky + kx, n, oy*w + ox] = xp[n, c, (oy + ky)(w + 2) + ox + kx]``: the 3x3
    windows of the padded flat images as GEMM columns without the padding columns (one short
    contiguous copy per channel, tap and output row); rows past 9C are left untouched."""
    n_s, c_in, _ = xp.shape
    wp = w + 2
    for n in range(n_s):
        for c in range(c_in):
            src = xp[n, c]
            for t in range(9):
                dst = cols[9 * c + t, n]
                off = (t // 3) * wp + t % 3
                for oy in range(h):
                    s0 = np.uint64(off + oy * wp)
                    d0 = np.uint64(oy * w)
                    for ox in range(w):
                        dst[d0 + np.uint64(ox)] = src[s0 + np.uint64(ox)]
    return cols


@numba.njit(cache=True, nogil=True)
def relu_into_padded(t, row, ho, wo, xp):
    """``xp[n, o, (oy+1)(wo+2) + ox+1] = max(t[o, n, oy*row + ox], 0)``: conv1's ReLU, written
    as conv2's padded input (t ``[O, N, >= ho*row]``)."""
    o_n, n_s, _ = t.shape
    wp = wo + 2
    zero = np.float32(0.0)
    for n in range(n_s):
        for o in range(o_n):
            src = t[o, n]
            dst = xp[n, o]
            for oy in range(ho):
                d0 = np.uint64((oy + 1) * wp + 1)
                s0 = np.uint64(oy * row)
                for ox in range(wo):
                    dst[d0 + np.uint64(ox)] = max(src[s0 + np.uint64(ox)], zero)
    return xp


@numba.njit(cache=True, nogil=True)
def residual_relu(t, row, x, kind, pad_channels, given, out):
    """``out[n, o, oy, ox] = max(t[o, n, oy*row + ox] + shortcut(x)[n, o, oy, ox], 0)``; kind 0:
    identity, 1: zero-pad (output channel o is input channel o - pad at even rows and columns;
    the other channels add +0.0), 2: given (the shortcut conv's output, ``[O, N, Ho*Wo]``)."""
    n_s, o_n, ho, wo = out.shape
    c_in = x.shape[1]
    zero = np.float32(0.0)
    for n in range(n_s):
        for o in range(o_n):
            src = t[o, n]
            dst = out[n, o]
            if kind == 0:
                sc = x[n, o]
                for oy in range(ho):
                    for ox in range(wo):
                        dst[oy, ox] = max(src[oy * row + ox] + sc[oy, ox], zero)
            elif kind == 2:
                g = given[o, n]
                for oy in range(ho):
                    for ox in range(wo):
                        dst[oy, ox] = max(src[oy * row + ox] + g[oy * wo + ox], zero)
            elif pad_channels <= o < pad_channels + c_in:
                sc = x[n, o - pad_channels]
                for oy in range(ho):
                    for ox in range(wo):
                        dst[oy, ox] = max(src[oy * row + ox] + sc[2 * oy, 2 * ox], zero)
            else:
                for oy in range(ho):
                    for ox in range(wo):
                        dst[oy, ox] = max(src[oy * row + ox] + zero, zero)
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
def conv1_input(x, stride, xp, cols1, cols_sc):
    """conv1's cols from the block input x: stride 1 through the padded flat images xp
    (:func:`pad_flat`, :func:`window_rows`), stride 2 by :func:`im2col_pad1`; and the stride-2
    samples of a 1x1-conv shortcut into cols_sc when it has rows (``[C+1, N, P]``)."""
    if stride == 1:
        window_rows(pad_flat(x, xp), x.shape[2], x.shape[3], cols1)
    else:
        im2col_pad1(x, stride, cols1)
    if cols_sc.shape[0] > 1:
        subsample2(x, cols_sc)
    return cols1


@numba.njit(cache=True, nogil=True)
def conv2_input(t1, row, ho, wo, tp, cols2):
    """conv2's cols from conv1's GEMM output: ReLU into the padded flat images tp
    (:func:`relu_into_padded`), then :func:`window_rows`."""
    return window_rows(relu_into_padded(t1, row, ho, wo, tp), ho, wo, cols2)


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
def block_chunk(sgemm, x, stride, kind, pad_channels, w1, w2, wsc, xp, cols1, cols_sc, t1, tp,
                cols2, t2, sc, row1, ho, wo, out):
    """:meth:`CloudBlock._chunk` in one jitted call: both GEMMs (and the 1x1-conv shortcut's,
    when ``wsc`` has rows) through ``sgemm``, the passes between them as there."""
    conv1_input(x, stride, xp, cols1, cols_sc)
    gemm_into(sgemm, w1, cols1, t1)
    conv2_input(t1, row1, ho, wo, tp, cols2)
    gemm_into(sgemm, w2, cols2, t2)
    if wsc.shape[0] > 0:
        gemm_into(sgemm, wsc, cols_sc, sc)
        residual_relu(t2, wo, x, kind, pad_channels, sc, out)
    else:
        residual_relu(t2, wo, x, kind, pad_channels, t2, out)
    return out


def _folded(weight, scale, shift):
    o_n = weight.shape[0]
    w2 = np.asarray(weight, np.float32).reshape(o_n, -1)
    return np.ascontiguousarray(np.concatenate(
        [w2 * np.asarray(scale, np.float32)[:, None], np.asarray(shift, np.float32)[:, None]],
        axis=1))


def _with_ones(shape, k):
    """An uninitialised float32 cols buffer ``[K, N, Q]`` whose row k is ones (against the bias
    column)."""
    cols = np.empty(shape, np.float32)
    cols[k] = 1.0
    return cols


class CloudBlock:
    """``CloudBlock(w1, s1, t1, w2, s2, t2, stride, kind, pad_channels, shortcut=None)(x)``:
    weights ``[O, C, 3, 3]`` and ``[O, O, 3, 3]`` with their BN scales and shifts; kind
    ``identity``, ``zero_pad`` or ``conv1x1`` (``shortcut`` = (weight ``[O, C, 1, 1]``, scale,
    shift) of the stride-2 1x1 conv). Buffers are kept per input shape, so an instance is not
    for concurrent use."""

    def __init__(self, w1, s1, t1, w2, s2, t2, stride, kind, pad_channels=0, shortcut=None):
        self.w1, self.w2 = _folded(w1, s1, t1), _folded(w2, s2, t2)
        self.in_channels, self.out_channels = int(w1.shape[1]), int(w1.shape[0])
        self.stride = int(stride)
        self.kind = {"identity": 0, "zero_pad": 1, "conv1x1": 2}[kind]
        self.pad_channels = int(pad_channels)
        if (self.kind == 2) != (shortcut is not None):
            raise ValueError("a conv1x1 shortcut needs its (weight, scale, shift), others none")
        self.wsc = None if shortcut is None else _folded(*shortcut)
        self._buffers = {}
        self._sgemm = blas.sgemm()
        self._no_wsc = np.zeros((0, 1), np.float32)

    def _scratch(self, shape):
        buf = self._buffers.get(shape)
        if buf is None:
            n, c, h, w = shape
            o, s = self.out_channels, self.stride
            ho, wo = out_size(h, 3, s, 1), out_size(w, 3, s, 1)
            q2 = ho * wo                             # conv2's GEMM width
            b = {"ho": ho, "wo": wo, "q2": q2}
            b["xp"] = np.zeros((n, c, 1), np.float32)          # unused for stride 2
            b["cols_sc"] = np.zeros((1, 1, 1), np.float32)      # no 1x1-conv shortcut
            b["row1"] = wo
            if s == 1:
                b["xp"] = np.zeros((n, c, (h + 2) * (w + 2) + 2), np.float32)
            b["cols1"] = _with_ones((9 * c + 1, n, ho * wo), 9 * c)
            b["t1"] = np.empty((o, n, b["cols1"].shape[2]), np.float32)
            b["tp"] = np.zeros((n, o, (ho + 2) * (wo + 2) + 2), np.float32)
            b["cols2"] = _with_ones((9 * o + 1, n, q2), 9 * o)
            b["t2"] = np.empty((o, n, q2), np.float32)
            b["sc"] = np.zeros((1, 1, 1), np.float32)
            if self.wsc is not None:
                b["cols_sc"] = _with_ones((c + 1, n, ho * wo), c)
                b["sc"] = np.empty((o, n, ho * wo), np.float32)
            buf = self._buffers[shape] = b
        return buf

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
        """The block on at most CHUNK samples: each GEMM multiplies by all their columns."""
        b = self._scratch(x.shape)
        ho, wo, o = b["ho"], b["wo"], self.out_channels
        if self._sgemm is not None:
            return block_chunk(self._sgemm, x, self.stride, self.kind, self.pad_channels,
                               self.w1, self.w2, self._no_wsc if self.wsc is None else self.wsc,
                               b["xp"], b["cols1"], b["cols_sc"], b["t1"], b["tp"], b["cols2"],
                               b["t2"], b["sc"], b["row1"], ho, wo, out)
        conv1_input(x, self.stride, b["xp"], b["cols1"], b["cols_sc"])
        _gemm(self.w1, b["cols1"], b["t1"])
        conv2_input(b["t1"], b["row1"], ho, wo, b["tp"], b["cols2"])
        _gemm(self.w2, b["cols2"], b["t2"])
        given = b["t2"]
        if self.wsc is not None:
            given = _gemm(self.wsc, b["cols_sc"], b["sc"])
        residual_relu(b["t2"], wo, x, self.kind, self.pad_channels, given, out)
        return out


def _gemm(w, cols, t):
    """``t[o, n, q] = sum_k w[o, k] cols[k, n, q]``: one sgemm over the columns of all n."""
    k, n, q = cols.shape
    np.matmul(w, cols.reshape(k, n * q), out=t.reshape(t.shape[0], n * q))
    return t
