"""Population count of a 64-bit word for Numba kernels.

Numba has no built-in CPU popcount. :func:`popcount` is an ``@intrinsic`` that emits LLVM's
``llvm.ctpop.i64``; on any x86-64 CPU with the POPCNT extension LLVM lowers it to one ``popcnt``
instruction (to a ``vpshufb`` nibble table when it vectorizes a loop on AVX2, or ``vpopcntq`` on
AVX-512 VPOPCNTDQ). :func:`popcount_instructions` reads the assembly Numba generated so a test
can check that, instead of assuming it.

With ``NUMBA_DISABLE_JIT=1`` jitted kernels run as plain Python, where an intrinsic cannot be
called; :data:`popcount` is then a Python function with the same meaning.
"""
from __future__ import annotations

import re

from .jit import numba
import numpy as np
from numba import types
from numba.extending import intrinsic


@intrinsic
def _ctpop_u64(typingctx, x):
    """``llvm.ctpop`` on a uint64, returning uint64 (the number of set bits, 0..64)."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


def _popcount_python(x) -> np.uint64:
    """Pure-Python popcount, used only when the JIT is disabled."""
    return np.uint64(int(x).bit_count())


popcount = _popcount_python if numba.config.DISABLE_JIT else _ctpop_u64
"""Number of set bits of a uint64 word (call with a ``np.uint64``)."""


@numba.njit(cache=True, nogil=True)
def popcount_sum(a, b):
    """sum_i popcount(a[i] XOR b[i]) over two uint64 vectors: the Hamming distance of two bit
    strings, the quantity every binary dot product here is built from."""
    s = np.uint64(0)
    for i in range(a.shape[0]):
        s += popcount(a[i] ^ b[i])
    return s


def popcount_instructions(func=popcount_sum, args=None) -> set:
    """The popcount mnemonics (``popcnt``, ``popcntq``, ``vpopcntq``, ...) in the machine code
    Numba generates for the jitted ``func`` called with ``args`` (default: two uint64 vectors);
    empty when the JIT is disabled.

    Numba cannot show the assembly of code it loaded from its on-disk cache, so this compiles a
    fresh, non-caching copy of ``func`` to read it.
    """
    if numba.config.DISABLE_JIT:
        return set()
    if args is None:
        u = np.zeros(4, np.uint64)
        args = (u, u)
    fresh = numba.njit(nogil=True)(func.py_func)
    fresh(*args)
    found = set()
    for asm in fresh.inspect_asm().values():
        found.update(m.group(0) for m in re.finditer(r"\bv?popcnt[a-z]*\b", asm))
    return found
