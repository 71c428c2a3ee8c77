"""``python -m xnorcdl explore``: the design space of a folder of weights files, measured and drawn.

Every ``.npz`` directly in ``--weights-dir`` (a grid such as ``weights/grid``) is run once over
the calibration set and once over ``--images`` with every exit and the head evaluated;
Algorithm 1 is replayed for each ``--rules`` rule (``stored``: the file's own thresholds), every
outcome is priced with the operation counter under the default energy table and the paper-style
one (docs/COUNTING.md), and the command writes into ``--out``:

* ``design_space.json``: per file its configuration, accuracy with and without exits, exit
  fractions and exit accuracy, energy per sample split edge/cloud under both tables, ratios
  against the full-precision ``--baseline``, and the Pareto fronts (accuracy vs energy);
* ``fig4_cifar10.png`` and ``.svg``: Fig. 4, accuracy vs energy per sample;
* ``tables.md``: Tables II, III and IV in the paper's layout with the paper's numbers beside.

Method and formulas: :mod:`xnorcdl.design_space`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from threadpoolctl import threadpool_limits

from . import design_space as ds
from . import engine
from .energy import EnergyTableError, load_energy_table
from .format import WeightsError
from .infer import UsageError, make_executor, resolve_images
from .progress import Progress
from .records import DataError
from .report import check_destination, emit_json
from .spec import SpecError
from .tradeoff import VALIDATION, _labelled, labelled_set, check_positive

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER_TABLE = os.path.join(HERE, "energy_table_paper.json")
DEFAULT_RULES = ds.STORED
OUTPUTS = ("design_space.json", "fig4_cifar10.png", "fig4_cifar10.svg", "tables.md")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m xnorcdl explore",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = ap.add_argument
    a("--weights-dir", required=True, help="folder of weights files (.npz directly in it)")
    a("--images", default="test_batch.bin", help="labelled evaluation records")
    a("--calib", default=VALIDATION,
      help="labelled calibration records for rules other than 'stored'; 'validation': CIFAR-10 "
           "training images 45000..49999")
    a("--rules", default=DEFAULT_RULES,
      help="comma-separated threshold rules: stored (each file's own thresholds), fixed:T, "
           "within:D, exits:P, accuracy:A; the first one draws Fig. 4")
    a("--baseline", default=os.path.join("weights", "r32_fp.npz"),
      help="full-precision reference file the energy ratios are taken against ('' for none)")
    a("--out", required=True, help="folder to write the results into (created if missing)")
    a("--limit", type=int, default=None, help="use only the first N evaluation samples")
    a("--calib-limit", type=int, default=None, help="use only the first N calibration samples")
    a("--backend", default="fast", choices=["fast", "reference"])
    a("--batch-size", type=int, default=100, help="samples per batch")
    a("--threads", type=int, default=1, help="BLAS threads for the float32 layers")
    a("--energy", default=None, metavar="FILE",
      help="the main energy table (JSON, docs/COUNTING.md); default: the paper's Table I with "
           "valid-tap MACs; the paper-style table is always priced beside it")
    a("--json", default=None, metavar="PATH", help="also write design_space.json here ('-': stdout)")
    a("--fetch", action="store_true", help="fetch CIFAR-10 into the cache if missing")
    a("--no-progress", action="store_true", help="no progress bar on stderr")
    return ap


def parse_rules(text: str) -> List[str]:
    from . import calibrate
    rules = [r.strip() for r in text.split(",") if r.strip()]
    if not rules:
        raise UsageError("--rules: expected at least one rule")
    for r in rules:
        if r != ds.STORED:
            try:
                calibrate.parse_rule(r)
            except ValueError as exc:
                raise UsageError(f"--rules: {exc} (or 'stored')") from None
    return rules


def run(args) -> dict:
    rules = parse_rules(args.rules)
    check_positive(args, "--batch-size", "--threads")
    for opt in ("limit", "calib_limit"):
        v = getattr(args, opt)
        if v is not None and v < 1:
            raise UsageError(f"--{opt.replace('_', '-')}: expected a positive integer, got {v}")
    if not os.path.isdir(args.weights_dir):
        raise UsageError(f"--weights-dir {args.weights_dir}: not a folder")
    files = ds.grid_files(args.weights_dir)
    if not files:
        raise UsageError(f"--weights-dir {args.weights_dir}: holds no .npz file")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    if args.json and args.json != "-":
        check_destination(args.json, "--json")
    tables = {"default": load_energy_table(args.energy), "paper": load_energy_table(PAPER_TABLE)}
    models = [(f, ds.load_point(f)) for f in files]
    classes = {m.spec.num_classes for _, m in models}
    if len(classes) != 1:
        raise UsageError(f"--weights-dir {args.weights_dir}: the files disagree on the number of "
                         f"classes {sorted(classes)}")
    n_classes = classes.pop()
    base = None
    if args.baseline:
        base = ds.load_point(args.baseline)
        if base.spec.num_classes != n_classes:
            raise UsageError(f"--baseline {args.baseline}: {base.spec.num_classes} classes, the "
                             f"grid has {n_classes}")
    ev_path = resolve_images(args.images, args.fetch)
    ev_x, ev_y = _labelled(ev_path, "cifar10", args.limit, n_classes, "--images")
    need_calib = any(r != ds.STORED for r in rules)
    cal_path = cal_x = cal_y = None
    if need_calib:
        cal_path, cal_x, cal_y = labelled_set(args.calib, None, "--calib", "--calib-range",
                                              "cifar10", args.fetch, n_classes)
        if args.calib_limit:
            cal_x, cal_y = cal_x[:args.calib_limit], cal_y[:args.calib_limit]
    on = None if not args.no_progress else False
    points = []
    t0 = time.time()
    with threadpool_limits(args.threads):
        for i, (path, model) in enumerate(models):
            ex = make_executor(model, args.backend)
            label = f"[{i + 1}/{len(models)}] {os.path.basename(path)}"
            with Progress(len(ev_x) + (len(cal_x) if need_calib else 0), label, enabled=on) as bar:
                e_outs = engine.outputs(model, ev_x, ex, args.batch_size, bar)
                c = ((engine.outputs(model, cal_x, ex, args.batch_size, bar), cal_y)
                     if need_calib else (e_outs, ev_y))
            points.append(ds.measure_point(path, model, c, (e_outs, ev_y), rules, tables))
        baseline = None
        if base is not None:
            with Progress(len(ev_x), "baseline " + os.path.basename(args.baseline),
                          enabled=on) as bar:
                b_outs = engine.outputs(base, ev_x, make_executor(base, args.backend),
                                        args.batch_size, bar)
            baseline = ds.baseline_record(args.baseline, base, (b_outs, ev_y), tables)
    ds.ratios_vs(baseline, points, tables)
    return {"format": ds.FORMAT, "version": ds.VERSION, "weights_dir": args.weights_dir,
            "evaluation": {"images": ev_path, "samples": int(len(ev_y))},
            "calibration": ({"images": cal_path, "samples": int(len(cal_y))} if need_calib
                            else None),
            "rules": rules, "energy_tables": {k: t.to_dict() for k, t in tables.items()},
            "baseline": baseline, "points": points,
            "pareto": {t: ds.fronts(points, rules[0], t) for t in tables},
            "seconds": round(time.time() - t0, 1)}


def write_outputs(doc: dict, out: str) -> List[str]:
    """design_space.json, Fig. 4 (PNG, SVG) and tables.md into ``out`` (each atomically)."""
    from . import fig4, paper_tables
    os.makedirs(out, exist_ok=True)
    written = [os.path.join(out, "design_space.json")]
    status = emit_json(doc, written[0])
    if status:
        raise UsageError(f"--out {out}: cannot write design_space.json")
    written += fig4.draw(doc, os.path.join(out, "fig4_cifar10"))
    path = os.path.join(out, "tables.md")
    paper_tables.write(doc, path)
    return written + [path]


def summary_lines(doc: dict) -> List[str]:
    rule = doc["rules"][0]
    lines = [f"{'file':<28} {'config':>8} {'bits':>4} | {'no exit':>8} | {rule:>10}: "
             f"{'acc':>7} {'exits':>7} {'energy':>9} {'vs fp':>6}"]
    for p in doc["points"]:
        r = p["rules"][rule]
        en = r["energy"]["default"]
        lines.append(f"{p['file']:<28} {p['config']:>8} {p['edge_bits']:>4} | "
                     f"{100 * p['no_exit']['accuracy']:7.2f}% | {'':>10}  "
                     f"{100 * r['accuracy']:6.2f}% {100 * r['edge_fraction']:6.2f}% "
                     f"{en['total_pJ'] / 1e6:6.1f} uJ {en['reduction_vs_full_precision']:5.2f}x"
                     + ("" if p["final"] else "  (in training)"))
    front = doc["pareto"]["default"]["with_exits"]
    lines.append(f"Pareto front with exits ({rule}, default table): " + ", ".join(front))
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        doc = run(args)
        written = write_outputs(doc, args.out)
    except (WeightsError, SpecError, EnergyTableError, UsageError, DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = sys.stderr if args.json == "-" else sys.stdout
    print("\n".join(summary_lines(doc)), file=out)
    print("wrote " + ", ".join(written), file=out)
    return emit_json(doc, args.json) if args.json else 0


if __name__ == "__main__":
    sys.exit(main())
