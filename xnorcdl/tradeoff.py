"""``python -m xnorcdl.tradeoff``: calibrate exit thresholds and print accuracy vs edge exits.

Runs the network once over a labelled calibration set and once over the evaluation set, keeping
the logits of every exit and of the head (:func:`xnorcdl.engine.outputs`); then, for each rule
(:mod:`xnorcdl.calibrate`), chooses the thresholds on the calibration set only and replays
Algorithm 1 on both: accuracy, fraction of samples leaving at the edge, accuracy of those that
leave, and energy per sample with its reduction against the full-precision network without
exits (paper Table I, :mod:`xnorcdl.energy`).

The default calibration set is the held-out split of the training recipe (the last 5000 of
the 50000 CIFAR-10 training images, ``weights/recipe/train.py``); ``--calib FILE`` takes any
labelled record file instead. ``--write OUT`` stores the first rule's thresholds into a copy of
the weights file.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from typing import List, Optional

from threadpoolctl import threadpool_limits

from . import backends, calibrate, engine
from .data import VAL_FILE, VAL_START
from .energy import EnergyTableError, energy_summary, fmt_pj, load_energy_table
from .format import WeightsError, load_weights, save_weights
from .infer import UsageError, load_images, resolve_images
from .model import load_model
from .progress import Progress
from .report import check_destination, emit_json
from .records import DataError
from .spec import SpecError

DEFAULT_RULES = "within:0.5,within:1,within:2,within:3,within:5,exits:59.3,fixed:0.5"
VALIDATION = "validation"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m xnorcdl.tradeoff",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = ap.add_argument
    a("--weights", required=True, help="weights file (.npz, docs/FORMAT.md)")
    a("--images", default="test_batch.bin", help="labelled evaluation records")
    a("--calib", default=VALIDATION,
      help="labelled calibration records; 'validation': CIFAR-10 training images 45000..49999")
    a("--calib-range", default=None, metavar="A:B",
      help="calibrate on records A..B-1 of the calibration set only (A or B may be left out), "
           "e.g. 2500: with 'validation' for training images 47500..49999, the half that a "
           "recipe run's --select-images 2500 did not look at")
    a("--format", default="cifar10", choices=["cifar10", "cifar100"],
      help="record format of --images and --calib")
    a("--rules", default=DEFAULT_RULES,
      help="comma-separated threshold rules: fixed:T (nats), within:D (points), exits:P (%%), "
           "accuracy:A (%%)")
    a("--limit", type=int, default=None, help="use only the first N evaluation samples")
    a("--backend", default="fast", choices=["fast", "reference"])
    a("--batch-size", type=int, default=100, help="samples per batch")
    a("--threads", type=int, default=1, help="BLAS threads for the float32 layers")
    a("--energy", default=None, metavar="FILE",
      help="energy table (JSON, docs/COUNTING.md); default: the paper's Table I")
    a("--json", default=None, metavar="PATH", help="write the table as JSON ('-' for stdout)")
    a("--write", default=None, metavar="OUT",
      help="write a copy of --weights with the thresholds of the first rule")
    a("--fetch", action="store_true", help="fetch CIFAR-10 into the cache if missing")
    a("--no-progress", action="store_true", help="no progress bar on stderr")
    return ap


def _labelled(path: str, fmt: str, limit: Optional[int], classes: int, what: str):
    images, labels = load_images(path, fmt, limit, classes)
    if labels is None:
        raise UsageError(f"{what} {path}: has no labels; calibration and accuracy need them")
    if len(images) == 0:
        raise UsageError(f"{what} {path}: holds no records")
    return images, labels


def parse_range(text: str, n: int, option: str = "--calib-range") -> slice:
    """``A:B`` (either side may be empty) -> slice(A, B), checked 0 <= A < B <= n; errors name
    ``option``."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a = int(parts[0]) if parts[0].strip() else 0
        b = int(parts[1]) if parts[1].strip() else n
    except ValueError:
        raise UsageError(f"{option}: expected A:B (record indices), got {text!r}") from None
    if not 0 <= a < b <= n:
        raise UsageError(f"{option} {text}: expected 0 <= A < B <= {n} (the set holds {n} "
                         "records)")
    return slice(a, b)


def labelled_set(which: str, rng: Optional[str], option: str, range_option: str, fmt: str,
                 fetch: bool, classes: int):
    """(name, images, labels) of a labelled set given as ``option``: a record file, or
    ``validation`` (CIFAR-10 training images 45000..49999); then records A..B-1 of it when
    ``rng`` is ``A:B`` (errors name ``range_option``)."""
    if which != VALIDATION:
        path = resolve_images(which, fetch)
        images, labels = _labelled(path, fmt, None, classes, option)
        offset = 0
    else:
        if fmt != "cifar10":
            raise UsageError(f"{option} validation is the CIFAR-10 split; give {option} FILE for "
                             f"--format {fmt}")
        path = resolve_images(VAL_FILE, fetch)
        images, labels = _labelled(path, "cifar10", None, classes, option)
        if len(images) != 2 * VAL_START:
            raise UsageError(f"{option} validation: {path} holds {len(images)} records, expected "
                             f"{2 * VAL_START}")
        images, labels, offset = images[VAL_START:], labels[VAL_START:], VAL_START
    if rng is None:
        return (f"{path}[{offset}:]" if offset else path), images, labels
    sl = parse_range(rng, len(images), range_option)
    return f"{path}[{offset + sl.start}:{offset + sl.stop}]", images[sl], labels[sl]


def parse_rules(text: str) -> List[str]:
    """The comma-separated threshold rules of ``--rules``, each checked (at least one)."""
    rules = [r.strip() for r in text.split(",") if r.strip()]
    if not rules:
        raise UsageError("--rules: expected at least one rule")
    for r in rules:
        try:
            calibrate.parse_rule(r)
        except ValueError as exc:
            raise UsageError(f"--rules: {exc}") from None
    return rules


def check_positive(args, *options: str) -> None:
    """Refuse an integer option (``--batch-size``, ...) below 1."""
    for opt in options:
        v = getattr(args, opt.lstrip("-").replace("-", "_"))
        if v < 1:
            raise UsageError(f"{opt}: expected a positive integer, got {v}")


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
    spec, arrays = load_weights(src)
    with open(src, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rules = parse_rules(args.rules)
        check_positive(args, "--batch-size", "--threads")
        for opt, dest in (("--json", args.json), ("--write", args.write)):
            if dest:
                check_destination(dest, opt)
        model = load_model(args.weights)
        if not model.exits:
            raise UsageError(f"{args.weights}: the model has no early exit; nothing to calibrate")
        table = load_energy_table(args.energy)
        classes = model.spec.num_classes
        cal_path, cal_x, cal_y = labelled_set(args.calib, args.calib_range, "--calib",
                                              "--calib-range", args.format, args.fetch, classes)
        ev_path = resolve_images(args.images, args.fetch)
        ev_x, ev_y = _labelled(ev_path, args.format, args.limit, classes, "--images")
        executor = backends.get(args.backend)(model)
        on = None if not args.no_progress else False
        with threadpool_limits(args.threads):
            with Progress(len(cal_x), "calibration", enabled=on) as bar:
                cal = engine.outputs(model, cal_x, executor, args.batch_size, bar)
            with Progress(len(ev_x), "evaluation", enabled=on) as bar:
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
    except (WeightsError, SpecError, EnergyTableError, UsageError, DataError, OSError,
            ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = sys.stderr if args.json == "-" else sys.stdout  # stdout then holds only the JSON
    print(format_table(doc), file=out)
    if args.write:
        print(f"\nwrote {args.write} with thresholds {doc['written']['thresholds']} "
              f"({rules[0]})", file=out)
    return emit_json(doc, args.json) if args.json else 0


if __name__ == "__main__":
    sys.exit(main())
