"""Combine several runs of bench_convs.py / bench_e2e.py (their --json files) into one table.

Each figure is the median over runs of the per-run median; ratios are recomputed from those
medians. The machine is shared, so single runs are noisy: run the benchmark a few times.

Usage::

    python benchmarks/aggregate.py convs RUN1.json RUN2.json ...
    python benchmarks/aggregate.py e2e RUN1.json RUN2.json ...
"""
from __future__ import annotations

import argparse
import json
import statistics


def convs_table(runs):
    rows = {}
    for run in runs:
        for r in run["rows"]:
            rows.setdefault((r["shape"], r["kernel"]), []).append(r["median_us"])
    med = {k: statistics.median(v) for k, v in rows.items()}
    clock = statistics.median(run["clock_hz"] for run in runs)
    stream = statistics.median(run["streaming_words_per_s"] for run in runs)
    limit = runs[0]["popcnt_per_cycle_assumed"] * clock
    words = {(r["shape"], r["kernel"]): r["popcount_words"]
             for r in runs[0]["rows"] if "popcount_words" in r}
    out = [f"clock {clock / 1e9:.2f} GHz (dependent chain), popcount limit "
           f"{limit / 1e9:.1f} G words/s ({runs[0]['popcnt_per_cycle_assumed']}/cycle assumed), "
           f"streaming XOR+popcount {stream / 1e9:.2f} G words/s; {len(runs)} runs", "",
           "| shape | kernel | median us | vs numpy | vs torch | popcount use |",
           "|---|---|---:|---:|---:|---|"]
    for (shape, kernel), t in med.items():
        numpy_t = med[(shape, "numpy im2col+gemm")]
        torch_t = med.get((shape, "torch conv2d"))
        vt = f"{torch_t / t:.2f}x" if torch_t else "-"
        pc = ""
        if (shape, kernel) in words:
            rate = words[(shape, kernel)] / (t * 1e-6)
            pc = f"{100 * rate / limit:.0f}% of limit, {100 * rate / stream:.0f}% of streaming"
        out.append(f"| {shape} | {kernel} | {t:.1f} | {numpy_t / t:.2f}x | {vt} | {pc} |")
    return "\n".join(out)


def e2e_table(runs):
    names = list(runs[0]["times_s"])
    med = {n: statistics.median(run["times_s"][n]["median"] for run in runs) for n in names}
    ort, torch_t = med["onnxruntime full precision"], med["pytorch full precision"]
    out = [f"{len(runs)} runs", "",
           "| contender | median ms | ORT / this | PyTorch / this |", "|---|---:|---:|---:|"]
    for n in names:
        out.append(f"| {n} | {med[n] * 1e3:.3f} | {ort / med[n]:.2f}x | {torch_t / med[n]:.2f}x |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=["convs", "e2e"])
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    runs = []
    for path in args.files:
        with open(path) as f:
            runs.append(json.load(f))
    print(convs_table(runs) if args.kind == "convs" else e2e_table(runs))


if __name__ == "__main__":
    main()
