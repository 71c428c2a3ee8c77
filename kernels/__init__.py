"""Compute kernels of xnorcdl, importable as ``xnorcdl.kernels``: a leaf package, importing
nothing from the rest of xnorcdl (only NumPy and Numba), so that it can be read, tested and
benchmarked on its own.

``reference`` holds the pure-NumPy oracle every fast kernel is tested against; ``registry``
names every kernel the fast backend (:mod:`xnorcdl.backends.fast`) runs; ``codes`` holds the
quantizers' codes in plain NumPy, the one definition :mod:`xnorcdl.quant` re-exports, and
``quantize`` their scalar forms for the jitted kernels.
"""

#: whether :mod:`~xnorcdl.kernels.jit` lets Numba load its ``numba_extensions`` entry points
#: (Numba's default); ``python -m xnorcdl`` sets it to False before anything imports Numba
NUMBA_EXTENSIONS = True
