"""Numba, imported for a quick start: ``from .jit import numba`` in every kernel module.

Numba's first compilation or cache load in a process imports ``numba.np.arraymath``, which
probes for SciPy's BLAS (``import scipy.linalg.cython_blas``) only to decide whether jitted
``np.dot`` may call it; with SciPy installed that import alone takes 0.25-0.5 s, half of what
``python -m xnorcdl infer --limit 1`` may spend. No kernel here calls BLAS from jitted code (the
float32 GEMMs run in NumPy), so this module imports ``numba.np.arraymath`` once with that probe
answered "not installed" (a ``None`` entry in ``sys.modules``, removed right after, so SciPy
stays importable as usual). Jitted ``np.dot`` would still find SciPy: Numba imports it again
when such a function is compiled.

**Vector width.** LLVM's models of the AVX-512 processors (Skylake-SP to Emerald Rapids, Zen 4)
carry the tuning flag ``prefer-256-bit``: with it, loops are vectorized on 256-bit registers
even where 512-bit ones exist. The kernels' hot loops (XOR + ``vpopcntq`` over packed words,
the float32 passes) are throughput-bound and run faster on 512-bit vectors (measured on a
two-core Emerald Rapids: the edge path 22 % faster, the streaming popcount loop 6.4 -> 9.6 G
words/s; benchmarks/RESULTS.md), so on a host with AVX-512F this module asks Numba for the
host's features plus ``-prefer-256-bit`` (``numba.config.CPU_FEATURES``), before anything is
compiled. The results do not change: no kernel uses fastmath, so LLVM may not reassociate a
float sum whatever the width, and the integer sums are exact. ``XNORCDL_VECTOR_BITS=256``
keeps LLVM's choice (any other value, or none, asks for 512); a ``NUMBA_CPU_NAME`` or ``NUMBA_CPU_FEATURES`` of the user's is left
alone. The setting is process-wide: Numba functions of the caller compiled after this import
get it too. Numba's cache keys on the features, so entries of either width are kept apart.

**Cache folder.** Numba revalidates a cached function against its own source file only: a
function that calls a kernel of another module (the edge program calls nearly all of them)
keeps running the callee's old machine code from the cache after that module changed. So,
unless the user chose ``NUMBA_CACHE_DIR``, the cache lives in
``$XDG_CACHE_HOME/xnorcdl/numba/<fingerprint>`` (``~/.cache`` by default), the fingerprint a
hash of every source file of this package (:func:`source_fingerprint`): any change of a kernel
starts a fresh cache, a warm one is reused as long as nothing changed.
"""
import functools
import hashlib
import os
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

_kernels = sys.modules[__package__]   # the package, for its flags

def wide_vector_features():
    """The CPU features string that lifts ``prefer-256-bit``, or None where it does not apply:
    no AVX-512F on the host, ``XNORCDL_VECTOR_BITS=256``, or the user chose Numba's target."""
    if os.environ.get("XNORCDL_VECTOR_BITS", "512") == "256":
        return None
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        return None
    features = host_features()
    if not features.get("avx512f"):
        return None
    return features.flatten() + ",-prefer-256-bit"


@functools.lru_cache(maxsize=None)
def host_features():
    """LLVM's feature map of this processor, read once (each query costs about 0.25 ms, and
    the fast backend asks per block); not to be modified."""
    import llvmlite.binding as ll
    return ll.get_host_cpu_features()


def host_has(feature: str) -> bool:
    """Whether this processor has ``feature`` (an LLVM feature name: "avx2", "avx512f", ...)."""
    return bool(host_features().get(feature))


def target_has(feature: str) -> bool:
    """Whether the code Numba compiles here may use ``feature``: the JIT is on and the feature
    is in the host's features or, where the user set ``NUMBA_CPU_FEATURES``, in those."""
    if numba.config.DISABLE_JIT:
        return False
    feats = numba.config.CPU_FEATURES
    if feats is None:
        return host_has(feature)
    return "+" + feature in feats.split(",")


if numba.config.CPU_FEATURES is None and not numba.config.DISABLE_JIT:
    numba.config.CPU_FEATURES = wide_vector_features()


def source_fingerprint(folder: str = os.path.dirname(os.path.abspath(__file__))) -> str:
    """16 hex digits of sha256 over the names and bytes of the ``.py`` files in ``folder``."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            h.update(name.encode() + b"\0")
            with open(os.path.join(folder, name), "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()[:16]


def cache_folder() -> str:
    """Where the kernels' compiled code is cached: ``NUMBA_CACHE_DIR`` when the user set it,
    else ``$XDG_CACHE_HOME/xnorcdl/numba/<source_fingerprint()>``."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xnorcdl", "numba", source_fingerprint())


if not os.environ.get("NUMBA_CACHE_DIR"):
    numba.config.CACHE_DIR = cache_folder()

if not _kernels.NUMBA_EXTENSIONS:     # set by python -m xnorcdl (xnorcdl.cli)
    from numba.core import entrypoints as _entrypoints
    _entrypoints._already_initialized = True

__all__ = ["numba", "wide_vector_features", "source_fingerprint", "cache_folder"]
