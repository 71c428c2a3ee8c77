"""The residual epilogue of a binary block, one output row at a time in explicit vectors.

A binary block's last step (:mod:`~xnorcdl.kernels.nibbleblock`, :mod:`~xnorcdl.kernels.wordblock`)
is, per output channel o and row y,

    out[o, y, x] = float32(base2[o, q] - 2 acc2[o, q]) * s2[o] + r[x],   q = y Wq + x,

with the integers in int16 and r the shortcut's row (the block's input row, every other pixel
of it for the zero-pad shortcut, or the given 1x1-conv shortcut). Rows are short (Wo = 32, 16
or 8 on CIFAR-10), and a loop vectorized by LLVM spends about as long on its entry (overlap
checks, a scalar tail) as on the row itself, and a view of each row costs two reference-count
calls. :func:`residual_vectors` runs all rows of a channel at given addresses as whole vectors of 16
and then 8 lanes, emitted in LLVM IR (a tile, no checks: the callers' arrays never overlap);
the caller runs the last Wo mod 8 pixels of each row as a scalar loop. The float32 operations are those of
the loop: an exact int16 -> float32 conversion, ``fmul`` then ``fadd``, each rounded (no
fast-math flags), so the bits are the same. With ``NUMBA_DISABLE_JIT=1`` it is that loop.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .irloop import accumulate, splat
from .jit import numba


def _plane_codegen(step: int):
    """Codegen of ``d[y ld + i] = float32(bo[y lq + i] - 2 ac[y lq + i]) * s + r[y lr + step i]``
    for y < rows and i < 16 n16 + 8 n8 (addresses as integers; strides in elements)."""
    def codegen(context, builder, signature, args):
        bo, ac, r, d, s, n16, n8, rows, lq, lr, ld = args
        i16, i32, i64, f32 = ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
        bo_p, ac_p = builder.inttoptr(bo, i16.as_pointer()), builder.inttoptr(ac, i16.as_pointer())
        r_p, d_p = builder.inttoptr(r, f32.as_pointer()), builder.inttoptr(d, f32.as_pointer())
        zero = ir.Constant(i64, 0)

        def vectors(lanes, first, count, q0, r0, d0):
            v16, vf = ir.VectorType(i16, lanes), ir.VectorType(f32, lanes)
            wide = ir.VectorType(f32, lanes * step)
            scale = splat(builder, s, lanes)
            evens = ir.Constant(ir.VectorType(i32, lanes), [step * i for i in range(lanes)])

            def load(ptr, typ, offset, align):
                return builder.load(builder.bitcast(builder.gep(ptr, [offset]),
                                                    typ.as_pointer()), align=align)

            def body(k, acc):
                at = builder.add(first, builder.mul(k, ir.Constant(i64, lanes)))
                q = builder.add(q0, at)
                b, a = load(bo_p, v16, q, 2), load(ac_p, v16, q, 2)
                t = builder.fmul(builder.sitofp(builder.sub(builder.sub(b, a), a), vf), scale)
                rv = load(r_p, wide, builder.add(r0, builder.mul(at, ir.Constant(i64, step))), 4)
                if step != 1:
                    rv = builder.shuffle_vector(rv, ir.Constant(wide, ir.Undefined), evens)
                builder.store(builder.fadd(t, rv), builder.bitcast(
                    builder.gep(d_p, [builder.add(d0, at)]), vf.as_pointer()), align=4)
                return []

            accumulate(builder, zero, count, [], 0, body, "row%d" % lanes)

        def row(y, acc):
            q0, r0, d0 = (builder.mul(y, stride) for stride in (lq, lr, ld))
            vectors(16, zero, n16, q0, r0, d0)
            vectors(8, builder.mul(n16, ir.Constant(i64, 16)), n8, q0, r0, d0)
            return []

        accumulate(builder, zero, rows, [], 0, row, "rows")
        return context.get_dummy_value()
    return codegen


def _plane_intrinsic(step: int):
    @intrinsic
    def tile(typingctx, bo, ac, r, d, s, n16, n8, rows, lq, lr, ld):
        sig = types.void(types.intp, types.intp, types.intp, types.intp, types.float32,
                         *([types.intp] * 6))
        return sig, _plane_codegen(step)
    return tile


_plane, _plane_s2 = _plane_intrinsic(1), _plane_intrinsic(2)


@numba.njit(cache=True, nogil=True, inline="always")
def _residual_vectors(bo, ac, r, d, s, n, step, rows, lq, lr, ld):
    v16 = n // 16
    v8 = (n - 16 * v16) // 8
    if step == 1:
        _plane(bo, ac, r, d, s, v16, v8, rows, lq, lr, ld)
    else:
        _plane_s2(bo, ac, r, d, s, v16, v8, rows, lq, lr, ld)
    return 16 * v16 + 8 * v8


@numba.njit(cache=True, nogil=True, inline="always")
def _no_vectors(bo, ac, r, d, s, n, step, rows, lq, lr, ld):
    return 0


residual_vectors = _no_vectors if numba.config.DISABLE_JIT else _residual_vectors
"""``residual_vectors(bo, ac, r, d, s, n, step, rows, lq, lr, ld)`` -> m: for each row y <
rows, ``d[y ld + i] = float32(bo[y lq + i] - 2 ac[y lq + i]) * s + r[y lr + step i]`` for i <
m, the whole vectors of 16 and 8 lanes among the first n (0 with the JIT disabled: the caller's
scalar loop does the rest); bo, ac the addresses of int16 rows, r and d of float32 rows (r with
``step m`` readable entries per row, d not overlapping the others), strides in elements."""
