"""``python -m xnorcdl compare``: two weights files on the same labelled images, sample by sample

Two networks are compared at the same operating point (a threshold rule, :mod:`xnorcdl.calibrate`)
on the same images: for each rule each file gets its own thresholds, chosen on these images, and
Algorithm 1 is replayed. Besides both files' accuracy and edge-exit fraction, the comparison is
paired: of the n samples,

    n11 both right, n10 only A right, n01 only B right, n00 both wrong,

and McNemar's exact test (the discordant samples are n10 + n01 fair coin flips if A and B are
equally accurate) gives the two-sided p-value

    p = min(1, 2 * sum_{i <= min(n10, n01)} C(n10 + n01, i) / 2^(n10 + n01)).

The same counts and test are given for leaving at the edge. A paired test sees differences that
the two accuracies' own standard errors hide, since most samples are right (or wrong) for both.

By default the thresholds are calibrated on the compared images themselves (in-sample
operating points: each file gets the same advantage, so the comparison is fair, but the figures
are not those a held-out set would give). ``--calib validation|FILE [--calib-range A:B]``
calibrates them on another labelled set instead, as ``python -m xnorcdl.tradeoff`` does, e.g.
on the validation split to compare two files on the test images as they would be deployed. The
default images are the recipe's validation split (CIFAR-10 training images 45000..49999);
``--range A:B`` takes records A..B-1 of them. ``python -m xnorcdl.compare`` runs the same command.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import numpy as np

from . import calibrate, cli, engine, paths
from .cli import VALIDATION, VALIDATION_HELP, labelled_set, parse_rules
from .errors import UsageError
from .model import load_model
from .report import emit_json

NO_EXIT = "no exit"
SAME = "same"
#: ``--calib``: 'same', 'validation' or a record file
CALIB_TYPE = paths.input_path(specials=(SAME, VALIDATION),
                              resolve=lambda v: None if v == SAME else cli.cached_image(v))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (module doc)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"counts must be >= 0, got {only_a}, {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = term = 1                                 # sum of C(n, i), i <= min, as integers
    for i in range(min(only_a, only_b)):
        term = term * (n - i) // (i + 1)            # C(n, i + 1), exact
        tail += term
    return min(1.0, 2 * tail / (1 << n))  # exact integers, one correctly rounded division


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Counts of a boolean outcome for the same samples under A and B, and McNemar's p."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same samples, got {a.shape} and {b.shape}")
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    return {"both": int((a & b).sum()), "only_a": n10, "only_b": n01,
            "neither": int((~a & ~b).sum()), "p_value": mcnemar_exact(n10, n01)}


def compare_outputs(outs_a, outs_b, labels: np.ndarray, rules: List[str],
                    calib=None) -> List[dict]:
    """One row per rule (and one for the head alone): both files' thresholds, accuracy and edge
    fraction, and the paired counts of being right and of leaving at the edge. The thresholds
    are calibrated on (``outs_*``, ``labels``), or on ``calib = (cal_a, cal_b, cal_labels)``."""
    labels = np.asarray(labels)
    cal = {"a": outs_a, "b": outs_b, "y": labels} if calib is None else \
        {"a": calib[0], "b": calib[1], "y": np.asarray(calib[2])}
    rows = []
    for rule in [NO_EXIT] + list(rules):
        row = {"rule": rule}
        correct, edge = {}, {}
        for name, outs in (("a", outs_a), ("b", outs_b)):
            thr = ([0.0] * (len(outs) - 1) if rule == NO_EXIT
                   else calibrate.calibrate(cal[name], cal["y"], rule))
            pred, where = calibrate.decide(outs, thr)
            correct[name], edge[name] = pred == labels, where != engine.FINAL
            row[name] = {"thresholds": thr, "accuracy": float(correct[name].mean()),
                         "edge_fraction": float(edge[name].mean())}
        row["correct"] = paired(correct["a"], correct["b"])
        row["edge"] = paired(edge["a"], edge["b"])
        rows.append(row)
    return rows


def format_table(doc: dict) -> str:
    w = max([10] + [len(r["rule"]) for r in doc["rules"]])
    lines = [f"A {doc['a']}", f"B {doc['b']}",
             f"images {doc['images']} ({doc['samples']}), thresholds calibrated per file on "
             + ("them" if doc["calibration"] is None else
                f"{doc['calibration']['images']} ({doc['calibration']['samples']})"),
             "",
             f"{'rule':<{w}} | {'A acc':>7} {'B acc':>7} {'only A':>6} {'only B':>6} "
             f"{'p':>7} | {'A exits':>7} {'B exits':>7} {'only A':>6} {'only B':>6} {'p':>7}"]
    for r in doc["rules"]:
        c, e = r["correct"], r["edge"]
        lines.append(
            f"{r['rule']:<{w}} | {100 * r['a']['accuracy']:6.2f}% {100 * r['b']['accuracy']:6.2f}% "
            f"{c['only_a']:6d} {c['only_b']:6d} {c['p_value']:7.3g} | "
            f"{100 * r['a']['edge_fraction']:6.2f}% {100 * r['b']['edge_fraction']:6.2f}% "
            f"{e['only_a']:6d} {e['only_b']:6d} {e['p_value']:7.3g}")
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    cli.add_weights(ap, pair=True)
    g = cli.add_images(ap, default=VALIDATION, help="labelled records; " + VALIDATION_HELP,
                       formats=("cifar10", "cifar100"), limit=False)
    g.add_argument("--range", default=None, metavar="A:B", type=cli.range_type,
                   help="compare on records A..B-1 only (default: all)")
    g.add_argument("--calib", default=SAME, type=CALIB_TYPE,
                   help="labelled records the thresholds are calibrated on: 'same' (the compared "
                        "images), 'validation' (CIFAR-10 training images 45000..49999) or a file")
    g.add_argument("--calib-range", default=None, metavar="A:B", type=cli.range_type,
                   help="with --calib validation|FILE: calibrate on records A..B-1 of it only "
                        "(default: all)")
    cli.add_rules(ap, "accuracy:89.16,exits:59.3,within:0.5")
    cli.add_backend(ap)
    cli.add_json(ap, "the comparison")
    cli.add_progress(ap)


def run(args: argparse.Namespace) -> int:
    rules = parse_rules(args.rules)
    models = [load_model(p) for p in args.weights]
    (pa, ma), (pb, mb) = zip(args.weights, models)
    if ma.spec.num_classes != mb.spec.num_classes or len(ma.exits) != len(mb.exits):
        raise UsageError(f"{pa} and {pb}: not comparable: {ma.spec.num_classes} vs "
                         f"{mb.spec.num_classes} classes, {len(ma.exits)} vs "
                         f"{len(mb.exits)} early exits (expected the same)", where="--weights")
    if args.calib == SAME and args.calib_range is not None:
        raise UsageError("--calib-range: needs --calib validation or a file (with --calib "
                         "same the thresholds come from the compared images, see --range)",
                         where="--calib-range")
    classes = ma.spec.num_classes
    name, x, y = labelled_set(args.images, args.range, "--images", "--range", args.format,
                              args.fetch, classes)
    sets = [("", x)]
    cal_doc = None
    if args.calib != SAME:
        cal_name, cal_x, cal_y = labelled_set(args.calib, args.calib_range, "--calib",
                                              "--calib-range", args.format, args.fetch, classes)
        sets.append(("calibration ", cal_x))
        cal_doc = {"images": cal_name, "samples": int(len(cal_y))}
    outs = {}
    with cli.threads(args):
        for tag, m in (("A", ma), ("B", mb)):
            ex = cli.executor(m, args.backend)
            for what, images in sets:
                with cli.progress(args, len(images), what + tag) as bar:
                    outs[what + tag] = engine.outputs(m, images, ex, args.batch_size, bar)
    calib = None if cal_doc is None else (outs["calibration A"], outs["calibration B"], cal_y)
    doc = {"a": pa, "b": pb, "images": name, "samples": int(len(y)), "calibration": cal_doc,
           "rules": compare_outputs(outs["A"], outs["B"], y, rules, calib)}
    print(format_table(doc), file=cli.text_out(args))
    return emit_json(doc, args.json) if args.json else 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(sys.modules[__name__], argv, "python -m xnorcdl.compare")


if __name__ == "__main__":
    sys.exit(main())
