"""Compute kernels of xnorcdl, importable as ``xnorcdl.kernels``.

``reference`` holds the pure-NumPy oracle every fast kernel is tested against.
"""
