"""Per-layer convolution benchmark: every distinct 3x3 conv shape of ResNet-32 at batch 1.

For each shape: every conv kernel of kernels/registry.py at every precision it takes (the
binary XNOR-popcount kernel, the 2- and 4-bit kernels: bit-plane popcount, direct int16, BLAS
GEMM over codes; the float32 kernels: im2col + BLAS with BN folded, and the fixed-order kernel
the edge uses, kernels/ordered.py), against NumPy
float32 im2col + GEMM (``kernels/reference.py::conv2d``) and PyTorch ``conv2d`` (1 thread), all
timed interleaved in one run. Every kernel is first checked against the reference (exact for the
quantized ones). Our kernels include their BN/quantize/scale work; the peers do the bare conv.

Usage::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_convs.py \\
        [--repeat 400] [--json out.json] [--markdown out.md]

Popcount napkin math for the binary kernels: one output needs ``3 * ceil(3C / 64)`` 64-bit
XOR+popcount words in the row-segment form (three kernel-row segments), and 9C binary MACs
in any form (the word kernel, ``xnor_words``, counts 9 words of 16, 32 or 64 bits); the MAC
rate is also given against the streaming loop's bits (64 per word); the limit assumed is ``POPCNT_PER_CYCLE`` 64-bit
popcounts per cycle (AMD Zen 3 runs POPCNT r64 on its four integer ALUs, reciprocal throughput
0.25 cycle) at the clock measured with a dependent integer chain; the streaming rate of a plain
XOR+popcount reduction over L1-resident words is reported beside it as the practical ceiling
(on an AVX2-only host LLVM vectorizes that loop with the ``vpshufb`` nibble table: ``vpxor``,
``vpsrlw``, two ``vpand``, two ``vpshufb``, ``vpaddb``, ``vpsadbw``, ``vpaddq`` per 4 words, about
1.8 words per cycle on Zen 3's four vector pipes, which is where the measured streaming rate sits).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (pins BLAS/OpenMP threads before numpy is imported)

import numba  # noqa: E402
import numpy as np  # noqa: E402

from xnorcdl import quant  # noqa: E402
from xnorcdl.kernels import reference as ref  # noqa: E402
from xnorcdl.kernels.jit import target_has  # noqa: E402
from xnorcdl.kernels.registry import FLOAT_KERNELS, QUANT_KERNELS  # noqa: E402

POPCNT_PER_CYCLE = 4


def popcount_limit(info):
    """(64-bit words per cycle, what bounds it) for the popcount instructions of the target the
    kernels compile for (this CPU's, or ``NUMBA_CPU_FEATURES``, benchmarks/avx2_target.py)."""
    if target_has("avx512vpopcntdq"):          # the features the kernels compile for
        if "-prefer-256-bit" in (numba.config.CPU_FEATURES or ""):   # xnorcdl.kernels.jit
            return 8, ("AVX-512 VPOPCNTDQ: vpopcntq on 512-bit vectors, one per cycle on one "
                       "port")
        return 4, ("AVX-512 VPOPCNTDQ: vpopcntq on 256-bit vectors (LLVM's preferred width, "
                   "XNORCDL_VECTOR_BITS=256), one per cycle on one port")
    return POPCNT_PER_CYCLE, ("scalar POPCNT r64 on four integer ALUs (AMD Zen 3; the AVX2 "
                              "vpshufb nibble-table popcount LLVM vectorizes to takes about 9 "
                              "vector ops per 4 words with its XOR and sums, about 1.8 words "
                              "per cycle on four vector pipes)")
# (label, C_in, C_out, side, stride); the stem stays float32 at the edge
SHAPES = [("stem 3->16 @32", 3, 16, 32, 1), ("16->16 @32", 16, 16, 32, 1),
          ("16->32 s2 @32", 16, 32, 32, 2), ("32->32 @16", 32, 32, 16, 1),
          ("32->64 s2 @16", 32, 64, 16, 2), ("64->64 @8", 64, 64, 8, 1)]


def build(c, o, side, stride, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, c, side, side)).astype(np.float32)
    w = (rng.standard_normal((o, c, 3, 3)) * np.sqrt(2 / (9 * c))).astype(np.float32)
    bn_s = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bn_t = rng.normal(0, 0.2, c).astype(np.float32)
    o_s = rng.uniform(0.5, 1.5, o).astype(np.float32)
    o_t = rng.normal(0, 0.2, o).astype(np.float32)
    return x, w, bn_s, bn_t, o_s, o_t


def contenders(c, o, side, stride, seed, with_torch):
    """name -> (callable, check) where check() verifies the result against the reference: every
    conv kernel of the registry (kernels/registry.py) at every precision it takes, and the peers."""
    x, w, bn_s, bn_t, o_s, o_t = build(c, o, side, stride, seed)
    out = {}
    for name, k in FLOAT_KERNELS.items():
        conv = k.build(w, o_s, o_t, stride, 1)
        want = ref.float_conv_bn(x, w, o_s, o_t, stride, 1, ordered=k.exact)
        check = ((lambda conv=conv, want=want: np.array_equal(conv(x), want)) if k.exact else
                 (lambda conv=conv, want=want: np.allclose(conv(x), want, atol=1e-4)))
        out[f"float32 {name}"] = ((lambda conv=conv: conv(x)), check)
    out["numpy im2col+gemm"] = (lambda: ref.conv2d(x, w, stride, 1), lambda: True)
    if with_torch:
        import torch
        torch.set_num_threads(1)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        conv2d = torch.nn.functional.conv2d
        with torch.no_grad():
            want_t = conv2d(tx, tw, stride=stride, padding=1).numpy()

        def run_torch():
            with torch.no_grad():
                return conv2d(tx, tw, stride=stride, padding=1)
        out["torch conv2d"] = (run_torch, lambda: np.allclose(want_t, ref.conv2d(x, w, stride, 1),
                                                               atol=1e-4))
    if c == 3:      # the stem stays float32 at the edge
        return out
    for bits in (1, 2, 4):
        codes = quant.codes(w, bits)
        scale = quant.output_scale(w, bits)
        want = ref.quant_conv(x, bn_s, bn_t, codes, scale, bits, 1.0, stride)
        for name, k in QUANT_KERNELS.items():
            if bits in k.bits:
                conv = k.build(codes, scale, bn_s, bn_t, bits, 1.0, stride)
                out[f"{bits}-bit {name}"] = (
                    (lambda conv=conv: conv(x)),
                    (lambda conv=conv, want=want: np.array_equal(conv(x), want)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--repeat", type=int, default=400, help="timed calls per contender and shape")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    ap.add_argument("--json", default=None, metavar="PATH", help="write all figures as JSON")
    ap.add_argument("--markdown", default=None, metavar="PATH", help="write the table as markdown")
    args = ap.parse_args(argv)
    info = common.machine()
    clock = common.measured_clock_hz()
    stream = common.streaming_popcount_words_per_s()
    print(f"config: repeat={args.repeat} seed={args.seed} torch={not args.no_torch}")
    print(f"machine: {info}")
    per_cycle, why = popcount_limit(info)
    print(f"clock (dependent chain): {clock / 1e9:.2f} GHz; popcount limit {per_cycle} words/cycle"
          f" ({why}) = {per_cycle * clock / 1e9:.1f} G words/s; "
          f"streaming XOR+popcount measured {stream / 1e9:.2f} G words/s")
    rows = []
    for label, c, o, side, stride in SHAPES:
        fns = contenders(c, o, side, stride, args.seed, not args.no_torch)
        bad = [name for name, (_, check) in fns.items() if not check()]
        if bad:
            raise SystemExit(f"{label}: wrong results from {bad}")
        times = common.time_interleaved({k: f for k, (f, _) in fns.items()}, args.repeat)
        side_o = (side - 1) // stride + 1
        words = o * side_o * side_o * 3 * -(-3 * c // 64)
        for name, t in times.items():
            row = {"shape": label, "kernel": name, "median_us": t["median"] * 1e6,
                   "p10_us": t["p10"] * 1e6,
                   "vs_numpy": times["numpy im2col+gemm"]["median"] / t["median"]}
            if "torch conv2d" in times:
                row["vs_torch"] = times["torch conv2d"]["median"] / t["median"]
            if name.startswith("1-bit"):
                rate = words / t["median"]
                row["popcount_words"] = words
                row["of_popcount_limit"] = rate / (per_cycle * clock)
                row["of_streaming"] = rate / stream
                # the same work counted in binary MACs (9C per output) against the streaming
                # loop's 64 MACs per word: fair to kernels whose words are not 64 bits wide
                macs = o * side_o * side_o * 9 * c
                row["binary_macs"] = macs
                row["macs_of_streaming"] = macs / t["median"] / (64 * stream)
            rows.append(row)
    lines = ["| shape | kernel | median us | vs numpy | vs torch | popcount use |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        pc = (f"{100 * r['of_popcount_limit']:.0f}% of limit, {100 * r['of_streaming']:.0f}% "
              f"of streaming, MACs {100 * r['macs_of_streaming']:.0f}% of streaming bits"
              if "of_popcount_limit" in r else "")
        vt = f"{r['vs_torch']:.2f}x" if "vs_torch" in r else "-"
        lines.append(f"| {r['shape']} | {r['kernel']} | {r['median_us']:.1f} | "
                     f"{r['vs_numpy']:.2f}x | {vt} | {pc} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "clock_hz": clock, "streaming_words_per_s": stream,
                       "popcount_words_per_cycle": per_cycle, "popcount_limit": why, "repeat": args.repeat,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
