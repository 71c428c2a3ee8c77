"""Fixed-order float32 dot products for the edge's float layers: the same bits on every machine.

The rounding of a float32 dot product depends on the order of its additions, and BLAS picks
that order per processor (its AVX2 and AVX-512 sgemm kernels block and vectorise K
differently). At the edge the next 1-bit layer takes the sign of these values, so a last-bit
difference can flip a sign, then a whole output bit pattern, and move an exit's entropy by
tenths of a nat: Algorithm 1's decisions would depend on the machine it runs on. The edge's
float layers (stem conv, edge 1x1 shortcut convs, exit linears) therefore sum in one order:

    y = fl( ... fl( fl(w_0 x_0) + fl(w_1 x_1) ) + ... + fl(w_{K-1} x_{K-1}) )

every product and every partial sum rounded to float32, k in the order of ``w.reshape(O, K)``
(conv taps (c, ky, kx); exit features (c, h, w)). With ``|sum| <= sum |w_k x_k| = S`` the
error is at most ``gamma_{K} S`` (gamma_n = n u / (1 - n u), u = 2^-24), the recursive-summation
bound. :func:`xnorcdl.kernels.reference.ordered_matmul` is the NumPy statement of the same order
(elementwise ufuncs, one rounding each); these kernels must equal it bit for bit. Numba compiles
them without ``fastmath``, so LLVM neither reassociates the sums nor contracts ``w x + acc`` into
an FMA; it vectorises across independent outputs (the P pixels, the O classes), never along K.
Cloud layers keep BLAS: nothing after them takes a sign.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .irloop import accumulate, splat
from .jit import numba, target_has


@numba.njit(cache=True, nogil=True)
def ordered_gemm(wmat, cols, out):
    """``out[n, o, p] = sum_k wmat[o, k] cols[n, k, p]``, summed for k = 0..K-1 in order.

    wmat ``[O, K]``, cols ``[N, K', P]`` with K' >= K (rows past K are ignored), out
    ``[N, O, P]``, all float32."""
    n_s, _, p_n = cols.shape
    o_n, k_n = wmat.shape
    for n in range(n_s):
        for o in range(o_n):
            acc = out[n, o]
            w0 = wmat[o, 0]
            src = cols[n, 0]
            for p in range(p_n):
                acc[p] = w0 * src[p]
            # three taps per pass over the pixels, added in order: the same roundings as one
            # tap per pass, with the partial sums loaded and stored once per three products
            k = 1
            while k + 2 < k_n:
                wa, wb, wc = wmat[o, k], wmat[o, k + 1], wmat[o, k + 2]
                sa, sb, sc = cols[n, k], cols[n, k + 1], cols[n, k + 2]
                for p in range(p_n):
                    acc[p] = ((acc[p] + wa * sa[p]) + wb * sb[p]) + wc * sc[p]
                k += 3
            while k < k_n:
                wk = wmat[o, k]
                src = cols[n, k]
                for p in range(p_n):
                    acc[p] += wk * src[p]
                k += 1
    return out


@numba.njit(cache=True, nogil=True)
def _conv3x3_loops(wmat, xflat, plane, wp, o0, o1, q0, q1, out):
    """The sums of :data:`ordered_conv3x3` for output channels o0..o1-1 and pixels q0..q1-1 by
    loops over pixels (LLVM vectorizes them across pixels)."""
    k_n = wmat.shape[1]
    for o in range(o0, o1):
        acc = out[o]
        w0 = wmat[o, 0]
        for q in range(q0, q1):
            acc[q] = w0 * xflat[np.uint64(q)]
        # three taps (one kernel row) per pass, added in order, as in ordered_gemm
        for k in range(1, k_n):
            c, t = k // 9, k % 9
            if t % 3 != 0 and k != 1:
                continue
            if k == 1:                  # taps 1 and 2 of the first kernel row
                wa, wb = wmat[o, 1], wmat[o, 2]
                for q in range(q0, q1):
                    u = np.uint64(q)
                    acc[q] = (acc[q] + wa * xflat[u + np.uint64(1)]) + wb * xflat[u + np.uint64(2)]
                continue
            base = np.uint64(c * plane + (t // 3) * wp)
            wa, wb, wc = wmat[o, k], wmat[o, k + 1], wmat[o, k + 2]
            for q in range(q0, q1):
                u = base + np.uint64(q)
                acc[q] = ((acc[q] + wa * xflat[u]) + wb * xflat[u + np.uint64(1)]) \
                    + wc * xflat[u + np.uint64(2)]
    return out


#: output channels, float vectors (of pixels) and lanes of one tile of the stem's sums: 16
#: accumulators in the 32 zmm registers of AVX-512, 8 in the 16 ymm registers elsewhere
_WIDE = target_has("avx512f")
ROWS, VECS, LANES = (8, 2, 16) if _WIDE else (4, 2, 8)
TILE = LANES * VECS


@intrinsic
def _tile(typingctx, w_addr, ldw, x_addr, off_addr, terms, out_addr, ldo):
    """``out[r ldo + L j + i] = fl(... fl(fl(W[r ldw] X[off[0] + L j + i]) + fl(W[r ldw + 1]
    X[off[1] + L j + i])) + ...)`` over k < terms, for r < ROWS, j < VECS, i < L (L = LANES;
    addresses as integers, float32): every product and partial sum rounded, k in order, the
    sums of ROWS x VECS x L outputs in registers (``fmul`` and ``fadd`` without fast-math flags,
    so LLVM neither contracts nor reorders them)."""
    sig = types.void(*([types.intp] * 7))

    def codegen(context, builder, signature, args):
        wa, ldw, xa, offa, terms, outa, ldo = args
        f32, i64 = ir.FloatType(), ir.IntType(64)
        vec = ir.VectorType(f32, LANES)
        w_p = builder.inttoptr(wa, f32.as_pointer())
        x_p = builder.inttoptr(xa, f32.as_pointer())
        off_p = builder.inttoptr(offa, i64.as_pointer())
        o_p = builder.inttoptr(outa, f32.as_pointer())

        def products(k):
            off = builder.load(builder.gep(off_p, [k]))
            xs = [builder.load(builder.bitcast(builder.gep(x_p, [builder.add(
                off, ir.Constant(i64, LANES * j))]), vec.as_pointer()), align=4)
                for j in range(VECS)]
            out = []
            for r in range(ROWS):
                wk = builder.load(builder.gep(w_p, [builder.add(
                    builder.mul(ldw, ir.Constant(i64, r)), k)]))
                wv = splat(builder, wk, LANES)
                out += [builder.fmul(wv, xs[j]) for j in range(VECS)]
            return out

        first = products(ir.Constant(i64, 0))
        sums = accumulate(builder, ir.Constant(i64, 1), terms, first, ROWS * VECS,
                          lambda k, acc: [builder.fadd(a, t) for a, t in zip(acc, products(k))],
                          "ordered")
        for r in range(ROWS):
            row = builder.gep(o_p, [builder.mul(ldo, ir.Constant(i64, r))])
            for j in range(VECS):
                dst = builder.bitcast(builder.gep(row, [ir.Constant(i64, LANES * j)]),
                                      vec.as_pointer())
                builder.store(sums[VECS * r + j], dst, align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _conv3x3_jit(wmat, xflat, plane, wp, q_n, out):
    """:data:`ordered_conv3x3` by tiles of ROWS channels x TILE pixels, the rest by loops."""
    o_n, k_n = wmat.shape
    offs = np.empty(k_n, np.int64)
    for k in range(k_n):
        c, t = k // 9, k % 9
        offs[k] = c * plane + (t // 3) * wp + t % 3
    o4 = o_n - o_n % ROWS
    full = q_n - q_n % TILE
    ldo = out.shape[1]
    for ob in range(0, o4, ROWS):
        w0 = wmat.ctypes.data + 4 * ob * k_n
        o0 = out.ctypes.data + 4 * ob * ldo
        for q in range(0, full, TILE):
            _tile(w0, k_n, xflat.ctypes.data + 4 * q, offs.ctypes.data, k_n, o0 + 4 * q, ldo)
    _conv3x3_loops(wmat, xflat, plane, wp, 0, o4, full, q_n, out)
    _conv3x3_loops(wmat, xflat, plane, wp, o4, o_n, 0, q_n, out)
    return out


def _conv3x3_plain(wmat, xflat, plane, wp, q_n, out):
    """The loops alone (no intrinsic runs under NUMBA_DISABLE_JIT)."""
    return _conv3x3_loops(wmat, xflat, plane, wp, 0, wmat.shape[0], 0, q_n, out)


ordered_conv3x3 = _conv3x3_plain if numba.config.DISABLE_JIT else _conv3x3_jit
"""``ordered_conv3x3(wmat, xflat, plane, wp, q_n, out)``: the fixed-order sums of a 3x3 stride-1
conv read straight from zero-padded images, no im2col: ``out[o, q] = sum_k wmat[o, k]
xflat[c*plane + ky*wp + kx + q]`` for k = (c*3 + ky)*3 + kx taken in order (the order of
:func:`ordered_gemm` on im2col columns), where the padded images (row length wp = W + 2) are
flattened, plane = (H + 2) wp apart, and output pixel (oy, ox) is at q = oy*wp + ox (the two
columns per row with ox >= W are computed and not used). xflat must hold 2 elements past the
last plane; wmat ``[O, 9C]``, out ``[O, Q]`` (both C-contiguous).

Whole tiles of 8 channels x 32 pixels (4 x 16 on targets without AVX-512) keep their sums in
registers over all 9C terms (:func:`_tile`), where the pixel loops load and store each partial
sum once per kernel row and read every input three times per output channel; the same
roundings in the same order either way, so the same bits."""


@numba.njit(cache=True, nogil=True)
def _linear_loops(f, weight_t, bias, out):
    """:data:`ordered_linear` by loops over the classes (LLVM vectorizes them)."""
    n_s, k_n = f.shape
    o_n = out.shape[1]
    for n in range(n_s):
        acc = out[n]
        f0 = f[n, 0]
        w = weight_t[0]
        for o in range(o_n):
            acc[o] = f0 * w[o]
        for k in range(1, k_n):
            fk = f[n, k]
            w = weight_t[k]
            for o in range(o_n):
                acc[o] += fk * w[o]
        for o in range(o_n):
            acc[o] += bias[o]
    return out


@intrinsic
def _linear_tile(typingctx, f_addr, w_addr, ldw, terms, out_addr):
    """``out[i] = fl(... fl(fl(f[0] W[i]) + fl(f[1] W[ldw + i])) + ...)`` over k < terms for
    i < LANES (addresses as integers, float32): one vector of sums in a register, every product
    and partial sum rounded, k in order (``fmul``/``fadd`` without fast-math flags)."""
    sig = types.void(*([types.intp] * 5))

    def codegen(context, builder, signature, args):
        fa, wa, ldw, terms, outa = args
        f32, i64 = ir.FloatType(), ir.IntType(64)
        vec = ir.VectorType(f32, LANES)
        f_p = builder.inttoptr(fa, f32.as_pointer())
        w_p = builder.inttoptr(wa, f32.as_pointer())

        def product(k):
            row = builder.load(builder.bitcast(builder.gep(w_p, [builder.mul(k, ldw)]),
                                               vec.as_pointer()), align=4)
            fk = builder.load(builder.gep(f_p, [k]))
            fv = splat(builder, fk, LANES)
            return builder.fmul(fv, row)

        first = product(ir.Constant(i64, 0))
        acc, = accumulate(builder, ir.Constant(i64, 1), terms, [first], 1,
                          lambda k, acc: [builder.fadd(acc[0], product(k))], "linear")
        builder.store(acc, builder.bitcast(builder.inttoptr(outa, f32.as_pointer()),
                                           vec.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _linear_jit(f, weight_t, bias, out):
    """:data:`ordered_linear` by :func:`_linear_tile` on blocks of LANES classes when the rows
    of ``weight_t`` hold whole blocks (:func:`pad_classes`), else by the loops."""
    n_s, k_n = f.shape
    o_n, ldw = out.shape[1], weight_t.shape[1]
    if ldw % LANES != 0 or not f.flags.c_contiguous or not weight_t.flags.c_contiguous:
        return _linear_loops(f, weight_t, bias, out)
    sums = np.empty(LANES, np.float32)
    for n in range(n_s):
        for o0 in range(0, o_n, LANES):
            _linear_tile(f[n].ctypes.data, weight_t.ctypes.data + 4 * o0, ldw, k_n,
                         sums.ctypes.data)
            for i in range(min(LANES, o_n - o0)):
                out[n, o0 + i] = sums[i] + bias[o0 + i]
    return out


ordered_linear = _linear_loops if numba.config.DISABLE_JIT else _linear_jit
"""``ordered_linear(f, weight_t, bias, out)``: ``out[n, o] = (sum_k f[n, k] weight_t[k, o]) +
bias[o]``, summed for k = 0..K-1 in order, then the bias added (float32; weight_t is the
``[K, O']`` transpose of the layer's weight, O' >= O = ``out.shape[1]`` columns, those past O
ignored). With O' a multiple of LANES (:func:`pad_classes`) each block of LANES classes keeps
its sums in one vector register over all K terms (a chain of K dependent additions, where the
loops store and reload the partial sums at every k); the same roundings either way."""


def pad_classes(weight_t: np.ndarray) -> np.ndarray:
    """``[K, O]`` float32 weights with zero columns appended up to a multiple of LANES, the
    layout in which :data:`ordered_linear` runs by register tiles."""
    k_n, o_n = weight_t.shape
    out = np.zeros((k_n, -(-o_n // LANES) * LANES), np.float32)
    out[:, :o_n] = weight_t
    return out
