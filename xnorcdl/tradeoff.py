"""``python -m xnorcdl tradeoff``: calibrate exit thresholds and print accuracy vs edge exits

Runs the network once over a labelled calibration set and once over the evaluation set, keeping
the logits of every exit and of the head (:func:`xnorcdl.engine.outputs`); then, for each rule
(:mod:`xnorcdl.calibrate`), chooses the thresholds on the calibration set only and replays
Algorithm 1 on both: accuracy, fraction of samples leaving at the edge, accuracy of those that
leave, and energy per sample with its reduction against the full-precision network without
exits (paper Table I, :mod:`xnorcdl.energy`).

The default calibration set is the held-out split of the training recipe (the last 5000 of
the 50000 CIFAR-10 training images, ``weights/recipe/train.py``); ``--calib FILE`` takes any
labelled record file instead. ``--write OUT`` stores the first rule's thresholds into a copy of
the weights file. ``python -m xnorcdl.tradeoff`` runs the same command.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import List, Optional

from . import calibrate, cli, engine, paths
from .cli import VALIDATION, VALIDATION_HELP, labelled_set, parse_rules
from .energy import energy_summary, fmt_pj, load_energy_table
from .errors import UsageError
from .files import sha256_of
from .format import load_weights, save_weights
from .model import load_model
from .report import emit_json

DEFAULT_RULES = "within:0.5,within:1,within:2,within:3,within:5,exits:59.3,fixed:0.5"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    cli.add_weights(ap)
    g = cli.add_images(ap, default="test_batch.bin", help="labelled evaluation records",
                       formats=("cifar10", "cifar100"))
    g.add_argument("--calib", default=VALIDATION, type=cli.images_type,
                   help="labelled calibration records; " + VALIDATION_HELP)
    g.add_argument("--calib-range", default=None, metavar="A:B", type=cli.range_type,
                   help="calibrate on records A..B-1 of the calibration set only (A or B may be "
                        "left out), e.g. 2500: with 'validation' for training images "
                        "47500..49999, the half that a recipe run's --select-images 2500 did "
                        "not look at (default: all)")
    cli.add_rules(ap, DEFAULT_RULES)
    cli.add_backend(ap)
    cli.add_energy(ap)
    cli.add_json(ap, "the table")
    ap.add_argument("--write", default=None, metavar="OUT", type=paths.output_path(),
                    help="write a copy of --weights with the thresholds of the first rule")
    cli.add_progress(ap)


def _row(rule: str, thr: List[float], model, table, sets) -> dict:
    row = {"rule": rule, "thresholds": thr}
    for name, outs, labels in sets:
        pred, where = calibrate.decide(outs, thr)
        correct = pred == labels
        edge = where != engine.FINAL
        en = energy_summary(model, where, table)
        row[name] = {"accuracy": float(correct.mean()), "edge_fraction": float(edge.mean()),
                     "exit_fractions": [float((where == k).mean()) for k in range(len(thr))],
                     "edge_accuracy": float(correct[edge].mean()) if edge.any() else None,
                     "energy_pJ_per_sample": en["mean_pJ_per_sample"]["total"],
                     "reduction_vs_full_precision":
                         en["reduction"]["vs_full_precision_no_exit"]}
    return row


def write_thresholds(src: str, dst: str, rule: str, thresholds: List[float], calib: str,
                     samples: int) -> dict:
    """Copy ``src`` to ``dst`` (atomically) with new exit thresholds, recorded in the provenance
    (``recalibrations``: rule, calibration set, old and new thresholds, source sha256)."""
    paths.check_io([("dst", dst, False)], [("src", src)])
    spec, arrays = load_weights(src)
    sha = sha256_of(src)
    record = {"rule": rule, "calibration": calib, "samples": samples, "source_sha256": sha,
              "previous": [e.threshold for e in spec.exits], "thresholds": list(thresholds)}
    prov = dict(spec.provenance or {})
    prov["recalibrations"] = list(prov.get("recalibrations", [])) + [record]
    new = dataclasses.replace(spec.with_thresholds(thresholds), provenance=prov)
    save_weights(dst, new, arrays)
    return {"path": dst, **record}


def format_table(doc: dict) -> str:
    w = max([12] + [len(r["rule"]) for r in doc["rules"]])  # rule column: the longest rule
    lines = [f"calibration {doc['calibration']['images']} ({doc['calibration']['samples']}): "
             f"no-exit accuracy {100 * doc['calibration']['no_exit_accuracy']:.2f}%",
             f"evaluation  {doc['evaluation']['images']} ({doc['evaluation']['samples']}): "
             f"no-exit accuracy {100 * doc['evaluation']['no_exit_accuracy']:.2f}%, exit top-1 "
             + ", ".join(f"{100 * a:.2f}%" for a in doc["evaluation"]["exit_top1"]),
             "",
             f"{'rule':<{w}} {'threshold':>10} | {'calib acc':>9} {'exits':>7} | "
             f"{'eval acc':>8} {'exits':>7} {'exit acc':>8} {'energy':>10} {'vs fp':>6}"]
    for r in doc["rules"]:
        c, e = r["calibration"], r["evaluation"]
        ea = "-" if e["edge_accuracy"] is None else f"{100 * e['edge_accuracy']:.2f}%"
        lines.append(
            f"{r['rule']:<{w}} {','.join(f'{t:.4g}' for t in r['thresholds']):>10} | "
            f"{100 * c['accuracy']:8.2f}% {100 * c['edge_fraction']:6.2f}% | "
            f"{100 * e['accuracy']:7.2f}% {100 * e['edge_fraction']:6.2f}% {ea:>8} "
            f"{fmt_pj(e['energy_pJ_per_sample']):>10} {e['reduction_vs_full_precision']:5.2f}x")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rules = parse_rules(args.rules)
    model = load_model(args.weights)
    if not model.exits:
        raise UsageError(f"{args.weights}: the model has no early exit; nothing to calibrate",
                         where=args.weights)
    table = load_energy_table(args.energy)
    classes = model.spec.num_classes
    cal_path, cal_x, cal_y = labelled_set(args.calib, args.calib_range, "--calib",
                                          "--calib-range", args.format, args.fetch, classes)
    ev_path = cli.resolve_images(args.images, args.fetch)
    ev_x, ev_y = cli.labelled(ev_path, args.format, args.limit, classes, "--images")
    executor = cli.executor(model, args.backend)
    with cli.threads(args):
        with cli.progress(args, len(cal_x), "calibration") as bar:
            cal = engine.outputs(model, cal_x, executor, args.batch_size, bar)
        with cli.progress(args, len(ev_x), "evaluation") as bar:
            ev = engine.outputs(model, ev_x, executor, args.batch_size, bar)
    sets = (("calibration", cal, cal_y), ("evaluation", ev, ev_y))
    doc = {"weights": args.weights,
           "calibration": {"images": cal_path, "samples": len(cal_y),
                           "no_exit_accuracy": float((cal[-1].argmax(1) == cal_y).mean())},
           "evaluation": {"images": ev_path, "samples": len(ev_y),
                          "no_exit_accuracy": float((ev[-1].argmax(1) == ev_y).mean()),
                          "exit_top1": [float((o.argmax(1) == ev_y).mean()) for o in ev[:-1]]},
           "energy_table": table.to_dict(),
           "rules": [_row(r, calibrate.calibrate(cal, cal_y, r), model, table, sets)
                     for r in rules]}
    if args.write:
        doc["written"] = write_thresholds(args.weights, args.write, rules[0],
                                          doc["rules"][0]["thresholds"], cal_path, len(cal_y))
    out = cli.text_out(args)  # stdout holds only the JSON with --json -
    print(format_table(doc), file=out)
    if args.write:
        print(f"\nwrote {args.write} with thresholds {doc['written']['thresholds']} "
              f"({rules[0]})", file=out)
    return emit_json(doc, args.json) if args.json else 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(sys.modules[__name__], argv, "python -m xnorcdl.tradeoff")


if __name__ == "__main__":
    sys.exit(main())
