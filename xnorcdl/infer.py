"""``python -m xnorcdl infer``: run Algorithm 1 over an image file; accuracy, exits, speed, energy

Prints accuracy, the fraction of samples leaving at each exit, the accuracy of the samples that
left at the edge and of those that went on, throughput and the energy summary; ``--json PATH``
writes the summary and every sample's outcome. Expected errors (bad weights, bad image file,
bad option) print one ``error:`` line and exit with status 2. ``python -m xnorcdl.infer`` runs
the same command.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import numpy as np

from . import api, cli, engine
from .cli import load_images, parse_thresholds, resolve_images


def summarize(model, res: api.Result, labels, seconds: float, thresholds) -> dict:
    n = len(res.predictions)
    out = {"samples": n, "seconds": seconds, "samples_per_second": n / seconds if seconds else None,
           "thresholds": thresholds, "exits": []}
    correct = (res.predictions == labels) if labels is not None else None
    if correct is not None:
        out["accuracy"] = float(correct.mean()) if n else None
    for k, e in enumerate(model.exits):
        took = res.exits == k
        row = {"exit": k, "after_conv": model.spec.exits[k].after_conv,
               "fraction": float(took.mean()) if n else 0.0, "count": int(took.sum())}
        if correct is not None:
            row["accuracy"] = float(correct[took].mean()) if took.any() else None
        out["exits"].append(row)
    rest = res.exits == engine.FINAL
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


def add_arguments(ap: argparse.ArgumentParser) -> None:
    cli.add_weights(ap)
    cli.add_images(ap, help="binary record file")
    ap.add_argument("--threshold", default=None, type=cli.thresholds_type,
                    help="entropy threshold(s) in nats, comma-separated, one per exit (or one for "
                         "all); strict H < T (default: the thresholds stored in the file)")
    cli.add_backend(ap, batch_size=None, auto=True,
                    batch_help="samples per batch (decisions stay per sample) (default: 1 with "
                               "--backend fast, 100 with reference)")
    ap.add_argument("--workers", type=cli.integer(1, 64), default=1,
                    help="threads running Algorithm 1 on shares of the images, each with its own "
                         "executor (throughput on several cores; the same results)")
    cli.add_energy(ap)
    cli.add_json(ap, "the summary and per-sample results")
    cli.add_progress(ap)


def run(args: argparse.Namespace) -> int:
    from .energy import format_energy, load_energy_table, per_sample_records
    net = api.load(args.weights)
    model = net.model
    thresholds = parse_thresholds(args.threshold, len(model.exits))
    table = load_energy_table(args.energy)
    path = resolve_images(args.images, args.fetch)
    images, labels = load_images(path, args.format, args.limit, model.spec.num_classes)
    args.backend = cli.pick_backend(args.backend, len(images), args.workers)
    net.executor(args.backend)  # built (kernels prepared) before the clock starts
    if args.workers > 1:
        net.executors(args.backend, min(args.workers, max(1, len(images))))
    used = thresholds or net.thresholds
    with cli.progress(args, len(images), "infer") as bar:
        t0 = time.perf_counter()
        res = net.run(images, args.backend, used, args.batch_size, table, args.threads, bar,
                      args.workers)
        seconds = time.perf_counter() - t0
    summary = summarize(model, res, labels, seconds, used)
    summary["backend"] = args.backend
    summary["weights"] = args.weights
    summary["images"] = path
    summary["energy"] = res.energy.report
    out = cli.text_out(args)  # stdout holds only the JSON with --json -
    print_summary(summary, model, args.backend, out)
    print(format_energy(summary["energy"]), file=out)
    if args.json:
        from .report import emit_json
        energy = per_sample_records(model, res.exits, table)
        doc = {"summary": summary, "samples": [
            {"index": i, "label": None if labels is None else int(labels[i]),
             "prediction": int(res.predictions[i]),
             "exit": "final" if res.exits[i] == engine.FINAL else f"exit{res.exits[i]}",
             "entropies": [None if np.isnan(h) else float(h) for h in res.entropies[i]],
             "energy": energy[i]}
            for i in range(len(res.predictions))]}
        return emit_json(doc, args.json)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(sys.modules[__name__], argv, "python -m xnorcdl.infer")


if __name__ == "__main__":
    sys.exit(main())
