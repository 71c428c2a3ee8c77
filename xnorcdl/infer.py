"""``python -m xnorcdl.infer``: run Algorithm 1 over an image file and report what happened.

Prints accuracy, the fraction of samples leaving at each exit, the accuracy of the samples that
left at the edge and of those that went on, throughput and the energy summary; ``--json PATH``
writes the summary and every sample's outcome. Expected errors (bad weights, bad image file,
bad option) print one ``error:`` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

import numpy as np
from threadpoolctl import threadpool_limits

from . import backends, engine
from .data import CIFAR10_FILES
from .energy import (EnergyTableError, energy_summary, format_energy, load_energy_table,
                     per_sample_records)
from .format import WeightsError
from .model import load_model
from .progress import Progress
from .report import check_destination, emit_json
from .spec import SpecError


class UsageError(ValueError):
    """A bad option value; reported as one line."""


def resolve_images(path: str, fetch: bool) -> str:
    """An existing path, or a CIFAR-10 file name looked up in the data cache."""
    if os.path.exists(path) or os.path.basename(path) != path or path not in CIFAR10_FILES:
        return path
    from .data import cifar10_dir, default_dest
    cached = os.path.join(default_dest(), path)
    if os.path.isfile(cached):  # placed atomically after its MD5 check by `xnorcdl.data`
        return cached
    return os.path.join(cifar10_dir(fetch=fetch), path)


def parse_thresholds(text: Optional[str], n_exits: int) -> Optional[List[float]]:
    if text is None:
        return None
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(f"--threshold: expected comma-separated numbers, got {text!r}") from None
    if len(values) == 1 and n_exits > 1:
        values = values * n_exits
    if len(values) != n_exits:
        raise UsageError(f"--threshold: {len(values)} value(s) for {n_exits} exit(s)")
    if any(not np.isfinite(v) or v < 0 for v in values):
        raise UsageError(f"--threshold: values must be finite and >= 0 (nats), got {values}")
    return values


def summarize(model, res: engine.Results, labels, seconds: float, thresholds) -> dict:
    n = len(res.predictions)
    out = {"samples": n, "seconds": seconds, "samples_per_second": n / seconds if seconds else None,
           "thresholds": thresholds, "exits": []}
    correct = (res.predictions == labels) if labels is not None else None
    if correct is not None:
        out["accuracy"] = float(correct.mean()) if n else None
    for k, e in enumerate(model.exits):
        took = res.exit_index == k
        row = {"exit": k, "after_conv": model.spec.exits[k].after_conv,
               "fraction": float(took.mean()) if n else 0.0, "count": int(took.sum())}
        if correct is not None:
            row["accuracy"] = float(correct[took].mean()) if took.any() else None
        out["exits"].append(row)
    rest = res.exit_index == engine.FINAL
    out["final"] = {"fraction": float(rest.mean()) if n else 0.0, "count": int(rest.sum())}
    if correct is not None:
        edge = ~rest
        out["final"]["accuracy"] = float(correct[rest].mean()) if rest.any() else None
        out["edge_exit_accuracy"] = float(correct[edge].mean()) if edge.any() else None
    return out


def print_summary(s: dict, model, backend: str, out=None) -> None:
    spec = model.spec
    out = out or sys.stdout
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"model     ResNet-{spec.depth}, {spec.edge_convs}E+{spec.num_convs - spec.edge_convs}C, "
      f"{spec.edge_bits}-bit edge, {len(spec.exits)} exit(s), backend {backend}")
    p(f"samples   {s['samples']}")
    if "accuracy" in s and s["accuracy"] is not None:
        p(f"accuracy  {100 * s['accuracy']:.2f}%")
    for e in s["exits"]:
        acc = f", accuracy {100 * e['accuracy']:.2f}%" if e.get("accuracy") is not None else ""
        p(f"exit{e['exit']}     after conv {e['after_conv']}: {100 * e['fraction']:.2f}% exited "
          f"({e['count']}){acc}  threshold {s['thresholds'][e['exit']]:g}")
    f = s["final"]
    acc = f", accuracy {100 * f['accuracy']:.2f}%" if f.get("accuracy") is not None else ""
    p(f"final     {100 * f['fraction']:.2f}% continued to the head ({f['count']}){acc}")
    if s.get("samples_per_second"):
        p(f"speed     {s['samples_per_second']:.1f} samples/s ({s['seconds']:.2f} s)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m xnorcdl.infer", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--weights", required=True, help="weights file (.npz, docs/FORMAT.md)")
    ap.add_argument("--images", required=True,
                    help="binary record file; a bare CIFAR-10 file name (test_batch.bin) is looked "
                         "up in the data cache")
    ap.add_argument("--format", default="cifar10", choices=["cifar10", "cifar100", "raw"],
                    help="record format of --images")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    ap.add_argument("--threshold", default=None,
                    help="entropy threshold(s) in nats, comma-separated, one per exit (or one for all)")
    ap.add_argument("--backend", default="fast", choices=["fast", "reference"])
    ap.add_argument("--batch-size", type=int, default=None,
                    help="samples per batch (decisions stay per sample); default 1 fast, 100 reference")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="write the summary and per-sample results as JSON ('-' for stdout)")
    ap.add_argument("--energy", default=None, metavar="FILE",
                    help="energy table (JSON, docs/COUNTING.md); default: the paper's Table I")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS threads for the float32 layers (batch-1 inference is fastest on one)")
    ap.add_argument("--fetch", action="store_true", help="fetch CIFAR-10 into the cache if missing")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return ap


def load_images(path: str, fmt: str, limit: Optional[int], classes: int):
    """(images, labels or None) of a record file, the first ``limit``; labels checked against
    the model's ``classes``."""
    from .records import read_records
    images, labels = read_records(path, fmt)
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit: expected a positive integer, got {limit}")
        images = images[:limit]
        labels = labels[:limit] if labels is not None else None
    if labels is not None and len(labels) and int(labels.max()) >= classes:
        i = int(np.argmax(labels >= classes))
        raise UsageError(f"{path}: record {i} has label {int(labels[i])}, but the model has "
                         f"{classes} classes (0..{classes - 1}); check --format")
    return images, labels


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.json:
            check_destination(args.json, "--json")
        model = load_model(args.weights)
        table = load_energy_table(args.energy)
        thresholds = parse_thresholds(args.threshold, len(model.exits))
        path = resolve_images(args.images, args.fetch)
        images, labels = load_images(path, args.format, args.limit, model.spec.num_classes)
        executor = backends.get(args.backend)(model)
        batch = args.batch_size or (1 if args.backend == "fast" else 100)
        if batch < 1:
            raise UsageError(f"--batch-size: expected a positive integer, got {batch}")
        used = thresholds or [e.threshold for e in model.exits]
        if args.threads < 1:
            raise UsageError(f"--threads: expected a positive integer, got {args.threads}")
        with Progress(len(images), "infer", enabled=None if not args.no_progress else False) as bar, \
                threadpool_limits(args.threads):
            t0 = time.perf_counter()
            res = engine.run(model, images, executor, used, batch, bar)
            seconds = time.perf_counter() - t0
    except (WeightsError, SpecError, EnergyTableError, UsageError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = summarize(model, res, labels, seconds, used)
    summary["backend"] = args.backend
    summary["weights"] = args.weights
    summary["images"] = path
    summary["energy"] = energy_summary(model, res.exit_index, table)
    out = sys.stderr if args.json == "-" else sys.stdout  # stdout then holds only the JSON
    print_summary(summary, model, args.backend, out)
    print(format_energy(summary["energy"]), file=out)
    if args.json:
        energy = per_sample_records(model, res.exit_index, table)
        doc = {"summary": summary, "samples": [
            {"index": i, "label": None if labels is None else int(labels[i]),
             "prediction": int(res.predictions[i]),
             "exit": "final" if res.exit_index[i] == engine.FINAL else f"exit{res.exit_index[i]}",
             "entropies": [None if np.isnan(h) else float(h) for h in res.entropies[i]],
             "energy": energy[i]}
            for i in range(len(res.predictions))]}
        return emit_json(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
