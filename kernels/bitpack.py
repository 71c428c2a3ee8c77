"""Bit packing: the one place the packing convention is stated.

Convention (every packed operand in xnorcdl follows it):

* A packed **word** is a ``uint64``. A sign code ``u`` in {-1, +1} is one bit, **set when u = -1**
  (a negative value), clear when u = +1; so sign(0) = +1 is a clear bit.
* Channels are packed **along the channel axis, LSB-first**: channel ``c`` of a pixel is bit
  ``c % 64`` of word ``c // 64`` of that pixel (``n_words(C)`` words per pixel).
* **Pad bits are zero in both operands**: bits at positions >= C in the last word are clear in
  activations and in weights, so they XOR to 0 and never reach a popcount.

With that convention the dot product of two K-long sign vectors a, w packed into words A, W is

    sum_k a_k w_k = (#agreeing positions) - (#disagreeing positions)
                  = (K - popcount(A XOR W)) - popcount(A XOR W) = K - 2 popcount(A XOR W),

because a_k w_k = +1 exactly when the two bits agree and -1 when they differ.

**k-bit codes as bit planes.** A p-bit code is the odd integer ``u = 2q - Z`` (Z = 2^p - 1,
q in 0..Z, :mod:`~xnorcdl.kernels.quantize`). Writing q = sum_i 2^i b_i (b_i in {0, 1}),

    u = 2 sum_i 2^i b_i - sum_i 2^i = sum_i 2^i (2 b_i - 1) = sum_i 2^i s_i,   s_i in {-1, +1},

so a p-bit code is p sign planes with weights 2^i, and plane i packs ``s_i`` with the convention
above (bit set when b_i = 0). A product of codes is then a weighted sum of sign products,
``u_a u_w = sum_{i,j} 2^(i+j) s_ai s_wj``, each of which an XOR and a popcount computes.
A binary code is the one-plane case (p = 1, Z = 1, u = s_0).

**Storage of activations for a 3x3 convolution** (:func:`pack_activations`): ``[planes, cw, H,
W]`` uint64, i.e. word j of pixel (y, x) of plane i is ``out[i, j, y, x]``. Each word is
channel-packed (channels-last inside the word); the word index is the outer axis so that a plane
of words is contiguous over pixels, which lets packing and the convolution loops run over pixels
with unit stride.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .irloop import accumulate, splat
from .jit import numba, target_has
from .quantize import batchnorm, kbit_level, kbit_step, levels

WORD_BITS = 64


def n_words(nbits: int) -> int:
    """Words needed for ``nbits`` bits: ceil(nbits / 64)."""
    return (int(nbits) + WORD_BITS - 1) // WORD_BITS


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean array ``[..., n]`` along its last axis into ``uint64 [..., n_words(n)]``,
    bit k of the row going to bit k % 64 of word k // 64 (LSB-first), pad bits zero."""
    bits = np.asarray(bits, dtype=bool)
    n = bits.shape[-1]
    padded = np.zeros(bits.shape[:-1] + (n_words(n) * WORD_BITS,), dtype=bool)
    padded[..., :n] = bits
    # np.packbits is MSB-first unless told otherwise; little bit order puts bit k at 2^(k % 8) of
    # byte k // 8, and reading 8 bytes as a little-endian uint64 then puts it at 2^(k % 64).
    packed = np.packbits(padded, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64)


def unpack_bits(words: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``uint64 [..., w]`` -> boolean ``[..., n]``."""
    words = np.ascontiguousarray(words, dtype="<u8")
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    return bits[..., :n].astype(bool)


def pack_channels(codes: np.ndarray) -> np.ndarray:
    """Sign codes ``[..., C]`` in {-1, +1} (channels last) -> ``uint64 [..., n_words(C)]``:
    the convention itself, bit set where the code is -1."""
    return pack_bits(np.asarray(codes) < 0)


def unpack_channels(words: np.ndarray, channels: int) -> np.ndarray:
    """``uint64 [..., n_words(C)]`` -> int8 sign codes ``[..., C]``."""
    return np.where(unpack_bits(words, channels), np.int8(-1), np.int8(1))


def sign_planes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Odd codes u of a ``bits``-bit quantizer -> int8 sign planes ``s [bits, ...]`` with
    u = sum_i 2^i s[i] (see the module docstring); for bits = 1, ``s[0] = u``."""
    u = np.asarray(codes).astype(np.int64)
    z = levels(bits)
    if np.any((u < -z) | (u > z) | ((u + z) % 2 != 0)):
        raise ValueError(f"codes must be odd integers in [-{z}, {z}] for {bits}-bit planes")
    q = (u + z) // 2
    return np.stack([np.where((q >> i) & 1, 1, -1).astype(np.int8) for i in range(bits)])


def pack_weight_rows(w_codes: np.ndarray, bits: int) -> np.ndarray:
    """Weights of a 3x3 conv, codes ``[O, C, 3, 3]`` -> ``uint64 [O, bits, 3, rw]``.

    For output channel o, plane j and kernel row r, the 3C-bit *row segment* holds tap (r, kx)
    channel c at bit ``kx * C + c`` (taps left to right, each C channels LSB-first), in
    ``rw = n_words(3 C)`` words; :func:`xnorcdl.kernels.bitconv.row_segments` lays out the
    activations the same way.
    """
    w_codes = np.asarray(w_codes)
    o, c, kh, kw = w_codes.shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"expected 3x3 weights, got {kh}x{kw}")
    planes = sign_planes(w_codes, bits)                                  # [bits, O, C, 3, 3]
    rows = planes.transpose(1, 0, 3, 4, 2).reshape(o, bits, 3, 3 * c)    # [O, bits, r, kx*C + c]
    return pack_channels(rows)


#: float32 lanes per vector (16 on AVX-512, 8 elsewhere) and vectors per tile of
#: :func:`_sign_tile`: each channel's row is read a few cache lines at a time
SIGN_LANES = 16 if target_has("avx512f") else 8
SIGN_VECS = 4
SIGN_TILE = SIGN_LANES * SIGN_VECS


@intrinsic
def _sign_tile(typingctx, x_addr, ld, scale_addr, shift_addr, channels, out_addr):
    """``out[i] = sum_{c < channels} 2^c [not (x[c ld + i] * scale[c] + shift[c] >= 0)]`` for
    i < SIGN_TILE (addresses as integers, x float32, out uint64; channels <= 64): the sign
    bits of one word per pixel, ORed in ``<L x i32>`` registers (channels 0-31 and 32-63)
    over the channels, then stored once. ``fmul`` then ``fadd``, each rounded (no fast-math
    flags), and ``fcmp ult`` (true for y < 0 and for NaN) is ``not (y >= 0)``."""
    sig = types.void(*([types.intp] * 6))

    def codegen(context, builder, signature, args):
        xa, ld, sa, ta, channels, oa = args
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        lanes = SIGN_LANES
        vf, vi, vq = ir.VectorType(f32, lanes), ir.VectorType(i32, lanes), ir.VectorType(i64, lanes)
        x_p = builder.inttoptr(xa, f32.as_pointer())
        s_p = builder.inttoptr(sa, f32.as_pointer())
        t_p = builder.inttoptr(ta, f32.as_pointer())
        o_p = builder.inttoptr(oa, i64.as_pointer())
        zero_i, zero_f = ir.Constant(vi, None), ir.Constant(vf, None)

        def body(c, acc):
            row = builder.gep(x_p, [builder.mul(c, ld)])
            scale = splat(builder, builder.load(builder.gep(s_p, [c])), lanes)
            shift = splat(builder, builder.load(builder.gep(t_p, [c])), lanes)
            bit = splat(builder, builder.shl(ir.Constant(i32, 1), builder.trunc(
                builder.and_(c, ir.Constant(i64, 31)), i32)), lanes)
            new = []
            for j in range(SIGN_VECS):
                v = builder.load(builder.bitcast(builder.gep(row, [ir.Constant(i64, lanes * j)]),
                                                 vf.as_pointer()), align=4)
                neg = builder.fcmp_unordered("<", builder.fadd(builder.fmul(v, scale), shift), zero_f)
                new.append(builder.or_(acc[j], builder.select(neg, bit, zero_i)))
            return new

        lo_end = builder.select(builder.icmp_signed("<", channels, ir.Constant(i64, 32)),
                                channels, ir.Constant(i64, 32))
        lo = accumulate(builder, ir.Constant(i64, 0), lo_end, zero_i, SIGN_VECS, body, "signs_lo")
        hi = accumulate(builder, ir.Constant(i64, 32), channels, zero_i, SIGN_VECS, body,
                        "signs_hi")
        for j in range(SIGN_VECS):
            word = builder.or_(builder.zext(lo[j], vq),
                               builder.shl(builder.zext(hi[j], vq), ir.Constant(vq, [32] * lanes)))
            dst = builder.bitcast(builder.gep(o_p, [ir.Constant(i64, lanes * j)]), vq.as_pointer())
            builder.store(word, dst, align=8)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _pack_signs_tiles(xf, scale, shift, dst):
    """Bit plane 0 of :func:`pack_activations` for C <= 64 (one word per pixel) by
    :func:`_sign_tile` over whole vectors of pixels; returns how many pixels it packed."""
    c_in, n_px = xf.shape
    full = n_px - n_px % SIGN_TILE
    for p in range(0, full, SIGN_TILE):
        _sign_tile(xf.ctypes.data + 4 * p, n_px, scale.ctypes.data, shift.ctypes.data, c_in,
                   dst.ctypes.data + 8 * p)
    return full


@numba.njit(cache=True, nogil=True)
def pack_activations(x, scale, shift, bits, v0, out):
    """BN, quantize and pack one sample for a 3x3 convolution.

    x: float32 ``[C, H, W]``; scale, shift: float32 ``[C]``; out: uint64
    ``[bits, n_words(C), H, W]`` (layout in the module docstring; overwritten).

    * bits = 1: ``y = x * scale + shift``; bit set when sign(y) = -1, sign(0) = +1.
    * bits = 2, 4: level q of :func:`~xnorcdl.kernels.quantize.kbit_level`; plane i bit set
      when bit i of q is 0.
    """
    c_in, h, w = x.shape
    n_px = h * w
    xf = x.reshape(c_in, n_px)
    of = out.reshape(bits, out.shape[1], n_px)
    if bits == 1 and c_in <= 64 and not numba.config.DISABLE_JIT:
        # one word per pixel: every channel's sign ORed in registers, each word stored once
        dst = of[0, 0]
        done = _pack_signs_tiles(xf, scale, shift, dst)
        zero = np.float32(0.0)
        for p in range(done, n_px):
            word = np.uint64(0)
            for c in range(c_in):
                if not batchnorm(xf[c, p], scale[c], shift[c]) >= zero:
                    word |= np.uint64(1) << np.uint64(c)
            dst[p] = word
        return out
    if bits == 1:
        # 32 channels at a time into uint32 words (8 lanes per AVX2 vector instead of 4), then
        # each uint64 word is the low half | high half << 32
        half = np.empty(n_px, np.uint32)
        zero = np.float32(0.0)
        for j in range(out.shape[1]):
            dst = of[0, j]
            for hi in range(2):
                c0 = 64 * j + 32 * hi
                if c0 >= c_in:
                    break
                for p in range(n_px):
                    half[p] = 0
                for c in range(c0, min(c0 + 32, c_in)):
                    bit = np.uint32(1) << np.uint32(c - c0)
                    s = scale[c]
                    t = shift[c]
                    src = xf[c]
                    for p in range(n_px):     # set when sign(y) = -1: not (y >= 0), sign(0) = +1
                        half[p] |= np.uint32(0) if batchnorm(src[p], s, t) >= zero else bit
                if hi == 0:
                    for p in range(n_px):
                        dst[p] = np.uint64(half[p])
                else:
                    for p in range(n_px):
                        dst[p] |= np.uint64(half[p]) << np.uint64(32)
        return out
    out[:] = 0
    v0f = np.float32(v0)
    step = kbit_step(bits, v0)
    for c in range(c_in):
        j = c >> 6
        b = np.uint64(c & 63)
        s = scale[c]
        t = shift[c]
        src = xf[c]
        for p in range(n_px):
            q = kbit_level(batchnorm(src[p], s, t), v0f, step)
            for i in range(bits):
                of[i, j, p] |= np.uint64(1 - ((q >> i) & 1)) << b
    return out
