"""Print the LLVM features of this processor with everything past AVX2 switched off, for
``NUMBA_CPU_FEATURES``: the kernels then compile as for an AVX2-only processor (AVX2, FMA,
BMI2, POPCNT; no AVX-512, no VNNI, no AMX), so both binary kernels can be timed on an AVX-512
host as an AVX2-only machine would run them. NumPy's BLAS and ONNX Runtime pick their own
kernels from the processor and are not affected.

Usage::

    NUMBA_CPU_NAME=znver3 NUMBA_CPU_FEATURES="$(python benchmarks/avx2_target.py)" \\
        NUMBA_CACHE_DIR=/tmp/xnorcdl-avx2 python benchmarks/bench_e2e.py ...
"""
import llvmlite.binding as ll

#: features newer than AVX2 that an AVX2-only processor (Haswell, Zen 1-3) lacks
NEWER = ("avx512", "amx", "avxvnni", "avxifma", "avxneconvert", "avx10", "vpclmulqdq", "vaes",
         "gfni", "evex512", "sha512", "sm3", "sm4", "cmpccxadd", "raoint", "prefetchi")


def avx2_features() -> str:
    feats = ll.get_host_cpu_features()
    for name in list(feats):
        if name.startswith(NEWER):
            feats[name] = False
    if not feats.get("avx2"):
        raise SystemExit("this processor has no AVX2")
    return feats.flatten()


if __name__ == "__main__":
    print(avx2_features())
