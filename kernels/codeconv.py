"""Direct 3x3 convolution over k-bit integer codes in exact int16/int32 SIMD arithmetic.

Shapes: x ``[N, C, H, W]`` float32 in, ``[N, O, Ho, Wo]`` out; stride s in {1, 2}, pad 1.

BN and the quantizer turn x into odd integer codes u (|u| <= Z = 2^p - 1 <= 15) stored as int16;
the zero padding is placed *after* quantization (code 0, contributing nothing, as the reference).
The integer sum ``A[o, p] = sum_c sum_t u_a u_w`` is accumulated exactly (int16 partial sums over
a few channels, int32 beyond, see :func:`stencil_dot`) and the output is
``float32(A) * out_scale[o]`` as in :func:`xnorcdl.kernels.reference.quant_conv`
(|A| <= Z^2 9C < 2^24 is checked at preparation, so float32(A) is exact too).

Layout, chosen so the inner loop is one long unit-stride loop that LLVM vectorizes:

* The padded code image ``[H+2, W+2]`` of each channel is split into s*s *phase images*,
  phase (a, b) holding the padded pixels (y, x) with y % s = a, x % s = b at
  ``[y // s, x // s]``, each ``[Hq, Wq]`` (Hq = ceil((H+2)/s), Wq = ceil((W+2)/s)), all flattened
  into one row per channel. For s = 1 this is just the padded image.
* Output pixel (oy, ox) is computed at flat position ``q = oy * Wq + ox``; tap (ky, kx) then
  reads phase (ky % s, kx % s) at ``q + (ky // s) * Wq + kx // s``, a fixed offset per tap. The
  loop runs over all q < Ho * Wq (the Wq - Wo extra columns per row are computed and dropped), so
  each (o, c) pair is one loop of nine multiply-adds per pixel.
* Indices are unsigned in the inner loop: Numba's negative-index wraparound check on signed
  indices would otherwise keep LLVM from vectorizing it.
"""
from __future__ import annotations

from .jit import numba
import numpy as np

from .quantize import batchnorm, kbit_level, kbit_step
from .shapes import check_quant_conv, out_size


GROUP = 8      # channels summed in int16 before widening (see stencil_dot)


def phase_geometry(h: int, w: int, stride: int):
    """(Hq, Wq, tap offsets [9], row length) of the phase images of a padded h x w image."""
    hq, wq = -(-(h + 2) // stride), -(-(w + 2) // stride)
    offs = np.array([((ky % stride) * stride + kx % stride) * hq * wq
                     + (ky // stride) * wq + kx // stride
                     for ky in range(3) for kx in range(3)], np.int64)
    return hq, wq, offs, stride * stride * hq * wq + wq + 2     # slack for the dropped columns


@numba.njit(cache=True, nogil=True)
def padded_codes(x, bn_scale, bn_shift, bits, v0, out):
    """BN + k-bit quantize x ``[C, H, W]`` into int16 codes u = 2q - Z at ``out[c, y+1, x+1]``
    of out ``[C, H+2, W+2]``, with a zero border (padding after quantization: code 0)."""
    c_in, h, w = x.shape
    z = np.int16((1 << bits) - 1)
    v0f = np.float32(v0)
    step = kbit_step(bits, v0)
    out[:] = 0
    for c in range(c_in):
        s = bn_scale[c]
        t = bn_shift[c]
        for y in range(h):
            src = x[c, y]
            dst = out[c, y + 1]
            for xx in range(w):
                q = np.int16(kbit_level(batchnorm(src[xx], s, t), v0f, step))
                dst[xx + 1] = np.int16(2) * q - z
    return out


@numba.njit(cache=True, nogil=True)
def to_phases(xp, stride, hq, wq, out):
    """Padded images ``[C, Hp, Wp]`` -> flattened phase images ``out [C, len]``: padded pixel
    (y, x) goes to phase (y % s, x % s) at (y // s, x // s); the rest of out is zeroed."""
    c_in, hp, wp = xp.shape
    plane = hq * wq
    out[:] = 0
    for c in range(c_in):
        dst = out[c]
        for y in range(hp):
            src = xp[c, y]
            for b in range(stride):
                base = np.uint64(((y % stride) * stride + b) * plane + (y // stride) * wq)
                for j in range((wp - b + stride - 1) // stride):
                    dst[base + np.uint64(j)] = src[b + j * stride]
    return out


@numba.njit(cache=True, nogil=True)
def stencil_dot(codes, w9, offs, n_q, acc, part):
    """``acc[o, q] = sum_c sum_t w9[o, c, t] * codes[c, offs[t] + q]`` for q < n_q.

    int16 codes and weights (|u| <= 15): the nine products of one channel sum to at most
    9 * 15^2 = 2025 in magnitude, a group of GROUP = 8 channels to at most 16200 < 2^15, so those
    partial sums are exact in int16 (``part``, 16 lanes per AVX2 vector) before they are widened
    and added into the int32 ``acc``.
    """
    c_in = codes.shape[0]
    o_n = w9.shape[0]
    t0, t1, t2 = np.uint64(offs[0]), np.uint64(offs[1]), np.uint64(offs[2])
    t3, t4, t5 = np.uint64(offs[3]), np.uint64(offs[4]), np.uint64(offs[5])
    t6, t7, t8 = np.uint64(offs[6]), np.uint64(offs[7]), np.uint64(offs[8])
    for o in range(o_n):
        a = acc[o]
        for q in range(n_q):
            a[q] = 0
        for c0 in range(0, c_in, GROUP):
            for q in range(n_q):
                part[q] = 0
            for c in range(c0, min(c0 + GROUP, c_in)):
                w = w9[o, c]
                w0, w1, w2, w3, w4, w5 = w[0], w[1], w[2], w[3], w[4], w[5]
                w6, w7, w8 = w[6], w[7], w[8]
                src = codes[c]
                for qi in range(n_q):
                    q = np.uint64(qi)
                    part[q] += np.int16(w0 * src[t0 + q] + w1 * src[t1 + q] + w2 * src[t2 + q]
                                        + w3 * src[t3 + q] + w4 * src[t4 + q] + w5 * src[t5 + q]
                                        + w6 * src[t6 + q] + w7 * src[t7 + q] + w8 * src[t8 + q])
            for q in range(n_q):
                a[q] += part[q]
    return acc


@numba.njit(cache=True, nogil=True)
def codeconv_forward(x, bn_scale, bn_shift, bits, v0, stride, w9, out_scale, hq, wq, offs,
                     src_len, out):
    n_s, c_in, h, w = x.shape
    o_n, ho, wo = out.shape[1:]
    n_q = ho * wq
    xp = np.empty((c_in, h + 2, w + 2), np.int16)
    codes = xp.reshape(c_in, (h + 2) * (w + 2))
    if stride != 1 or src_len != (h + 2) * (w + 2):
        codes = np.empty((c_in, src_len), np.int16)
    acc = np.empty((o_n, n_q), np.int32)
    part = np.empty(n_q, np.int16)
    for n in range(n_s):
        padded_codes(x[n], bn_scale, bn_shift, bits, v0, xp)
        if stride != 1 or src_len != (h + 2) * (w + 2):
            to_phases(xp, stride, hq, wq, codes)
        stencil_dot(codes, w9, offs, n_q, acc, part)
        for o in range(o_n):
            s = out_scale[o]
            for oy in range(ho):
                for ox in range(wo):
                    out[n, o, oy, ox] = np.float32(acc[o, oy * wq + ox]) * s
    return out


class CodeConv:
    """A prepared k-bit QuanConv (3x3, pad 1) computed directly on integer codes.

    Same arguments and result as :class:`xnorcdl.kernels.bitconv.BitConv` with bits = 2 or 4:
    ``conv(x) == reference.quant_conv(x, bn_scale, bn_shift, w_codes, out_scale, bits, v0,
    stride, 1)`` bit for bit.
    """

    def __init__(self, w_codes, out_scale, bn_scale, bn_shift, bits, v0=1.0, stride=1):
        if bits not in (2, 4):
            raise ValueError(f"bits: CodeConv takes 2 or 4, got {bits!r} (binary: BitConv)")
        w_codes, o_n, c_in, _ = check_quant_conv(w_codes, out_scale, bn_scale, bn_shift, bits,
                                                 stride)
        self.out_channels, self.in_channels = int(o_n), int(c_in)
        self.bits, self.v0, self.stride = int(bits), float(v0), int(stride)
        self.w9 = np.ascontiguousarray(w_codes.reshape(o_n, c_in, 9), dtype=np.int16)
        self.out_scale = np.ascontiguousarray(out_scale, dtype=np.float32)
        self.bn_scale = np.ascontiguousarray(bn_scale, dtype=np.float32)
        self.bn_shift = np.ascontiguousarray(bn_shift, dtype=np.float32)
        self._geometry = {}

    def output_shape(self, x_shape):
        n, _, h, w = x_shape
        s = self.stride
        return (n, self.out_channels, out_size(h, 3, s, 1), out_size(w, 3, s, 1))

    def __call__(self, x, out=None):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected float32 [N, {self.in_channels}, H, W], got shape "
                             f"{x.shape}")
        key = x.shape[2:]
        geo = self._geometry.get(key)
        if geo is None:
            geo = self._geometry[key] = phase_geometry(key[0], key[1], self.stride)
        hq, wq, offs, src_len = geo
        if out is None:
            out = np.empty(self.output_shape(x.shape), np.float32)
        return codeconv_forward(x, self.bn_scale, self.bn_shift, self.bits, self.v0, self.stride,
                                self.w9, self.out_scale, hq, wq, offs, src_len, out)
