"""Numba facts the kernels rely on: popcount is a machine instruction, every kernel is cached."""
import importlib
import pkgutil

import numba
import pytest
from numba.core.dispatcher import Dispatcher

import xnorcdl.kernels
from xnorcdl.kernels.popcount import popcount_instructions

pytestmark = pytest.mark.skipif(numba.config.DISABLE_JIT, reason="needs the JIT")

POPCOUNT = {"popcnt", "popcntq", "vpopcntq", "vpopcntd"}


def kernel_dispatchers():
    for info in pkgutil.iter_modules(xnorcdl.kernels.__path__):
        module = importlib.import_module(f"xnorcdl.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, Dispatcher) and obj.__module__ == module.__name__:
                yield f"{module.__name__}.{name}", obj


def test_popcount_compiles_to_popcnt():
    assert popcount_instructions() & POPCOUNT


def test_every_kernel_is_cached_and_nogil():
    found = dict(kernel_dispatchers())
    assert "xnorcdl.kernels.bitconv.popcount_dot" in found
    for name, disp in found.items():
        assert disp._cache.__class__.__name__ != "NullCache", f"{name}: compiled without cache=True"
        assert disp.targetoptions.get("nogil"), f"{name}: compiled without nogil=True"
        assert not disp.targetoptions.get("fastmath"), f"{name}: fastmath breaks exactness"
