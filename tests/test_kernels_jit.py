"""Numba facts the kernels rely on: popcount is a machine instruction, every kernel is cached."""
import importlib
import os
import pkgutil
import re
import subprocess
import sys

import numba
import numpy as np
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


def _popcount_asm() -> str:
    from xnorcdl.kernels.popcount import popcount_sum
    fresh = numba.njit(nogil=True)(popcount_sum.py_func)
    u = np.zeros(4, np.uint64)
    fresh(u, u)
    return "\n".join(fresh.inspect_asm().values()).lower()


def _host_has(feature: str) -> bool:
    import llvmlite.binding as ll
    return bool(ll.get_host_cpu_features().get(feature))


def test_popcount_loop_takes_512_bit_vectors_on_avx512():
    """xnorcdl.kernels.jit lifts LLVM's prefer-256-bit on AVX-512 hosts: the popcount loop's
    vpopcntq works on zmm registers (8 words per instruction)."""
    if not _host_has("avx512vpopcntdq"):
        pytest.skip("no AVX-512 VPOPCNTDQ on this host")
    if os.environ.get("XNORCDL_VECTOR_BITS") == "256" or os.environ.get("NUMBA_CPU_NAME") \
            or os.environ.get("NUMBA_CPU_FEATURES"):
        pytest.skip("vector width chosen by the environment")
    assert "-prefer-256-bit" in numba.config.CPU_FEATURES
    assert re.search(r"vpopcntq\s+%zmm", _popcount_asm())


def test_vector_bits_256_keeps_llvm_choice():
    """``XNORCDL_VECTOR_BITS=256`` leaves Numba's target as LLVM's model of the host has it
    (no zmm popcount where that model prefers 256-bit vectors, as on most AVX-512 Intel and
    Zen 4 parts; zmm where it does not, as on Zen 5), and 512 gives zmm popcounts everywhere.
    LLVM's own choice is the probe under the host's plain ISA features, which carry no
    tuning flags."""
    if not _host_has("avx512vpopcntdq"):
        pytest.skip("no AVX-512 VPOPCNTDQ on this host")
    import llvmlite.binding as ll
    probe = ("import re, sys; sys.path.insert(0, 'tests'); import test_kernels_jit as t; "
             "print(bool(re.search(r'vpopcntq\\s+%zmm', t._popcount_asm())))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("XNORCDL_VECTOR_BITS", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}

    def zmm(extra):
        out = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True,
                             env={**env, **extra}, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    llvm = zmm({"NUMBA_CPU_NAME": ll.get_host_cpu_name(),
                "NUMBA_CPU_FEATURES": ll.get_host_cpu_features().flatten()})
    assert zmm({"XNORCDL_VECTOR_BITS": "256"}) == llvm
    assert zmm({"XNORCDL_VECTOR_BITS": "512"}) == "True"


def test_wide_vector_features_respects_the_environment(monkeypatch):
    from xnorcdl.kernels.jit import wide_vector_features
    for var in ("XNORCDL_VECTOR_BITS", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES"):
        monkeypatch.delenv(var, raising=False)
    wide = wide_vector_features()
    assert (wide is not None) == _host_has("avx512f")
    if wide is not None:
        assert wide.endswith(",-prefer-256-bit") and "+avx512f" in wide
    monkeypatch.setenv("XNORCDL_VECTOR_BITS", "256")
    assert wide_vector_features() is None
    monkeypatch.setenv("XNORCDL_VECTOR_BITS", "512")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2")
    assert wide_vector_features() is None


def test_cache_folder_follows_the_sources(tmp_path, monkeypatch):
    """The cache folder's name is a fingerprint of the kernels' sources: a one-byte change of
    any module gives another folder (Numba would revalidate only the changed module's own
    functions, and callers elsewhere would keep its old code); ``NUMBA_CACHE_DIR`` wins."""
    from xnorcdl.kernels import jit
    src = os.path.dirname(jit.__file__)
    for name in ("jit.py", "ordered.py", "edgeprogram.py"):
        with open(os.path.join(src, name), "rb") as f:
            (tmp_path / name).write_bytes(f.read())
    before = jit.source_fingerprint(str(tmp_path))
    assert re.fullmatch(r"[0-9a-f]{16}", before)
    assert jit.source_fingerprint(str(tmp_path)) == before
    (tmp_path / "ordered.py").write_bytes((tmp_path / "ordered.py").read_bytes() + b" ")
    assert jit.source_fingerprint(str(tmp_path)) != before
    (tmp_path / "notes.txt").write_text("not a source")
    changed = jit.source_fingerprint(str(tmp_path))
    (tmp_path / "notes.txt").write_text("still not a source")
    assert jit.source_fingerprint(str(tmp_path)) == changed

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jit.cache_folder() == str(tmp_path / "xdg" / "xnorcdl" / "numba"
                                     / jit.source_fingerprint())
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert jit.cache_folder() == str(tmp_path / "mine")


def test_this_process_caches_in_the_fingerprinted_folder():
    from xnorcdl.kernels import jit
    from xnorcdl.kernels.ordered import ordered_gemm
    if os.environ.get("NUMBA_CACHE_DIR"):
        pytest.skip("cache folder chosen by the environment")
    assert numba.config.CACHE_DIR == jit.cache_folder()
    assert ordered_gemm._cache._cache_path.startswith(jit.cache_folder())
