"""Binary 3x3 convolution (pad 1, stride 1 or 2) by nibble lookup tables: one ``vpshufb`` per
128 MACs.

Shapes: C input channels (C % 4 == 0), O output channels (O % 4 == 0), an H x W image;
G = C / 4 *nibbles* per pixel, T = 9 G *terms* per output.

**The sum.** The binary conv's integer (step 2 of :mod:`~xnorcdl.kernels.bitconv`) is
``acc[o, p] = sum_t popcount(S_a[t] XOR S_w[o, t])`` over the 9C taps' sign bits (bit set for
-1, padded taps zero bits). Cut the bits into nibbles of four channels: nibble g of tap t is
the 4-bit value ``a = sum_{r<4} s(4g + r) 2^r`` of activations (and ``w[o, t, g]`` of weights),
so

    acc[o, p] = sum_{n = t G + g} LUT[o, n][a_n(p)],   LUT[o, n][v] = popcount(v XOR w[o, n]),

a sum of T table lookups with 16-entry tables fixed by the weights. ``vpshufb`` looks up 32
such nibbles in a 16-byte table at once, so one shuffle and one byte add stand for 32 x 4 =
128 binary MACs; the popcount form (:func:`~xnorcdl.kernels.bitconv.pair_popcounts`) needs
``vpxor``, a nibble split, two ``vpshufb``, ``vpaddb`` and ``vpsadbw`` per 256 bits, of which
a 48-bit row segment of 16 channels uses three quarters. The result is the same integer, so
every epilogue of bitconv applies unchanged: ``A = Z^2 K - corr[case(p), o] - 2 acc``.

**Layout.** Activations are *nibble planes* of the zero-padded image, one byte per pixel
(values 0..15), ``xn[g Lq + (y+1) Wq + x + 1]`` with Wq = W + 2, Lq = (H + 2) Wq; the padding
bytes are 0, which is the zero-bit padding of bitconv. Output q = y Wq + x of a padded-width
row reads term n at ``q + off[n]``, ``off[t G + g] = g Lq + ky Wq + kx``: every tap is a
shifted view of the same planes, nothing is copied (im2col) per tap. For stride 2 each nibble
has four *phase planes* (even / odd padded rows x even / odd padded columns, Ho + 1 rows of
Wq = Wo + 1), so that tap (ky, kx) of output (y, x) is pixel (y + ky // 2, x + kx // 2) of
phase (ky % 2, kx % 2): shifted views again, with unit stride over outputs. Outputs run over
``q < Q``, Ho Wq rounded up to whole tiles; the columns x >= Wo of each row and the tail are
junk, never read back.

**The tile.** :func:`_tile` (an ``@intrinsic`` emitting LLVM IR) keeps 4 output channels x 2
vectors of 32 outputs in eight byte accumulators; per term two unaligned loads of nibbles, four
16-byte tables broadcast to both lanes, eight ``vpshufb`` and eight ``vpaddb``. A byte holds at
most 63 terms (4 x 63 = 252), so terms run in chunks of at most 63 and each chunk's bytes are
widened and added into int16 counts ``acc [O, Q]`` (at most 4 T <= 2^15 for C <= 3640).
The sums are exact integers: any order, any machine, the same bits.

The shuffle is AVX2's (``llvm.x86.avx2.pshuf.b``); :func:`vectorized` says whether this host's
compile target has it. Elsewhere :data:`nibble_counts` is a plain jitted loop over the same
tables (same integers, slower), and with ``NUMBA_DISABLE_JIT=1`` a NumPy form.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .bitconv import BitConv, as_float32_nchw
from .irloop import accumulate
from .jit import numba, target_has
from .quantize import batchnorm

#: output channels per tile, 32-byte vectors of outputs per tile, outputs per vector
ROWS, VECS, LANES = 4, 2, 32
TILE = VECS * LANES
CHUNK = 63                       # terms whose counts (<= 4 each) still fit a byte
MAX_CHANNELS = 3640              # 9C < 2^15: counts and integers fit int16


def supports(c_in: int, o_n: int, stride: int) -> bool:
    """Whether a binary conv of this shape runs here: stride 1 or 2, whole nibbles, whole
    tiles of output channels, and integers that fit int16 (|A| <= 9C < 2^15)."""
    return (stride in (1, 2) and c_in % 4 == 0 and 0 < c_in <= MAX_CHANNELS
            and o_n % ROWS == 0 and o_n > 0)


def geometry(h, w, stride, tile=TILE):
    """(Ho, Wo, Wq, Lq, phases, Q) of an h x w input: output size, the row width and length of
    one plane, planes per nibble (1, or the 4 phases of stride 2), outputs computed (whole
    tiles of ``tile`` outputs; output (y, x) is q = y Wq + x)."""
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    if stride == 1:
        wq, hq, phases = w + 2, h + 2, 1
    else:
        wq, hq, phases = wo + 1, ho + 1, 4
    q = (ho * wq + tile - 1) // tile * tile
    return ho, wo, wq, hq * wq, phases, q


#: :func:`geometry` for jitted callers (Python callers call it directly: no dispatch)
geometry_jit = numba.njit(cache=True, nogil=True)(geometry)


def plane_bytes(c_in: int, h: int, w: int, stride: int = 1) -> int:
    """Length of a nibble-plane buffer of C channels (the reads of junk outputs included)."""
    _, _, wq, lq, phases, q = geometry(h, w, stride)
    return (c_in // 4) * phases * lq + q + 2 * wq + 2 + LANES


def term_offsets(c_in: int, h: int, w: int, stride: int = 1) -> np.ndarray:
    """int32 ``[9 G]``: where term n = t G + g (t = 3 ky + kx) of output 0 lies in the planes:
    ``g Lq + ky Wq + kx`` for stride 1; for stride 2 in phase plane ``(ky % 2, kx % 2)`` of
    nibble g, ``(4 g + 2 (ky % 2) + kx % 2) Lq + (ky // 2) Wq + kx // 2``."""
    _, _, wq, lq, phases, _ = geometry(h, w, stride)
    offs = np.empty((9, c_in // 4), np.int64)
    for t in range(9):
        ky, kx = divmod(t, 3)
        for g in range(c_in // 4):
            if stride == 1:
                offs[t, g] = g * lq + ky * wq + kx
            else:
                offs[t, g] = (4 * g + 2 * (ky % 2) + kx % 2) * lq + (ky // 2) * wq + kx // 2
    return np.ascontiguousarray(offs.reshape(-1), dtype=np.int32)


def weight_nibbles(w_codes: np.ndarray) -> np.ndarray:
    """Sign codes ``[O, C, 3, 3]`` -> uint8 ``[O, 9 G]``: nibble g of tap t, bit r set when the
    code of channel 4g + r is -1 (the packing convention of :mod:`~xnorcdl.kernels.bitpack`)."""
    w = np.asarray(w_codes)
    o_n, c_in = w.shape[:2]
    neg = (w < 0).transpose(0, 2, 3, 1).reshape(o_n, 9, c_in // 4, 4)      # [O, t, g, r]
    return (neg * (1 << np.arange(4))).sum(axis=3).reshape(o_n, -1).astype(np.uint8)


def weight_tables(w_codes: np.ndarray) -> np.ndarray:
    """uint8 ``[O/4, T, 4, 16]``: ``lut[ob, n, r, v] = popcount(v XOR w[4 ob + r, n])``, the
    four tables of a term side by side as the tile reads them."""
    nib = weight_nibbles(w_codes)
    o_n, t_n = nib.shape
    v = np.arange(16, dtype=np.uint8)
    x = nib[:, :, None] ^ v[None, None, :]
    lut = np.unpackbits(x[..., None], axis=-1).sum(axis=-1).astype(np.uint8)  # [O, T, 16]
    return np.ascontiguousarray(lut.reshape(o_n // ROWS, ROWS, t_n, 16).transpose(0, 2, 1, 3))


def to_padded_rows(plane: np.ndarray, ho: int, wo: int, wq: int, q: int) -> np.ndarray:
    """``[O, Ho Wo]`` -> ``[O, Q]`` with entry y Wo + x at q = y Wq + x (junk entries 0)."""
    out = np.zeros((plane.shape[0], q), plane.dtype)
    out[:, :ho * wq].reshape(plane.shape[0], ho, wq)[:, :, :wo] = plane.reshape(-1, ho, wo)
    return out


def vectorized() -> bool:
    """Whether the jitted counts use the AVX2 tile: the JIT is on and the features Numba
    compiles for (the host's, or the user's ``NUMBA_CPU_FEATURES``) include AVX2."""
    return target_has("avx2")


def preferred() -> bool:
    """Whether the fast backend runs binary convs by tables: the AVX2 tile is there and the
    target has no AVX-512 VPOPCNTDQ, whose ``vpopcntq`` makes the popcount loop the faster one
    (benchmarks/RESULTS.md: on an AVX2 target the edge path runs 1.5x faster by tables, with
    VPOPCNTDQ 1.2x slower)."""
    return vectorized() and not target_has("avx512vpopcntdq")


@intrinsic
def _tile(typingctx, lut_addr, x_addr, off_addr, k0, k1, out_addr, ldo, first):
    """``out[r ldo + 32 j + i] (+)= sum_{k0 <= k < k1} lut[(k 4 + r) 16 + x[off[k] + 32 j + i]]``
    for r < 4, j < 2, i < 32 (addresses as integers, ldo in int16 elements; stores when
    ``first``, else adds), the byte sums widened to int16 at the end."""
    sig = types.void(*([types.intp] * 8))

    def codegen(context, builder, signature, args):
        lut, x, offp, k0, k1, outp, ldo, first = args
        i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
        v16, v32, w32 = ir.VectorType(i8, 16), ir.VectorType(i8, LANES), ir.VectorType(i16, LANES)
        mod = builder.module
        shuf = mod.globals.get("llvm.x86.avx2.pshuf.b") or ir.Function(
            mod, ir.FunctionType(v32, [v32, v32]), name="llvm.x86.avx2.pshuf.b")
        lut_p = builder.inttoptr(lut, i8.as_pointer())
        x_p = builder.inttoptr(x, i8.as_pointer())
        off_p = builder.inttoptr(offp, i32.as_pointer())
        out_p = builder.inttoptr(outp, i16.as_pointer())
        zero = ir.Constant(v32, None)
        both = ir.Constant(ir.VectorType(i32, LANES), list(range(16)) * 2)
        undef16 = ir.Constant(v16, ir.Undefined)

        def body(k, acc):
            off = builder.sext(builder.load(builder.gep(off_p, [k])), i64)
            nib = [builder.load(builder.bitcast(builder.gep(x_p, [builder.add(
                off, ir.Constant(i64, LANES * j))]), v32.as_pointer()), align=1)
                for j in range(VECS)]
            row0 = builder.mul(k, ir.Constant(i64, ROWS * 16))
            new = []
            for r in range(ROWS):
                tp = builder.gep(lut_p, [builder.add(row0, ir.Constant(i64, 16 * r))])
                t16 = builder.load(builder.bitcast(tp, v16.as_pointer()), align=1)
                t32 = builder.shuffle_vector(t16, undef16, both)
                new += [builder.add(acc[VECS * r + j], builder.call(shuf, [t32, nib[j]]))
                        for j in range(VECS)]
            return new

        phis = accumulate(builder, k0, k1, zero, ROWS * VECS, body, "nib")
        sums = [builder.zext(f, w32) for f in phis]
        ptrs = [builder.bitcast(builder.gep(out_p, [builder.add(
            builder.mul(ldo, ir.Constant(i64, r)), ir.Constant(i64, LANES * j))]),
            w32.as_pointer()) for r in range(ROWS) for j in range(VECS)]
        with builder.if_else(builder.icmp_signed("!=", first, ir.Constant(i64, 0))) as (
                then, otherwise):
            with then:
                for s, p in zip(sums, ptrs):
                    builder.store(s, p, align=2)
            with otherwise:
                for s, p in zip(sums, ptrs):
                    builder.store(builder.add(builder.load(p, align=2), s), p, align=2)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _counts_tiles(lut, xn, offs, acc):
    """:data:`nibble_counts` by AVX2 tiles."""
    t_n = lut.shape[1]
    q_n = acc.shape[1]
    chunks = (t_n + CHUNK - 1) // CHUNK
    step = (t_n + chunks - 1) // chunks          # equal chunks of at most CHUNK terms
    x0, o0 = xn.ctypes.data, offs.ctypes.data
    for ob in range(lut.shape[0]):
        lb = lut[ob].ctypes.data
        for q in range(0, q_n, TILE):
            out = acc.ctypes.data + 2 * (ob * ROWS * q_n + q)
            for k in range(0, t_n, step):
                _tile(lb, x0 + q, o0, k, min(k + step, t_n), out, q_n, k == 0)
    return acc


@numba.njit(cache=True, nogil=True)
def _counts_loops(lut, xn, offs, acc):
    """:data:`nibble_counts` as plain loops (a target without AVX2)."""
    t_n = lut.shape[1]
    q_n = acc.shape[1]
    acc[:] = 0
    for ob in range(lut.shape[0]):
        for r in range(ROWS):
            dst = acc[ob * ROWS + r]
            for k in range(t_n):
                tab = lut[ob, k, r]
                src = xn[offs[k]:offs[k] + q_n]
                for q in range(q_n):
                    dst[q] += tab[src[q]]
    return acc


def _counts_numpy(lut, xn, offs, acc):
    """:data:`nibble_counts` in NumPy (the JIT disabled)."""
    o_b, t_n, rows, _ = lut.shape
    q_n = acc.shape[1]
    a = xn[offs[:, None] + np.arange(q_n)[None]]                      # [T, Q] nibbles
    tabs = lut.transpose(0, 2, 1, 3).reshape(o_b * rows, t_n, 16)
    terms = np.arange(t_n)[:, None]
    for o in range(o_b * rows):
        acc[o] = tabs[o][terms, a].sum(axis=0, dtype=np.int64)
    return acc


if numba.config.DISABLE_JIT:
    nibble_counts = _counts_numpy
elif vectorized():
    nibble_counts = _counts_tiles
else:
    nibble_counts = _counts_loops
"""``nibble_counts(lut, xn, offs, acc)``: ``acc[o, q] = sum_n lut[o // 4, n, o % 4,
xn[off[n] + q]]`` (int16 ``[O, Q]``) for the tables of :func:`weight_tables`, the planes ``xn``
(uint8, :func:`plane_bytes` long) and the offsets of :func:`term_offsets`."""


@numba.njit(cache=True, nogil=True)
def pack_nibbles(x, scale, shift, stride, xn, tmp):
    """BN and sign of one sample x float32 ``[C, H, W]`` into the interiors of the nibble
    planes xn: bit r of pixel (y, x)'s byte set when sign(BN(x[4g + r, y, x])) = -1 (sign(0) =
    +1, as :func:`~xnorcdl.kernels.bitpack.pack_activations`). The byte goes to padded pixel
    (y + 1, x + 1) of plane g (stride 1), or of phase plane ``((y + 1) % 2, (x + 1) % 2)`` at
    ``((y + 1) // 2, (x + 1) // 2)`` (stride 2). The padding bytes are not written (they stay
    0). tmp: uint8 scratch of H W bytes (each nibble is built there by flat loops over the
    image, then copied row by row)."""
    c_in, h, w = x.shape
    _, _, wq, lq, phases, _ = geometry_jit(h, w, stride)
    hw = h * w
    xf = x.reshape(c_in * hw)
    zero = np.float32(0.0)
    for g in range(c_in // 4):
        for p in range(hw):
            tmp[p] = 0
        for r in range(4):
            c = 4 * g + r
            s, t = scale[c], shift[c]
            src = xf[c * hw:(c + 1) * hw]
            bit = np.uint8(1 << r)
            for p in range(hw):
                tmp[p] |= np.uint8(0) if batchnorm(src[p], s, t) >= zero else bit
        for y in range(h):
            p0 = np.uint64(y * w)            # unsigned indices vectorize
            if stride == 1:
                at = np.uint64(g * lq + (y + 1) * wq + 1)
                for i in range(w):
                    u = np.uint64(i)
                    xn[at + u] = tmp[p0 + u]
            else:
                row = (4 * g + 2 * ((y + 1) % 2)) * lq + ((y + 1) // 2) * wq
                ph1 = np.uint64(row + lq)    # phase (., 1): even x, at column x / 2
                ph0 = np.uint64(row + 1)     # phase (., 0): odd x, at column (x + 1) / 2
                two = np.uint64(2)
                for i in range((w + 1) // 2):
                    u = np.uint64(i)
                    xn[ph1 + u] = tmp[p0 + two * u]
                for i in range(w // 2):
                    u = np.uint64(i)
                    xn[ph0 + u] = tmp[p0 + two * u + np.uint64(1)]
    return xn


@numba.njit(cache=True, nogil=True)
def nibbleconv_forward(x, bn_scale, bn_shift, stride, lut, offs, base, out_scale, xn, tmp, acc,
                       out):
    """BN -> sign -> nibble planes -> counts -> ``(base - 2 acc) * out_scale`` for each sample
    of x ``[N, C, H, W]`` into out ``[N, O, Ho, Wo]`` (bitconv steps 2-4); base int16 ``[O, Q]``
    in output rows (``base - 2 acc`` is an integer below 2^15: in int16, converted once, it is
    bitconv's float32 ``base - 2 float32(acc)`` exactly), xn/tmp/acc scratch
    (:func:`plane_bytes`, H W bytes, ``[O, Q]``)."""
    n_s, c_in, h, w = x.shape
    o_n = out.shape[1]
    ho, wo, wq, _, _, _ = geometry_jit(h, w, stride)
    for n in range(n_s):
        pack_nibbles(x[n], bn_scale, bn_shift, stride, xn, tmp)
        nibble_counts(lut, xn, offs, acc)
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


class NibbleConv:
    """A prepared binary QuanConv (3x3, pad 1, stride 1 or 2) run by nibble tables where
    :func:`supports` holds (else by the popcount kernel); ``conv(x)`` equals
    :class:`~xnorcdl.kernels.bitconv.BitConv` (and so the reference) bit for bit."""

    def __init__(self, w_codes, out_scale, bn_scale, bn_shift, bits: int = 1, v0: float = 1.0,
                 stride: int = 1):
        if bits != 1:
            raise ValueError(f"bits: NibbleConv is binary (1 bit), got {bits!r}")
        self.bitconv = c = BitConv(w_codes, out_scale, bn_scale, bn_shift, bits, v0, stride)
        self.applies = supports(c.in_channels, c.out_channels, c.stride)
        self.lut = weight_tables(c.w_codes) if self.applies else None
        self._geo = {}

    def prepared(self, h: int, w: int):
        """(offsets, base plane in output rows, int16 ``[O, Q]``) for inputs of h x w."""
        geo = self._geo.get((h, w))
        if geo is None:
            c = self.bitconv
            ho, wo, wq, _, _, q = geometry(h, w, c.stride)
            geo = self._geo[(h, w)] = (term_offsets(c.in_channels, h, w, c.stride),
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
        ho, wo, wq, _, _, q_n = geometry(h, w, c.stride)
        return nibbleconv_forward(x, c.bn_scale, c.bn_shift, c.stride, self.lut, offs, base,
                                  c.out_scale, np.zeros(plane_bytes(c.in_channels, h, w, c.stride),
                                                        np.uint8),
                                  np.empty(h * w, np.uint8),
                                  np.empty((c.out_channels, q_n), np.int16),
                                  np.empty((n_s, c.out_channels, ho, wo), np.float32))
