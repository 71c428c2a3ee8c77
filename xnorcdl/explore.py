"""``python -m xnorcdl explore``: the design space of a folder of weights files: Fig. 4, Tables II-IV

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

from . import cli
from . import design_space as ds
from . import engine, paths
from .cli import VALIDATION, VALIDATION_HELP
from .energy import load_energy_table
from .errors import UsageError
from .model import load_model
from .report import emit_json

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER_TABLE = os.path.join(HERE, "energy_table_paper.json")
DEFAULT_RULES = ds.STORED


def add_arguments(ap: argparse.ArgumentParser) -> None:
    a = ap.add_argument
    a("--weights-dir", required=True, type=paths.input_path(folder=True),
      help="folder of weights files (.npz directly in it)")
    a("--include-partial", action="store_true",
      help="also take WEIGHTS_DIR/partial/NAME.npz for each point without a final file (the "
           "provisional state of a point in training; marked as such in every output)")
    g = cli.add_images(ap, default="test_batch.bin", help="labelled evaluation records",
                       formats=("cifar10",))
    g.add_argument("--calib", default=VALIDATION, type=cli.images_type,
                   help=f"labelled calibration records for rules other than 'stored'; "
                        f"{VALIDATION_HELP}")
    g.add_argument("--calib-limit", type=cli.integer(), default=None,
                   help="use only the first N calibration samples (default: all)")
    a("--rules", default=DEFAULT_RULES, type=cli.rules_type(also=(ds.STORED,)),
      help="comma-separated threshold rules: stored (each file's own thresholds), fixed:T, "
           "within:D, exits:P, accuracy:A; the first one draws Fig. 4")
    a("--baseline", default=os.path.join("weights", "r32_fp.npz"),
      type=paths.input_path(specials=("",)),
      help="full-precision reference file the energy ratios are taken against ('' for none)")
    a("--out", required=True, type=paths.output_dir(),
      help="folder to write the results into (created if missing)")
    cli.add_backend(ap)
    a("--workers", type=cli.integer(1, 64), default=1,
      help="threads measuring files side by side, each with its own executor (throughput on "
           "several cores; the same results)")
    a("--energy", default=None, metavar="FILE", type=paths.input_path(),
      help="the main energy table (JSON, docs/COUNTING.md) (default: the paper's Table I with "
           "valid-tap MACs); the paper-style table is always priced beside it")
    cli.add_json(ap, "design_space.json")
    cli.add_progress(ap)


#: the files ``--out`` receives
OUT_FILES = ("design_space.json", "fig4_cifar10.png", "fig4_cifar10.svg", "tables.md")


def weights_files(args) -> List[str]:
    """The weights files of ``--weights-dir`` (and its partial/ with ``--include-partial``)."""
    if not os.path.isdir(args.weights_dir):
        raise UsageError(f"--weights-dir {args.weights_dir}: not a folder", where="--weights-dir")
    files = ds.grid_files(args.weights_dir, args.include_partial)
    if not files:
        raise UsageError(f"--weights-dir {args.weights_dir}: holds no .npz file",
                         where="--weights-dir")
    return files


def io_paths(args) -> dict:
    """The files explore reads from ``--weights-dir`` and writes into ``--out``, for the
    checks of :func:`xnorcdl.paths.check_io`."""
    return {"inputs": [("--weights-dir", f) for f in weights_files(args)]
            + [("--energy", PAPER_TABLE)],
            "outputs": [("--out", os.path.join(args.out, name), False) for name in OUT_FILES]}


def parse_rules(text: str) -> List[str]:
    rules = [r.strip() for r in text.split(",") if r.strip()]
    if not rules:
        raise UsageError("--rules: expected at least one rule", where="--rules")
    cli.parse_rules(",".join(r for r in rules if r != ds.STORED) or "fixed:0")
    return rules


def measure(args) -> dict:
    rules = parse_rules(args.rules)
    files = weights_files(args)
    tables = {"default": load_energy_table(args.energy), "paper": load_energy_table(PAPER_TABLE)}
    models = [(f, load_model(f)) for f in files]
    classes = {m.spec.num_classes for _, m in models}
    if len(classes) != 1:
        raise UsageError(f"--weights-dir {args.weights_dir}: the files disagree on the number of "
                         f"classes {sorted(classes)}", where="--weights-dir")
    n_classes = classes.pop()
    base = None
    if args.baseline:
        base = load_model(args.baseline)
        if base.spec.num_classes != n_classes:
            raise UsageError(f"--baseline {args.baseline}: {base.spec.num_classes} classes, the "
                             f"grid has {n_classes}", where="--baseline")
    ev_path = cli.resolve_images(args.images, args.fetch)
    ev_x, ev_y = cli.labelled(ev_path, "cifar10", args.limit, n_classes, "--images")
    need_calib = any(r != ds.STORED for r in rules)
    cal_path = cal_x = cal_y = None
    if need_calib:
        cal_path, cal_x, cal_y = cli.labelled_set(args.calib, None, "--calib", "--calib-range",
                                                  "cifar10", args.fetch, n_classes)
        if args.calib_limit:
            cal_x, cal_y = cal_x[:args.calib_limit], cal_y[:args.calib_limit]
    t0 = time.time()
    per_file = len(ev_x) + (len(cal_x) if need_calib else 0)

    def point(path, model, bar):
        ex = cli.executor(model, args.backend)
        e_outs = engine.outputs(model, ev_x, ex, args.batch_size, bar)
        c = ((engine.outputs(model, cal_x, ex, args.batch_size, bar), cal_y)
             if need_calib else (e_outs, ev_y))
        pt = ds.measure_point(path, model, c, (e_outs, ev_y), rules, tables)
        return pt, ds.correct_by_rule(pt, e_outs, ev_y)

    with cli.threads(args):
        workers = min(args.workers, len(models))
        if workers == 1:
            points = []
            for i, (path, model) in enumerate(models):
                label = f"[{i + 1}/{len(models)}] {os.path.basename(path)}"
                with cli.progress(args, per_file, label) as bar:
                    points.append(point(path, model, bar))
        else:   # one file per thread at a time, one progress bar over all of them
            import concurrent.futures
            from .progress import Locked
            with cli.progress(args, per_file * len(models),
                              f"{len(models)} files, {workers} workers") as bar:
                shared = Locked(bar)
                with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                    points = list(pool.map(lambda pm: point(*pm, shared), models))
        points, correct = [p for p, _ in points], [c for _, c in points]
        baseline = None
        if base is not None:
            with cli.progress(args, len(ev_x), "baseline " + os.path.basename(args.baseline)) \
                    as bar:
                b_outs = engine.outputs(base, ev_x, cli.executor(base, args.backend),
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
            "paired": ds.paired_twins(points, correct),
            "seconds": round(time.time() - t0, 1)}


def write_outputs(doc: dict, out: str) -> List[str]:
    """design_space.json, Fig. 4 (PNG, SVG) and tables.md into ``out`` (each atomically)."""
    from . import fig4, paper_tables
    os.makedirs(out, exist_ok=True)
    written = [os.path.join(out, OUT_FILES[0])]
    emit_json(doc, written[0], "--out")
    written += fig4.draw(doc, os.path.join(out, os.path.splitext(OUT_FILES[1])[0]))
    path = os.path.join(out, OUT_FILES[3])
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


def run(args: argparse.Namespace) -> int:
    doc = measure(args)
    written = write_outputs(doc, args.out)
    out = cli.text_out(args)
    print("\n".join(summary_lines(doc)), file=out)
    print("wrote " + ", ".join(written), file=out)
    return emit_json(doc, args.json) if args.json else 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(sys.modules[__name__], argv, "python -m xnorcdl explore")


if __name__ == "__main__":
    sys.exit(main())
