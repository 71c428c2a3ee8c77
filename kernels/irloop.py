"""The counted loop with vector accumulators that the ``@intrinsic`` tiles emit in LLVM IR
(:mod:`~xnorcdl.kernels.directconv`, :mod:`~xnorcdl.kernels.nibbleconv`): the accumulators are
loop phis, so they live in vector registers whatever LLVM's vectorizers decide; and the
broadcast of a scalar to every lane that their bodies share."""
from __future__ import annotations

from llvmlite import ir


def accumulate(builder, start, stop, zero, n_acc, body, name):
    """Emit ``for k in range(start, stop): acc = body(k, acc)`` with ``n_acc`` accumulators
    starting at ``zero`` (a constant of their type, or a list of ``n_acc`` values computed
    before the loop); ``body(k, acc)`` emits the loop body at the builder and returns the new
    accumulators. Returns their values after the loop (the starting values when it does not
    run), with the builder positioned after it."""
    inits = list(zero) if isinstance(zero, (list, tuple)) else [zero] * n_acc
    i64 = ir.IntType(64)
    entry = builder.block
    loop = builder.append_basic_block(name + ".loop")
    done = builder.append_basic_block(name + ".done")
    builder.cbranch(builder.icmp_signed("<", start, stop), loop, done)

    builder.position_at_end(loop)
    k = builder.phi(i64)
    acc = [builder.phi(v.type) for v in inits]
    k.add_incoming(start, entry)
    for a, v in zip(acc, inits):
        a.add_incoming(v, entry)
    new = body(k, acc)
    k_next = builder.add(k, ir.Constant(i64, 1))
    tail = builder.block
    k.add_incoming(k_next, tail)
    for a, b in zip(acc, new):
        a.add_incoming(b, tail)
    builder.cbranch(builder.icmp_signed("<", k_next, stop), loop, done)

    builder.position_at_end(done)
    out = []
    for b, v in zip(new, inits):      # all phis first: LLVM wants them at the top of the block
        f = builder.phi(v.type)
        f.add_incoming(v, entry)
        f.add_incoming(b, tail)
        out.append(f)
    return out


def splat(builder, value, lanes):
    """``value`` (a scalar IR value) in every lane of a ``lanes``-wide vector: an insert into
    lane 0 and a shuffle by an all-zero mask, which LLVM emits as one broadcast."""
    vec = ir.VectorType(value.type, lanes)
    undef = ir.Constant(vec, ir.Undefined)
    i32 = ir.IntType(32)
    first = builder.insert_element(undef, value, ir.Constant(i32, 0))
    return builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(i32, lanes),
                                                            [0] * lanes))
