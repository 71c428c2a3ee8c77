"""NumPy's own ``cblas_sgemm``, as a ctypes function that jitted code can call.

A cloud block at batch 1 is two sgemm calls and four short jitted passes; run from Python, that
is seven calls, each a release and re-acquisition of the GIL (the cost that keeps two worker
threads from scaling) and a few microseconds of dispatch. Numba calls a ctypes function passed
as an argument directly (no GIL, no Python), so :mod:`~xnorcdl.kernels.cloudblock` runs a whole
block in one jitted call through the function found here.

The function is the one NumPy's ``matmul`` calls: the OpenBLAS NumPy ships in ``numpy.libs``
(``scipy_cblas_sgemm64_``, 64-bit integers, in NumPy >= 2 wheels; ``cblas_sgemm64_`` or plain
``cblas_sgemm`` in older or other builds), so thread limits set through threadpoolctl apply to
it and its results equal ``np.matmul``'s on the same operands (NumPy calls gemv instead when a
product has one row or one column). Where no such library is found
(NumPy built against a system BLAS, MKL, Accelerate), :func:`sgemm` returns None and the
callers keep their ``np.matmul`` path.
"""
from __future__ import annotations

import ctypes
import glob
import os
from typing import Optional

#: (symbol, integer type) tried in order in each candidate library
SYMBOLS = (("scipy_cblas_sgemm64_", ctypes.c_int64), ("cblas_sgemm64_", ctypes.c_int64),
           ("scipy_cblas_sgemm", ctypes.c_int32), ("cblas_sgemm", ctypes.c_int32))

#: CBLAS enums: row-major storage, no transpose
ROW_MAJOR, NO_TRANS = 101, 111

_found = []


def _libraries():
    import numpy as np
    here = os.path.dirname(os.path.abspath(np.__file__))
    out = []
    for folder in (os.path.join(here, "..", "numpy.libs"), os.path.join(here, ".dylibs")):
        out += sorted(glob.glob(os.path.join(folder, "*openblas*")))
    return out


def _load():
    for path in _libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name, itype in SYMBOLS:
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            enum, scalar, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
            proto = ctypes.CFUNCTYPE(None, enum, enum, enum, itype, itype, itype,   # m n k
                                     scalar, ptr, itype, ptr, itype,                # alpha a b
                                     scalar, ptr, itype)                            # beta c
            return proto(ctypes.cast(fn, ctypes.c_void_p).value)
    return None


def sgemm() -> Optional[object]:
    """``sgemm(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`` (pointers
    as integers) from NumPy's OpenBLAS, or None; looked up once per process.
    ``XNORCDL_JIT_SGEMM=0`` turns it off (the callers then use ``np.matmul``)."""
    if not _found:
        _found.append(None if os.environ.get("XNORCDL_JIT_SGEMM") == "0" else _load())
    return _found[0]
