"""Convolution as im2col + one float32 GEMM (NumPy's BLAS, or the edge's fixed-order sum).

Shapes: x ``[N, C, H, W]`` float32, weights ``[O, C, k, k]``, Hp = H + 2 pad, K = C k k,
P = Ho Wo. The padded image ``[N, C, Hp, Wp]`` is copied once, then ``cols [N, K(+1), P]`` with
rows ordered (c, ky, kx) like ``w.reshape(O, K)``, then ``out[n] = Wmat @ cols[n]`` (``np.matmul``,
one BLAS sgemm per sample, or :func:`~xnorcdl.kernels.ordered.ordered_gemm`). The padded image and cols buffers are kept per input shape and
reused across calls (an instance is therefore not for concurrent use from several threads).

* :class:`FloatGemmConv`: the float32 conv + BN of cloud layers (BLAS) and of the stem and the
  edge 1x1 shortcuts (fixed summation order, :mod:`xnorcdl.kernels.ordered`).
* :class:`CodeGemmConv`: a QuanConv computed exactly as a float32 GEMM over integer codes.
"""
from __future__ import annotations

from .jit import numba
import numpy as np

from .ordered import ordered_gemm
from .quantize import batchnorm, kbit_level, kbit_step
from .shapes import check_quant_conv, out_size


@numba.njit(cache=True, nogil=True)
def pad_images(x, pad, out):
    """x ``[N, C, H, W]`` -> out ``[N, C, H+2p, W+2p]``, zero border."""
    n_s, c_in, h, w = x.shape
    out[:] = 0
    for n in range(n_s):
        for c in range(c_in):
            for y in range(h):
                out[n, c, y + pad, pad:pad + w] = x[n, c, y]
    return out


@numba.njit(cache=True, nogil=True)
def pad_codes(x, bn_scale, bn_shift, bits, v0, out):
    """BN and k-bit quantize x ``[N, C, H, W]`` into float32 codes u = 2q - Z with a zero border
    of 1 (``out [N, C, H+2, W+2]``): padding is applied after quantization, so it is code 0."""
    n_s, c_in, h, w = x.shape
    z = (1 << bits) - 1
    v0f = np.float32(v0)
    step = kbit_step(bits, v0)
    out[:] = 0
    for n in range(n_s):
        for c in range(c_in):
            s = bn_scale[c]
            t = bn_shift[c]
            for y in range(h):
                src = x[n, c, y]
                dst = out[n, c, y + 1]
                for xx in range(w):
                    q = kbit_level(batchnorm(src[xx], s, t), v0f, step)
                    dst[xx + 1] = np.float32(2 * q - z)
    return out


@numba.njit(cache=True, nogil=True)
def im2col(xp, k, stride, ho, wo, cols):
    """Padded images ``[N, C, Hp, Wp]`` -> ``cols[n, (c*k + ky)*k + kx, oy*Wo + ox] =
    xp[n, c, oy*s + ky, ox*s + kx]``; rows of cols past C k k are left untouched."""
    n_s, c_in = xp.shape[:2]
    for n in range(n_s):
        for c in range(c_in):
            for ky in range(k):
                for kx in range(k):
                    dst = cols[n, (c * k + ky) * k + kx]
                    for oy in range(ho):
                        src = xp[n, c, oy * stride + ky, kx:]
                        row = dst[oy * wo:oy * wo + wo]
                        if stride == 1:          # separate loops: each has a constant stride
                            for ox in range(wo):
                                row[ox] = src[ox]
                        else:
                            for ox in range(wo):
                                row[ox] = src[ox * stride]
    return cols


@numba.njit(cache=True, nogil=True)
def affine_channels(y, scale, shift, relu):
    """In place ``y[n, o, :] = y * scale[o] + shift[o]`` in float32 (the reference BN), then
    ``max(y, 0)`` when relu; y ``[N, O, P]``."""
    n_s, o_n, p_n = y.shape
    zero = np.float32(0.0)
    for n in range(n_s):
        for o in range(o_n):
            s = scale[o]
            t = shift[o]
            row = y[n, o]
            for p in range(p_n):
                v = batchnorm(row[p], s, t)
                row[p] = max(v, zero) if relu else v
    return y


@numba.njit(cache=True, nogil=True)
def scale_channels(y, scale, relu):
    """In place ``y[n, o, :] *= scale[o]`` (float32), then ``max(y, 0)`` when relu."""
    n_s, o_n, p_n = y.shape
    zero = np.float32(0.0)
    for n in range(n_s):
        for o in range(o_n):
            s = scale[o]
            row = y[n, o]
            for p in range(p_n):
                v = row[p] * s
                row[p] = max(v, zero) if relu else v
    return y


class _GemmConv:
    """Shared buffers and the GEMM; subclasses fill the padded image and finish the output."""

    def __init__(self, out_channels, in_channels, k, stride, pad, bias_row):
        self.out_channels, self.in_channels = int(out_channels), int(in_channels)
        self.k, self.stride, self.pad = int(k), int(stride), int(pad)
        self.bias_row = bool(bias_row)
        self._buffers = {}

    def output_shape(self, x_shape):
        n, _, h, w = x_shape
        return (n, self.out_channels, out_size(h, self.k, self.stride, self.pad),
                out_size(w, self.k, self.stride, self.pad))

    def _check(self, x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected float32 [N, {self.in_channels}, H, W], got shape "
                             f"{x.shape}")
        return x

    def _scratch(self, shape):
        buf = self._buffers.get(shape)
        if buf is None:
            n, c, h, w = shape
            _, _, ho, wo = self.output_shape(shape)
            kk = c * self.k * self.k
            cols = np.empty((n, kk + self.bias_row, ho * wo), np.float32)
            if self.bias_row:
                cols[:, kk] = 1.0       # the row of ones that multiplies the bias column
            xp = np.empty((n, c, h + 2 * self.pad, w + 2 * self.pad), np.float32)
            buf = self._buffers[shape] = (xp, cols)
        return buf

    def _gemm(self, xp, cols, wmat, x_shape, out, ordered=False):
        n, o_n, ho, wo = self.output_shape(x_shape)
        im2col(xp, self.k, self.stride, ho, wo, cols)
        if out is None:
            out = np.empty((n, o_n, ho, wo), np.float32)
        if ordered:
            ordered_gemm(wmat, cols, out.reshape(n, o_n, ho * wo))
        else:
            np.matmul(wmat, cols, out=out.reshape(n, o_n, ho * wo))
        return out


class FloatGemmConv(_GemmConv):
    """float32 ``BN(conv(x, weight))`` with BN per output channel (``scale``, ``shift`` [O]).

    ``fold_bn=True`` (cloud layers): BN is folded at preparation, ``W'[o] = W[o] * scale[o]``
    and the bias ``shift[o]`` rides in the GEMM as an extra column against a row of ones, so a
    call is one im2col and one sgemm (plus ReLU if asked).

    ``fold_bn=False`` (the stem and edge 1x1 shortcuts): the unscaled weights, the taps summed in
    the fixed order of :func:`xnorcdl.kernels.reference.ordered_matmul`
    (:func:`~xnorcdl.kernels.ordered.ordered_gemm`), then BN as ``y * scale + shift`` in float32:
    the reference's ``float_conv_bn(..., ordered=True)`` bit for bit on every machine, so the
    quantized layers after it see identical inputs.

    Tolerance of the folded form against ``reference.float_conv_bn``: both are float32 dot
    products of length K (K + 1 here) summed in different orders, and the fold rounds
    ``W scale`` once more. With u = 2^-24, each result is within ``gamma_{K+2} (|scale| sum
    |W||x| + |shift|)`` of the exact value (gamma_n = n u / (1 - n u), the standard bound for
    recursive summation, which blocked BLAS sums also satisfy), so the two differ by at most twice
    that; the tests use exactly this bound.
    """

    def __init__(self, weight, bn_scale, bn_shift, stride=1, pad=1, fold_bn=True):
        weight = np.asarray(weight, dtype=np.float32)
        if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
            raise ValueError(f"weight: expected [O, C, k, k], got shape {weight.shape}")
        o_n, c_in, k, _ = weight.shape
        for name, arr in (("bn_scale", bn_scale), ("bn_shift", bn_shift)):
            if np.shape(arr) != (o_n,):
                raise ValueError(f"{name}: expected shape ({o_n},), got {np.shape(arr)}")
        super().__init__(o_n, c_in, k, stride, pad, bias_row=fold_bn)
        self.fold_bn = bool(fold_bn)
        self.bn_scale = np.ascontiguousarray(bn_scale, dtype=np.float32)
        self.bn_shift = np.ascontiguousarray(bn_shift, dtype=np.float32)
        w2 = weight.reshape(o_n, c_in * k * k)
        if fold_bn:
            self.wmat = np.ascontiguousarray(
                np.concatenate([w2 * self.bn_scale[:, None], self.bn_shift[:, None]], axis=1))
        else:
            self.wmat = np.ascontiguousarray(w2)

    def __call__(self, x, relu=False, out=None):
        x = self._check(x)
        xp, cols = self._scratch(x.shape)
        pad_images(x, self.pad, xp)
        return self.run_padded(xp, cols, x.shape, relu, out)

    def padded_input(self, x_shape):
        """The (padded image, cols) scratch for inputs of ``x_shape``: a caller that builds the
        padded input itself (e.g. normalizing images into it) then calls :meth:`run_padded`."""
        return self._scratch(tuple(x_shape))

    def run_padded(self, xp, cols, x_shape, relu=False, out=None):
        out = self._gemm(xp, cols, self.wmat, x_shape, out, ordered=not self.fold_bn)
        y = out.reshape(out.shape[0], out.shape[1], -1)
        if not self.fold_bn:
            affine_channels(y, self.bn_scale, self.bn_shift, relu)
        elif relu:
            np.maximum(out, 0, out=out)
        return out


class CodeGemmConv(_GemmConv):
    """A QuanConv (3x3, pad 1) as a float32 GEMM over the integer codes.

    BN and the k-bit quantizer write codes u (odd integers, |u| <= Z) into the padded image as
    float32, the weight codes are a float32 matrix, and one sgemm sums ``u_a u_w`` over the K taps.
    Every product and every partial sum is an integer of magnitude <= Z^2 K, and float32
    represents every integer below 2^24 exactly, so whatever order BLAS sums in, the result is
    the exact integer sum when Z^2 K < 2^24 (K = 9C; C <= 8285 at 4 bits), checked here.
    Then ``out = sum * out_scale[o]`` in float32, as the reference's ``float32(acc) * s``.
    """

    def __init__(self, w_codes, out_scale, bn_scale, bn_shift, bits, v0=1.0, stride=1):
        if bits == 1:
            raise ValueError("CodeGemmConv takes 2- or 4-bit codes; binary layers use BitConv")
        w_codes, o_n, c_in, _ = check_quant_conv(w_codes, out_scale, bn_scale, bn_shift, bits,
                                                 None)
        super().__init__(o_n, c_in, 3, stride, 1, bias_row=False)
        self.bits, self.v0 = int(bits), float(v0)
        self.wmat = np.ascontiguousarray(w_codes.reshape(o_n, c_in * 9), dtype=np.float32)
        self.out_scale = np.ascontiguousarray(out_scale, dtype=np.float32)
        self.bn_scale = np.ascontiguousarray(bn_scale, dtype=np.float32)
        self.bn_shift = np.ascontiguousarray(bn_shift, dtype=np.float32)

    def __call__(self, x, out=None):
        x = self._check(x)
        xp, cols = self._scratch(x.shape)
        pad_codes(x, self.bn_scale, self.bn_shift, self.bits, self.v0, xp)
        out = self._gemm(xp, cols, self.wmat, x.shape, out)
        scale_channels(out.reshape(out.shape[0], out.shape[1], -1), self.out_scale, False)
        return out
