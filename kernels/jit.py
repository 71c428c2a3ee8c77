"""Numba, imported for a quick start: ``from .jit import numba`` in every kernel module.

Numba's first compilation or cache load in a process imports ``numba.np.arraymath``, which
probes for SciPy's BLAS (``import scipy.linalg.cython_blas``) only to decide whether jitted
``np.dot`` may call it; with SciPy installed that import alone takes 0.25-0.5 s, half of what
``python -m xnorcdl infer --limit 1`` may spend. No kernel here calls BLAS from jitted code (the
float32 GEMMs run in NumPy), so this module imports ``numba.np.arraymath`` once with that probe
answered "not installed" (a ``None`` entry in ``sys.modules``, removed right after, so SciPy
stays importable as usual). Jitted ``np.dot`` would still find SciPy: Numba imports it again
when such a function is compiled.
"""
import sys

_PROBE = "scipy.linalg.cython_blas"

if "numba.np.arraymath" not in sys.modules and _PROBE not in sys.modules:
    sys.modules[_PROBE] = None
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        if _PROBE in sys.modules and sys.modules[_PROBE] is None:
            del sys.modules[_PROBE]

import numba  # noqa: E402

__all__ = ["numba"]
