"""A direct 3x3 stride-1 float32 conv: register-blocked FMA over the padded flat images, no GEMM.

``t[o, n, y W + x] = sum_{tap, c} W'[tap, o, c] xp[n, c, off_tap + y (W+2) + x]`` with the
input ``xp [N, C, L]`` zero-padded and flattened as in :mod:`~xnorcdl.kernels.cloudblock`
(row width W + 2, ``off_tap = ky (W+2) + kx``), so the conv is one product of K = 9C terms
per output, the nine taps being nine shifted views of the same rows.

**The tile.** One call of :func:`_tile` computes 4 output channels x 16 output pixels (two
8-float vectors, each a run of 8 pixels of one output row, so rows of 8, 16, 32 pixels tile
exactly and nothing is computed past W) in eight accumulator registers: for each of the K
terms, two vector loads of the input (at ``boff[k] = c L + off_tap`` from each run's start),
four broadcasts of the packed weights ``ap[ob, k, 0:4]`` and eight ``vfmadd231ps``. On
AVX-512 targets :func:`_tile_wide` does the same on 16-float vectors, each joined from two
8-pixel runs (four runs, 32 pixels per tile; one shuffle per vector and term), which beats
NumPy's AVX-512 sgemm on these shapes where the 8-float tile did not. That is
the micro-kernel of a GEMM whose B operand is never packed: the shifted rows are read in place,
from L1 at these sizes (64 channels of a padded 8 x 8 image are 26 KB). On AVX2 the loop runs
8 FMAs against 7 loads per term, so it is bound by the two FMA pipes, where NumPy's OpenBLAS
sgemm at K = 64-576 and 80-1088 columns is bound by its packing and edge tiles (1.3-1.7x
slower on the ResNet-32 cloud convs; benchmarks/RESULTS.md).

The tile is an ``@intrinsic`` that emits the loop in LLVM IR with ``<8 x float>`` values and
``llvm.fma.v8f32``, so the accumulators are vector registers whatever LLVM's vectorizers
decide. Each output is summed in the order k = tap C + c with one rounding per term (a fused
multiply-add), another order than sgemm's: the result is within the bound of
:class:`~xnorcdl.kernels.gemmconv.FloatGemmConv` (gamma_{9C+2}), not bit-identical to it.

**Stride 2** (:data:`conv3x3_s2_into`): the padded input split into its four phase images
``xpad[c, 2 i + py, 2 j + px]`` (:func:`split_phases`, rows of Wo + 1), tap (ky, kx) of output
(oy, ox) is element (oy + ky // 2, ox + kx // 2) of phase (ky % 2, kx % 2): the same tiles run
with ``boff`` pointing into the phases (:func:`phase_offsets`) and a row pitch of Wo + 1.

With ``NUMBA_DISABLE_JIT=1`` :data:`conv3x3_into` and :data:`conv3x3_s2_into` are the same
sums in NumPy (no intrinsic can run in plain Python).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .irloop import accumulate, splat
from .jit import numba, target_has

#: output channels and output pixels of one tile: two vectors of 16 floats (each two 8-pixel
#: runs) on AVX-512 targets, two of 8 elsewhere
_LANES = 8
WIDE = target_has("avx512f")
ROWS, PIXELS = 4, (32 if WIDE else 16)


def supports(out_channels: int, h: int, w: int) -> bool:
    """Whether the tiles cover a conv with this many output channels on an h x w image
    exactly: runs of 8 pixels inside a row, PIXELS (16, or 32 on AVX-512) pixels per tile, 4
    channels per tile."""
    return out_channels % ROWS == 0 and w % _LANES == 0 and (h * w) % PIXELS == 0


def pack(w9: np.ndarray) -> np.ndarray:
    """Folded 3x3 weights ``[9, O, C]`` (tap 3 ky + kx) as ``ap [O/4, 9C, 4]``,
    ``ap[ob, tap C + c, r] = w9[tap, 4 ob + r, c]``: the four weights of a term side by side."""
    nine, o_n, c_in = w9.shape
    return np.ascontiguousarray(
        np.asarray(w9, np.float32).reshape(9, o_n // ROWS, ROWS, c_in).transpose(1, 0, 3, 2)
        .reshape(o_n // ROWS, 9 * c_in, ROWS))


@numba.njit(cache=True, nogil=True)
def tap_offsets(w):
    """Where tap t = 3 ky + kx of output column 0 lies in a padded flat image of width w + 2
    (the layout of :mod:`~xnorcdl.kernels.cloudblock`)."""
    offs = np.empty(9, np.int64)
    for t in range(9):
        offs[t] = (t // 3) * (w + 2) + t % 3
    return offs


def offsets(c_in: int, h: int, w: int, length: int) -> np.ndarray:
    """``boff[tap C + c] = c L + ky (W+2) + kx``: where term k of output pixel 0 lies in a
    sample's padded flat images of length L."""
    tap = tap_offsets(w)
    return np.ascontiguousarray((tap[:, None] + length * np.arange(c_in, dtype=np.int64)[None])
                                .reshape(-1))


def _tile_codegen(builder, a, bases, boff, c, terms, ldc, runs):
    """The IR of a tile: 4 rows x 2 vectors of ``runs`` 8-pixel runs each (``bases``: the
    2 runs input addresses of the runs), per term the runs loaded (and joined into one vector when runs = 2), four
    weight broadcasts and eight FMAs, the sums stored at the end."""
    f32, i64, i32 = ir.FloatType(), ir.IntType(64), ir.IntType(32)
    lanes = _LANES * runs
    v8, vec_t = ir.VectorType(f32, _LANES), ir.VectorType(f32, lanes)
    fp = f32.as_pointer()
    mod = builder.module
    name = f"llvm.fma.v{lanes}f32"
    fma = mod.globals.get(name) or ir.Function(mod, ir.FunctionType(vec_t, [vec_t] * 3), name=name)
    a_p = builder.inttoptr(a, fp)
    b_ps = [builder.inttoptr(b, fp) for b in bases]
    off_p = builder.inttoptr(boff, i64.as_pointer())
    c_p = builder.inttoptr(c, fp)
    zero = ir.Constant(vec_t, None)
    join = ir.Constant(ir.VectorType(i32, lanes), list(range(lanes)))

    def body(k, acc):
        off = builder.load(builder.gep(off_p, [k]))
        loaded = [builder.load(builder.bitcast(builder.gep(b_p, [off]), v8.as_pointer()), align=4)
                  for b_p in b_ps]
        vec = loaded if runs == 1 else [builder.shuffle_vector(loaded[2 * j], loaded[2 * j + 1],
                                                               join) for j in range(2)]
        base = builder.mul(k, ir.Constant(i64, ROWS))
        new = []
        for r in range(ROWS):
            s = builder.load(builder.gep(a_p, [builder.add(base, ir.Constant(i64, r))]))
            sv = splat(builder, s, lanes)
            new += [builder.call(fma, [sv, vec[j], acc[2 * r + j]]) for j in range(2)]
        return new

    out = accumulate(builder, ir.Constant(i64, 0), terms, zero, 2 * ROWS, body, f"tile{lanes}")
    for r in range(ROWS):
        row = builder.gep(c_p, [builder.mul(ldc, ir.Constant(i64, r))])
        for j in range(2):
            dst = builder.bitcast(builder.gep(row, [ir.Constant(i64, lanes * j)]),
                                  vec_t.as_pointer())
            builder.store(out[2 * r + j], dst, align=4)


@intrinsic
def _tile(typingctx, a_addr, b0_addr, b1_addr, boff_addr, c_addr, terms, ldc):
    """4 x 16 outputs: ``C[r ldc + 8 j + i] = sum_k A[4k + r] B_j[boff[k] + i]`` for r < 4,
    j < 2, i < 8 (addresses as integers, ldc in floats), the sum in k order by FMA."""
    sig = types.void(*([types.intp] * 7))

    def codegen(context, builder, signature, args):
        a, b0, b1, boff, c, terms, ldc = args
        _tile_codegen(builder, a, (b0, b1), boff, c, terms, ldc, 1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _tile_wide(typingctx, a_addr, b0_addr, b1_addr, b2_addr, b3_addr, boff_addr, c_addr, terms,
               ldc):
    """4 x 32 outputs on 16-float vectors: ``C[r ldc + 8 j + i] = sum_k A[4k + r] B_j[boff[k] +
    i]`` for r < 4, j < 4 (four 8-pixel runs, two per vector), i < 8; the sum in k order by FMA,
    as :func:`_tile`."""
    sig = types.void(*([types.intp] * 9))

    def codegen(context, builder, signature, args):
        a, b0, b1, b2, b3, boff, c, terms, ldc = args
        _tile_codegen(builder, a, (b0, b1, b2, b3), boff, c, terms, ldc, 2)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _tiles(ap, boff, xp, h, w, wp, t):
    """The conv by tiles: xp ``[N, ., L]`` (each sample's images flat, rows ``wp`` floats
    apart), ap ``[O/4, 9C, 4]``, boff ``[9C]``, t ``[O, N, >= h w]`` (C-contiguous; row o of
    sample n at ``(o N + n) t.shape[2]``); output pixel (y, x) reads term k at
    ``boff[k] + y wp + x``."""
    n_s = xp.shape[0]
    o_n, q = t.shape[0], t.shape[2]
    ldc = n_s * q
    terms = boff.shape[0]
    for n in range(n_s):
        x0 = xp[n].ctypes.data
        for ob in range(o_n // ROWS):
            a = ap[ob].ctypes.data
            for p in range(0, h * w, PIXELS):
                c = t.ctypes.data + 4 * ((ob * ROWS * n_s + n) * q + p)
                b0 = x0 + 4 * ((p // w) * wp + p % w)
                p1 = p + _LANES
                b1 = x0 + 4 * ((p1 // w) * wp + p1 % w)
                if WIDE:
                    p2, p3 = p + 2 * _LANES, p + 3 * _LANES
                    b2 = x0 + 4 * ((p2 // w) * wp + p2 % w)
                    b3 = x0 + 4 * ((p3 // w) * wp + p3 % w)
                    _tile_wide(a, b0, b1, b2, b3, boff.ctypes.data, c, terms, ldc)
                else:
                    _tile(a, b0, b1, boff.ctypes.data, c, terms, ldc)
    return t


@numba.njit(cache=True, nogil=True)
def _conv3x3_jit(ap, boff, xp, h, w, t):
    """:data:`conv3x3_into` by tiles on the padded flat images (rows w + 2 apart)."""
    return _tiles(ap, boff, xp, h, w, w + 2, t)


@numba.njit(cache=True, nogil=True)
def _conv3x3_s2_jit(ap, boff, xph, ho, wo, t):
    """:data:`conv3x3_s2_into` by tiles on the phase images (rows wo + 1 apart)."""
    return _tiles(ap, boff, xph, ho, wo, wo + 1, t)


def _tiles_numpy(ap, boff, xp, h, w, wp, t):
    """The same sums in NumPy (float64 products rounded once to float32: within the bound)."""
    o_b, terms, rows = ap.shape
    pix = (np.arange(h)[:, None] * wp + np.arange(w)[None]).reshape(-1)
    weights = ap.transpose(0, 2, 1).reshape(o_b * rows, terms).astype(np.float64)
    for n in range(xp.shape[0]):
        cols = xp[n].reshape(-1)[boff[:, None] + pix[None]].astype(np.float64)
        t[:, n, :h * w] = weights @ cols
    return t


def _conv3x3_numpy(ap, boff, xp, h, w, t):
    return _tiles_numpy(ap, boff, xp, h, w, w + 2, t)


def _conv3x3_s2_numpy(ap, boff, xph, ho, wo, t):
    return _tiles_numpy(ap, boff, xph, ho, wo, wo + 1, t)


conv3x3_into = _conv3x3_numpy if numba.config.DISABLE_JIT else _conv3x3_jit
"""``conv3x3_into(ap, boff, xp, h, w, t)``: the stride-1 3x3 conv of every sample of the
padded flat images xp into the dense rows of ``t [O, N, h w]`` (before its shift); the shape
must pass :func:`supports`."""


# ---- stride 2: the same tiles on the four phase images of the padded input ----------------

def supports_stride2(out_channels: int, h: int, w: int) -> bool:
    """Whether the tiles cover a stride-2 conv of an h x w input: even sides (so that the
    four phase images below have the output's width plus one) and an output the stride-1
    tiles cover."""
    return h % 2 == 0 and w % 2 == 0 and supports(out_channels, h // 2, w // 2)


def phase_length(ho: int, wo: int) -> int:
    """Floats per channel of one phase image: (ho + 1) rows of wo + 1."""
    return (ho + 1) * (wo + 1)


def phase_offsets(c_in: int, ho: int, wo: int) -> np.ndarray:
    """``boff[tap C + c]`` for the phase images of :func:`split_phases`: tap (ky, kx) of output
    (oy, ox) reads ``xpad[c, 2 oy + ky, 2 ox + kx]`` = phase (ky % 2, kx % 2), channel c, row
    oy + ky // 2, column ox + kx // 2."""
    length, wp = phase_length(ho, wo), wo + 1
    boff = np.empty(9 * c_in, np.int64)
    for tap in range(9):
        ky, kx = divmod(tap, 3)
        phase = 2 * (ky % 2) + kx % 2
        for c in range(c_in):
            boff[tap * c_in + c] = (phase * c_in + c) * length + (ky // 2) * wp + kx // 2
    return boff


@numba.njit(cache=True, nogil=True)
def split_phases(x, xph):
    """x ``[N, C, H, W]`` (H, W even) -> xph ``[N, 4 C, (Ho+1)(Wo+1)]``: phase ``2 py + px``
    of the zero-padded image, ``xph[n, (2 py + px) C + c, i (Wo+1) + j] = xpad[n, c, 2 i + py,
    2 j + px]`` (``xpad`` = x inside a border of one zero), every element written."""
    n_s, c_in, h, w = x.shape
    ho, wo = h // 2, w // 2
    wp = wo + 1
    zero = np.float32(0.0)
    for n in range(n_s):
        for py in range(2):
            for c in range(c_in):
                ph0 = xph[n, 2 * py * c_in + c]         # phase (py, 0): columns 2 j - 1
                ph1 = xph[n, (2 * py + 1) * c_in + c]   # phase (py, 1): columns 2 j
                for i in range(ho + 1):
                    d0 = ph0[i * wp:(i + 1) * wp]
                    d1 = ph1[i * wp:(i + 1) * wp]
                    r = 2 * i + py - 1
                    if r < 0 or r >= h:
                        for j in range(wp):
                            d0[j] = zero
                            d1[j] = zero
                        continue
                    src = x[n, c, r]            # one pass over the row feeds both phases
                    d0[0] = zero
                    d1[wo] = zero
                    for j in range(wo):
                        d1[j] = src[2 * j]
                        d0[j + 1] = src[2 * j + 1]
    return xph


conv3x3_s2_into = _conv3x3_s2_numpy if numba.config.DISABLE_JIT else _conv3x3_s2_jit
"""``conv3x3_s2_into(ap, boff, xph, ho, wo, t)``: the stride-2 3x3 conv (pad 1) of every sample
of the phase images xph (:func:`split_phases`, ``boff`` from :func:`phase_offsets`) into the
dense rows of ``t [O, N, ho wo]``: the tiles of the stride-1 conv, each term's pixel runs
contiguous in one phase image; the shape must pass :func:`supports_stride2`."""
