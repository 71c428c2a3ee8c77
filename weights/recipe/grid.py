#!/usr/bin/env python
"""Train the design-space grid of the paper's section III (``weights/grid/``), resumably.

Points (CIFAR-10, ResNet-32, full-precision stem, zero-pad shortcuts):

* ``r32_{M}E_{b}b``: M in {10, 16, 20, 24} quantized edge convs, b in {1, 2, 4} bits, one early
  exit after conv M, joint optimization (eq. 5, lambda = 0.6 on the exit as in the paper);
* ``r32_16E_1b_separate``: Table II's separate optimization (the hybrid without exits, then its
  convs frozen and the exit trained alone on eq. 4);
* ``r32_20E_1b_2exits``: Table IV, exits after conv 10 and conv 20 (lambda 0.3 each).

Every point is fine-tuned from ``weights/r32_fp.npz`` and distilled from it, with two rules
for the start (:func:`start_args`, measured before the runs: val accuracy after 120 steps,
``weights/README.md``, "How a point starts"):

* 2/4-bit points fit their quantizers' ranges at the start (``--fit-ranges 1``): float weights
  sit so close to zero that eq. (3) would give them the two codes next to zero, and the residual
  branches would start about Z-fold too weak;
* points with M >= 20 edge convs, and 1-bit points with M >= 16 (Table II's separate point
  too, so that it starts as its joint twin), take the stem and their first edge convs (up to
  20) from the trained 20E hybrid ``weights/r32_20E.npz`` (``--init-edge``; itself fine-tuned
  from ``r32_fp.npz``), whose edge already learned the edge block's structure (BN before the
  quantizer, no ReLU). At 2/4 bits and M < 20 the float file starts better (the binary edge's
  convs were trained for sign activations and to feed more binary convs); the 1-bit 10E point
  kept the float start it was already far along with.

``r32_20E_1b`` is the shipped ``weights/r32_20E.npz`` recalibrated with the grid's threshold
rule, and ``r32_20E_1b_2exits`` starts from that file (its second exit is new). The epoch budget
per point is fixed before the runs (:data:`EPOCHS`); the recipe is :data:`COMMON`.

The driver runs one epoch of each unfinished point in turn (round robin: every point gets a
provisional file early), each as ``train.py ... --partial weights/grid/partial --stop-after 1``,
so the whole state of the grid lives in the repository (``partial/``: the model after its last
epoch and the schedule state) and survives the loss of every cache. Rerun the same command to
continue; a point whose ``weights/grid/<name>.npz`` exists is final and is skipped. When a
point becomes final its figures go into ``weights/grid/figures.json`` and its ``partial/``
entries are removed (:func:`finalize`)::

    python weights/recipe/grid.py [--only NAME[,NAME...]] [--rounds N] [--dry-run]

**Later budgets** (``--budget N`` for N >= 2, :data:`BUDGETS`, each fixed before any of its
own runs, from the results of the budgets that had ended): the points named there train further
from their final file (``--init weights/grid/NAME.npz``, or another point's where the budget's
``"start"`` names one; the same recipe at a lower peak rate, a cosine of its own), one epoch
per invocation as above with its state in ``partial/<budget>/`` (``second``, ``third``, ...). When such a run ends its file replaces the point's only if its
validation accuracy without exits (the 5000 held-out training images, never the test set) is
at least the point's file's before the run (:func:`settle`); the decision and both figures go into
``weights/grid/budgets.json`` under the budget's name and the point is finalized again. The
lineage of a replaced file records every run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GRID = os.path.join("weights", "grid")
PARTIAL = os.path.join(GRID, "partial")
FP = os.path.join("weights", "r32_fp.npz")
SHIPPED = os.path.join("weights", "r32_20E.npz")

#: the threshold rule of every grid file: the largest entropy threshold that keeps the
#: validation accuracy of Algorithm 1 within 0.75 points of the same file without exits (stricter
#: than the 1.5-point limit on test, which a threshold fitted on 5000 validation images at 1 point
#: overshot on two files; weights/README.md, "Thresholds")
RULE = "within:0.75"

#: epochs per point, by edge bit depth (fixed before the runs): 1-bit points learn the most
EPOCHS = {4: 3, 2: 4, 1: 8}

#: the recipe shared by every point: SGD (Nesterov), cosine with 5 % warm-up, distillation
#: from the full-precision network (alpha 0.9, T 4) with the gradient norm clipped at 5; the
#: training forward through torch.compile (about 1.4x faster steps on one CPU thread; not part
#: of the configuration a resume checks, so a point may switch between epochs)
COMMON = ["--depth", "32", "--teacher", FP, "--kd-weight", "0.9", "--kd-temp", "4",
          "--clip-grad", "5", "--lr", "0.02", "--sched", "cosine", "--warmup", "0.05",
          "--batch", "128", "--seed", "0", "--eval-every", "1",
          "--log-every", "50", "--threshold-rule", RULE, "--compile", "1"]


#: later budgets (fixed before their runs, each after the one before had ended): name, peak
#: learning rate (a run starts from a trained file) and epochs per point.
#: 2: the points nearest their floors (4-bit 10E/16E at 89.9/89.5 %, still rising in their last
#: epoch), then the 2-bit 10E point and the 1-bit 24E point, at half of COMMON's rate;
#: 3: the three points the second budget moved up (validation without exits +0.36/+0.48/+0.72)
#: and still rising in its last epoch, at half the second budget's rate again (24E 1-bit did not
#: improve at 0.01 and is left to another recipe);
#: 4: the one point that still gained more than half a point of validation accuracy without exits
#: in the third budget (10E 2-bit, +0.66), at the third budget's rate (the 4-bit points gained
#: +0.16 and -0.14 there);
#: 5: the point nearest its floor (10E 4-bit, 90.38 % on test against 90.5), fixed while the
#: fourth ran (another point): its gains per budget fell with the rate (+0.36 at 0.01 in three
#: epochs, +0.16 at 0.005), so a longer cycle at 0.01;
#: 6: the same cycle for the 4-bit 16E point (89.65 % on test) and again for 10E 2-bit (it fell
#: at 0.005 in the fourth), after the fifth moved 10E 4-bit up by +0.42 on validation;
#: 7: that cycle once more for 16E 4-bit (+0.30 on validation in the sixth, 90.04 % on test
#: against 90.5) and for the 4-bit point with the most room (20E, 84.78 %), fixed after the
#: sixth had ended (10E 2-bit fell again there, -0.40, and is left to another recipe);
#: 8: the same cycle again for 20E 4-bit (+2.56 on validation in the seventh, 86.91 % on test)
#: and for the first time for 24E 4-bit (79.22 %), fixed after the seventh had ended (16E 4-bit
#: gained +0.08 there and waits);
#: 9: that cycle again for 24E 4-bit (+3.84 on validation in the eighth, still rising in its
#: last epoch) and for the first time for a 2-bit point past 10E (16E 2-bit, 82.67 % on test,
#: only ever trained by the first budget), fixed after the eighth had ended (20E 4-bit gained
#: +0.46 there);
#: 10: that cycle again for 16E 2-bit (+2.08 on validation in the ninth) and for the first time
#: for 24E 2-bit (the lowest-energy point of the Pareto front, 68.58 % on test), fixed after the
#: ninth had ended (24E 4-bit gained +1.28 there);
#: 11: that cycle again for 24E 2-bit (+8.00 on validation in the tenth) and for the first time
#: for 20E 2-bit (75.18 % on test, the last deep point without a 0.01 cycle), fixed after the
#: tenth had ended (16E 2-bit gained +1.52 there);
#: 12: that cycle again for both (24E 2-bit +1.94 and 20E 2-bit +4.92 on validation in the
#: eleventh, both still rising), fixed after the eleventh had ended;
#: 13: that cycle again for 20E 2-bit (+2.78 on validation in the twelfth, the largest gain of
#: the last budgets) and for 16E 2-bit (+1.52 in the tenth, 85.95 % on test: the 2-bit point
#: nearest its floor), fixed after the twelfth had ended (24E 2-bit gained +1.60 there);
#: 14: that cycle again for the two 24E points with the most room below their floors (2-bit
#: 80.40 % and 4-bit 84.25 % on test; +1.60 on validation in the twelfth and +1.28 in the ninth,
#: both rested since), fixed after the thirteenth had ended (20E 2-bit gained +1.12 there, 16E
#: 2-bit +0.02: that cycle is spent for it);
#: 15: that cycle again for 24E 4-bit (+0.98 on validation in the fourteenth, still rising
#: until its last epoch) and for 20E 2-bit (+1.12 in the thirteenth, 83.53 % on test), fixed
#: after the fourteenth had ended (24E 2-bit fell there, 81.06 against 81.42: that cycle is
#: spent for it too);
#: 16: that cycle again for 24E 4-bit (+0.60 on validation in the fifteenth, 85.96 % on test)
#: and for 20E 4-bit (+0.46 in the eighth, rested since, 87.51 % on test), fixed after the
#: fifteenth had ended (20E 2-bit fell there, 85.28 against 85.32: its cycle is spent too);
#: 17: a cycle twice as long (12 epochs, the same peak 0.01, so the cosine spends twice the time
#: at low rates) for 16E 4-bit (+0.30 then +0.08 in its six-epoch cycles, 90.13 % on test,
#: 0.37 short of its floor) and 20E 4-bit (+0.46, +0.36: still rising, 88.15 % on test), fixed
#: after the sixteenth had ended (24E 4-bit gained only +0.12 there);
#: 18: that 12-epoch cycle again for 20E 4-bit (+0.72 in the seventeenth, 88.94 % on test) and
#: for 24E 4-bit (+0.12 in its last six-epoch cycle, 86.23 % on test), fixed after the
#: seventeenth had ended (16E 4-bit +0.14 there, 90.66 % on test: over its floor);
#: 19: the four 2-bit points started from their 4-bit twins (``"start"``: ``--init
#: weights/grid/r32_{M}E_4b.npz``, the twin's quantizer ranges kept), four epochs at 0.01, fixed
#: after the eighteenth had ended (20E 4-bit +0.16, 24E 4-bit +0.86 there). Their six-epoch
#: cycles from their own files were spent (16E +0.02, 20E -0.04, 24E -0.36, 10E fell twice), and
#: they sit 1.5-6.8 points below their twins on test; measured before (20E 2-bit, 120 steps at
#: 0.01, 2000 validation images without exits): from its own file 83.75 %, from the 4-bit twin
#: 87.30 % (with the ranges refitted, ``--fit-ranges 1``, 57.35 %: a refit throws away the
#: twin's trained batch norms). The file it replaces is still the point's own (:func:`settle`)
#: 20: six-epoch cycles at 0.01 from their own files for the 24E 1-bit point (80.37 % on test
#: without exits against 85, the 1-bit point furthest below its floor, trained only by the
#: first and second budgets) and for the three deeper 2-bit points, fixed after the nineteenth
#: had ended (all four 2-bit points kept: +0.82 / +2.42 / +3.34 / +3.52 on validation at
#: 10E / 16E / 20E / 24E, still rising in their last epoch). Measured before (24E 1-bit, 120
#: steps at 0.01, 2000 validation images without exits): from its own file 80.40 %, from its
#: new 2-bit twin 52.20 % (the step from 2-bit codes to signs is not a fine-tune's)
BUDGETS = {
    2: {"name": "second", "lr": "0.01",
        "epochs": {"r32_10E_4b": 3, "r32_16E_4b": 3, "r32_10E_2b": 4, "r32_24E_1b": 3}},
    3: {"name": "third", "lr": "0.005",
        "epochs": {"r32_10E_4b": 3, "r32_16E_4b": 3, "r32_10E_2b": 4}},
    4: {"name": "fourth", "lr": "0.005", "epochs": {"r32_10E_2b": 4}},
    5: {"name": "fifth", "lr": "0.01", "epochs": {"r32_10E_4b": 6}},
    6: {"name": "sixth", "lr": "0.01", "epochs": {"r32_16E_4b": 6, "r32_10E_2b": 6}},
    7: {"name": "seventh", "lr": "0.01", "epochs": {"r32_16E_4b": 6, "r32_20E_4b": 6}},
    8: {"name": "eighth", "lr": "0.01", "epochs": {"r32_20E_4b": 6, "r32_24E_4b": 6}},
    9: {"name": "ninth", "lr": "0.01", "epochs": {"r32_24E_4b": 6, "r32_16E_2b": 6}},
    10: {"name": "tenth", "lr": "0.01", "epochs": {"r32_16E_2b": 6, "r32_24E_2b": 6}},
    11: {"name": "eleventh", "lr": "0.01", "epochs": {"r32_24E_2b": 6, "r32_20E_2b": 6}},
    12: {"name": "twelfth", "lr": "0.01", "epochs": {"r32_24E_2b": 6, "r32_20E_2b": 6}},
    13: {"name": "thirteenth", "lr": "0.01", "epochs": {"r32_20E_2b": 6, "r32_16E_2b": 6}},
    14: {"name": "fourteenth", "lr": "0.01", "epochs": {"r32_24E_2b": 6, "r32_24E_4b": 6}},
    15: {"name": "fifteenth", "lr": "0.01", "epochs": {"r32_24E_4b": 6, "r32_20E_2b": 6}},
    16: {"name": "sixteenth", "lr": "0.01", "epochs": {"r32_24E_4b": 6, "r32_20E_4b": 6}},
    17: {"name": "seventeenth", "lr": "0.01", "epochs": {"r32_16E_4b": 12, "r32_20E_4b": 12}},
    18: {"name": "eighteenth", "lr": "0.01", "epochs": {"r32_20E_4b": 12, "r32_24E_4b": 12}},
    19: {"name": "nineteenth", "lr": "0.01",
         "epochs": {"r32_20E_2b": 4, "r32_24E_2b": 4, "r32_16E_2b": 4, "r32_10E_2b": 4},
         "start": {"r32_20E_2b": "r32_20E_4b", "r32_24E_2b": "r32_24E_4b",
                   "r32_16E_2b": "r32_16E_4b", "r32_10E_2b": "r32_10E_4b"}},
    20: {"name": "twentieth", "lr": "0.01",
         "epochs": {"r32_24E_1b": 6, "r32_20E_2b": 6, "r32_24E_2b": 6, "r32_16E_2b": 6}},
}

#: when a later run's file replaces the point's (:func:`settle`; stated in ``budgets.json``)
REPLACE_RULE = ("a later run's file replaces the point's when its validation accuracy without "
                "exits (5000 held-out training images) is at least that of the point's file "
                "before the run")


def start_args(m: int, bits: int) -> List[str]:
    """``--init`` and the two start rules of the module docstring for M edge convs of p bits."""
    edge = m >= 20 or (bits == 1 and m >= 16)
    return (["--init", FP] + (["--init-edge", SHIPPED] if edge else [])
            + (["--fit-ranges", "1"] if bits > 1 else []))


def points() -> List[Dict]:
    """The grid, in training order."""
    out = []
    for bits in (4, 2, 1):
        for m in (10, 16, 20, 24):
            name = f"r32_{m}E_{bits}b"
            if (m, bits) == (20, 1):
                out.append({"name": name, "copy": SHIPPED})
                continue
            out.append({"name": name, "args": ["--edge-convs", str(m), "--edge-bits", str(bits),
                                               "--exits", str(m), "--exit-weights", "0.6",
                                               *start_args(m, bits),
                                               "--epochs", str(EPOCHS[bits])]})
    out.append({"name": "r32_16E_1b_separate",
                "args": ["--edge-convs", "16", "--edge-bits", "1", "--exits", "16",
                         "--exit-weights", "0.6", "--strategy", "separate", *start_args(16, 1),
                         "--epochs", str(EPOCHS[1]), "--exit-epochs", "2"]})
    out.append({"name": "r32_20E_1b_2exits",
                "args": ["--edge-convs", "20", "--edge-bits", "1", "--exits", "10,20",
                         "--exit-weights", "0.3,0.3", "--init", SHIPPED,
                         "--epochs", str(EPOCHS[1] // 2)]})
    return out


def later_points(budget: int) -> List[Dict]:
    """A later budget's runs: the first run's model options, started from the final file (the
    point's own, or the one the budget's ``"start"`` names for it)."""
    first = {p["name"]: p for p in points()}
    start = BUDGETS[budget].get("start", {})
    out = []
    for name, epochs in BUDGETS[budget]["epochs"].items():
        args = first[name]["args"]
        model = args[:args.index("--exits") + 4]  # --edge-convs M --edge-bits b --exits M --exit-weights w
        init = final_path(start.get(name, name))
        out.append({"name": name, "budget": budget,
                    "args": [*model, "--init", init, "--epochs", str(epochs)]})
    return out


def final_path(name: str) -> str:
    return os.path.join(GRID, name + ".npz")


def later_out(name: str, budget: int) -> str:
    """Where a later run writes its file before :func:`settle` decides on it (a name of its own
    per budget, so that its checkpoints are not an earlier run's)."""
    tag = BUDGETS[budget]["name"]
    return os.path.join(GRID, tag, f"{name}_{tag}.npz")


def budgets_path() -> str:
    return os.path.join(GRID, "budgets.json")


def settled(name: str, budget: int) -> bool:
    """Whether a point's run of a later budget has been decided on (``budgets.json``)."""
    try:
        with open(budgets_path()) as f:
            return name in json.load(f)[BUDGETS[budget]["name"]]
    except (OSError, ValueError, KeyError):
        return False


def command(point: Dict, threads: int = 2) -> List[str]:
    out, partial, common = final_path(point["name"]), PARTIAL, COMMON
    if point.get("budget"):
        b = BUDGETS[point["budget"]]
        out, partial = later_out(point["name"], point["budget"]), os.path.join(PARTIAL, b["name"])
        common = [b["lr"] if k and COMMON[k - 1] == "--lr" else a for k, a in enumerate(COMMON)]
    return ([sys.executable, os.path.join("weights", "recipe", "train.py")] + common
            + ["--threads", str(threads)] + point["args"]
            + ["--out", out, "--partial", partial, "--stop-after", "1"])


def val_no_exit(path: str) -> float:
    """The validation accuracy without exits a trained file records (its provenance)."""
    from xnorcdl.format import load_weights
    spec, _ = load_weights(path)
    return float(spec.provenance["validation"]["val_no_exit_acc"])


def settle(name: str, budget: int, log) -> bool:
    """Decide on a finished run of a later budget: its file replaces the point's when its
    validation accuracy without exits is at least the point's file's before the run, else it is
    dropped. Records the decision in ``budgets.json`` under the budget's name (written whole,
    then renamed) and returns whether the point's file changed."""
    from xnorcdl.files import sha256_of
    b = BUDGETS[budget]
    new, old = later_out(name, budget), final_path(name)
    before, after = val_no_exit(old), val_no_exit(new)
    kept = "run" if after >= before else "before"
    entry = {"epochs": b["epochs"][name], "lr": float(b["lr"]), "before_sha256": sha256_of(old),
             "run_sha256": sha256_of(new), "val_no_exit_before": before,
             "val_no_exit_run": after, "kept": kept}
    if name in b.get("start", {}):
        entry["start"] = b["start"][name] + ".npz"
    try:
        with open(budgets_path()) as f:
            book = json.load(f)
    except OSError:
        book = {"rule": REPLACE_RULE}
    book.setdefault(b["name"], {})[name] = entry
    tmp = budgets_path() + ".tmp"
    with open(tmp, "w") as f:
        json.dump(book, f, indent=1, sort_keys=True)
        f.write("\n")
    if kept == "run":
        os.replace(new, old)
    else:
        os.remove(new)
    os.replace(tmp, budgets_path())
    log(f"{name}: {b['name']} run {after:.2f} % vs {before:.2f} % before on validation without "
        f"exits: kept the {'new' if kept == 'run' else 'earlier'} file")
    return kept == "run"


def progress(name: str) -> Optional[dict]:
    """The partial state of a point (phase, epoch), or None before its first epoch."""
    js = os.path.join(PARTIAL, name + ".json")
    if not os.path.exists(js):
        return None
    with open(js) as f:
        return json.load(f)["state"]


def figures_path() -> str:
    return os.path.join(GRID, "figures.json")


def needs_finalizing(name: str) -> bool:
    """A final file whose partial entries are still there or whose figures are not recorded
    (``figures.json``, by sha256)."""
    final = final_path(name)
    if not os.path.exists(final):
        return False
    if any(os.path.exists(os.path.join(PARTIAL, name + ext)) for ext in (".npz", ".json")):
        return True
    try:
        with open(figures_path()) as f:
            recorded = json.load(f)["files"].get(name + ".npz", {}).get("sha256")
    except (OSError, ValueError, KeyError):
        recorded = None
    from xnorcdl.files import sha256_of
    return recorded != sha256_of(final)


def finalize(name: str, log, run=subprocess.run) -> None:
    """What a point's final file needs: its documented figures (``evaluate.py --subset 200
    --skip-torch --write``: the first 200 test images on the reference executor, the whole test
    set on the fast one, into ``figures.json``, under a lock so that two drivers do not
    interleave their updates), then its ``partial/`` entries removed."""
    import fcntl
    import tempfile
    cmd = [sys.executable, os.path.join("weights", "recipe", "evaluate.py"), final_path(name),
           "--subset", "200", "--skip-torch", "--threads", "1", "--write"]
    log("$ " + " ".join(cmd))
    with open(os.path.join(tempfile.gettempdir(), "xnorcdl-grid-figures.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    for ext in (".npz", ".json"):
        path = os.path.join(PARTIAL, name + ext)
        if os.path.exists(path):
            os.remove(path)
    log(f"{name}: final; figures recorded, partial state removed")


def copy_point(point: Dict, log) -> None:
    """A point taken from an existing file, recalibrated with :data:`RULE` on the validation
    split (python -m xnorcdl.tradeoff --write)."""
    cmd = [sys.executable, "-m", "xnorcdl.tradeoff", "--weights", point["copy"], "--rules", RULE,
           "--write", final_path(point["name"])]
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated point names (default: all)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="stop after N rounds of one epoch per unfinished point (0: until done)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch CPU threads per run (1 leaves a core for other work)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--budget", type=int, default=1, choices=(1, *BUDGETS),
                    help="1: the first runs; N >= 2: that later budget (BUDGETS), from final files")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    if args.budget > 1:
        return run_later(args, ap)
    grid = selected(points(), args.only, ap)
    rounds = 0
    for p in grid:
        if not args.dry_run and needs_finalizing(p["name"]):
            finalize(p["name"], log)
    while True:
        todo = [p for p in grid if not os.path.exists(final_path(p["name"]))]
        if not todo or (args.rounds and rounds >= args.rounds):
            break
        for k, p in enumerate(todo):
            state = progress(p["name"])
            where = "new" if state is None else f"phase {state['phase']} epoch {state['epoch']}"
            log(f"round {rounds + 1}, point {k + 1}/{len(todo)}: {p['name']} ({where})")
            if args.dry_run:
                print(" ".join(command(p, args.threads)) if "args" in p else f"copy {p['copy']}")
                continue
            if "copy" in p:
                copy_point(p, log)
            else:
                subprocess.run(command(p, args.threads), check=True, cwd=ROOT)
            if needs_finalizing(p["name"]):
                finalize(p["name"], log)
        rounds += 1
        if args.dry_run:
            break
    left = [p["name"] for p in grid if not os.path.exists(final_path(p["name"]))]
    log("grid complete" if not left else f"unfinished: {', '.join(left)}")
    return 0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def selected(runs: List[Dict], only: str, ap) -> List[Dict]:
    """The runs ``--only`` names (all without it); an unknown name is a usage error."""
    if not only:
        return runs
    wanted = set(only.split(","))
    unknown = wanted - {p["name"] for p in runs}
    if unknown:
        ap.error(f"--only: unknown point(s) {sorted(unknown)}")
    return [p for p in runs if p["name"] in wanted]


def run_later(args, ap) -> int:
    """``--budget N``: one epoch of each unsettled run of budget N in turn until all are settled."""
    budget, tag = args.budget, BUDGETS[args.budget]["name"]
    runs = selected(later_points(budget), args.only, ap)
    missing = [p["name"] for p in runs if not os.path.exists(final_path(p["name"]))]
    missing += [p["args"][p["args"].index("--init") + 1] for p in runs
                if not os.path.exists(p["args"][p["args"].index("--init") + 1])]
    if missing:
        raise SystemExit(f"error: --budget {budget} needs the final file of {missing}")
    rounds = 0
    while True:
        todo = [p for p in runs if not settled(p["name"], budget)]
        if not todo or (args.rounds and rounds >= args.rounds):
            break
        for p in todo:
            log(f"{tag} budget, round {rounds + 1}: {p['name']}")
            if args.dry_run:
                print(" ".join(command(p, args.threads)))
                continue
            if not os.path.exists(later_out(p["name"], budget)):
                subprocess.run(command(p, args.threads), check=True, cwd=ROOT)
            if os.path.exists(later_out(p["name"], budget)):
                settle(p["name"], budget, log)
                if needs_finalizing(p["name"]):
                    finalize(p["name"], log)
        rounds += 1
        if args.dry_run:
            break
    left = [p["name"] for p in runs if not settled(p["name"], budget)]
    log(f"{tag} budget complete" if not left else f"unsettled: {', '.join(left)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
