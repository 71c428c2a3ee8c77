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

from .jit import numba
import numpy as np


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
def ordered_conv3x3(wmat, xflat, plane, wp, q_n, out):
    """The fixed-order sums of a 3x3 stride-1 conv read straight from zero-padded images, no
    im2col: ``out[o, q] = sum_k wmat[o, k] xflat[c*plane + ky*wp + kx + q]`` for k = (c*3 +
    ky)*3 + kx taken in order (the order of :func:`ordered_gemm` on im2col columns), where the
    padded images (row length wp = W + 2) are flattened, plane = (H + 2) wp apart, and output
    pixel (oy, ox) is at q = oy*wp + ox (the two columns per row with ox >= W are computed and
    not used). xflat must hold 2 elements past the last plane; wmat ``[O, 9C]``, out ``[O, Q]``.
    """
    o_n, k_n = wmat.shape
    for o in range(o_n):
        acc = out[o]
        w0 = wmat[o, 0]
        for q in range(q_n):
            acc[q] = w0 * xflat[np.uint64(q)]
        # three taps (one kernel row) per pass, added in order, as in ordered_gemm
        for k in range(1, k_n):
            c, t = k // 9, k % 9
            if t % 3 != 0 and k != 1:
                continue
            if k == 1:                  # taps 1 and 2 of the first kernel row
                wa, wb = wmat[o, 1], wmat[o, 2]
                for q in range(q_n):
                    u = np.uint64(q)
                    acc[q] = (acc[q] + wa * xflat[u + np.uint64(1)]) + wb * xflat[u + np.uint64(2)]
                continue
            base = np.uint64(c * plane + (t // 3) * wp)
            wa, wb, wc = wmat[o, k], wmat[o, k + 1], wmat[o, k + 2]
            for q in range(q_n):
                u = base + np.uint64(q)
                acc[q] = ((acc[q] + wa * xflat[u]) + wb * xflat[u + np.uint64(1)]) \
                    + wc * xflat[u + np.uint64(2)]
    return out


@numba.njit(cache=True, nogil=True)
def ordered_linear(f, weight_t, bias, out):
    """``out[n, o] = (sum_k f[n, k] weight_t[k, o]) + bias[o]``, summed for k = 0..K-1 in order,
    then the bias added (float32; weight_t is the ``[K, O]`` transpose of the layer's weight)."""
    n_s, k_n = f.shape
    o_n = weight_t.shape[1]
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
