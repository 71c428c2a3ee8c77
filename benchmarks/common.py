"""Shared benchmark plumbing: single-thread setup, interleaved timing, machine facts.

Import this module before numpy/torch: it pins BLAS and OpenMP pools to one thread.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Dict, List

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import numba  # noqa: E402
import numpy as np  # noqa: E402

from xnorcdl.kernels.popcount import popcount  # noqa: E402


def time_interleaved(fns: Dict[str, Callable[[], object]], repeat: int, rounds: int = 10,
                     warmup: int = 5) -> Dict[str, Dict[str, float]]:
    """Median, 10th percentile and minimum seconds per call of each function.

    The calls are interleaved in ``rounds`` rounds (each function ``repeat // rounds`` times per
    round), so a burst of load from other processes hits every contender alike.
    """
    for f in fns.values():
        for _ in range(warmup):
            f()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    per_round = max(1, repeat // rounds)
    for _ in range(rounds):
        for name, f in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                f()
                samples[name].append(time.perf_counter() - t0)
    return {k: {"median": statistics.median(v), "p10": float(np.percentile(v, 10)),
                "min": min(v), "n": len(v)} for k, v in samples.items()}


@numba.njit(cache=True, nogil=True)
def _dependent_chain(n, x):
    # each step: shift, xor, add on the previous value, three 1-cycle integer operations in a
    # chain that LLVM can neither vectorize nor put in closed form
    for i in range(n):
        x = (x ^ (x >> np.uint64(7))) + np.uint64(i)
    return x


def measured_clock_hz(n: int = 200_000_000) -> float:
    """Core clock estimated as 3 cycles per step of a dependent shift-xor-add chain."""
    _dependent_chain(1000, np.uint64(1))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        _dependent_chain(n, np.uint64(1))
        best = min(best, time.perf_counter() - t0)
    return 3 * n / best


@numba.njit(cache=True, nogil=True)
def _popcount_stream(a, b, reps):
    total = np.uint64(0)
    for _ in range(reps):
        s = np.uint64(0)
        for i in range(a.shape[0]):
            s += popcount(a[i] ^ b[i])
        total += s
    return total


def streaming_popcount_words_per_s(words: int = 2048, reps: int = 2000) -> float:
    """XOR+popcount words per second on L1-resident data, the best this loop form reaches."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, words, dtype=np.uint64)
    b = rng.integers(0, 2**63, words, dtype=np.uint64)
    _popcount_stream(a, b, 1)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        _popcount_stream(a, b, reps)
        best = min(best, time.perf_counter() - t0)
    return words * reps / best


def machine() -> Dict[str, object]:
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("cpu MHz"):
                info["cpuinfo_mhz"] = float(line.split(":", 1)[1])
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["simd"] = sorted(f for f in flags if f in {
                    "avx2", "fma", "popcnt", "bmi2", "avx512f", "avx512_vpopcntdq",
                    "avx512_vnni", "avx_vnni"})
                break
    except OSError:
        pass
    info["cores"] = os.cpu_count()
    info["loadavg"] = os.getloadavg()
    info["env"] = {k: os.environ.get(k) for k in (
        "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS")}
    return info
