"""The paper's design-space exploration (section III, Fig. 4, Tables II-IV) measured by the engine.

A *point* is one weights file: M quantized edge convs at b bits, its early exits, its training
strategy. Each file runs once over the calibration set and once over the evaluation set with
every exit and the head evaluated (:func:`xnorcdl.engine.outputs`); Algorithm 1 is then replayed
on the stored logits for each threshold rule (:mod:`xnorcdl.calibrate`; ``stored`` keeps the
file's own thresholds), and every outcome is priced with the operation counter and each energy
table (:mod:`xnorcdl.energy`, paper Table I): energy per sample

    E = (1/N) sum_i [E_edge(o_i) + E_cloud(o_i)]

where o_i is the exit sample i left at (or the head) and E_cloud(o) = 0 for an early exit. The
same files with their exits closed (every sample to the head) give the paper's "without exit"
series (the hybrid of section III.A): the dashed lines of Fig. 4.

The Pareto front keeps the points no other point beats on both axes (accuracy at least as high
and energy at most as low, one of them strictly).

Twins, compared paired (:func:`paired_twins`): a separately optimized point and its joint twin
(Table II), a two-exit point and the one-exit point of the same edge (Table IV). Both files see
the same evaluation images, so their accuracies are compared sample by sample with McNemar's
exact test (:func:`xnorcdl.compare.paired`): at ~88 % accuracy on 10,000 images a difference of
a few tenths of a point may or may not be noise, and the discordant counts tell which.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import calibrate, engine
from .energy import energy_summary
from .files import sha256_of
from .model import Model

FORMAT = "xnorcdl-design-space"
VERSION = 1
STORED = "stored"  # the rule name for the thresholds stored in each file
NO_EXIT = "no exit"  # the row of every point without exits (as in xnorcdl.compare)


def config_name(model: Model) -> str:
    """The paper's label of a split: ``16E+14C`` (M edge convs, the rest in the cloud)."""
    spec = model.spec
    return f"{spec.edge_convs}E+{spec.num_convs - spec.edge_convs}C"


def grid_files(folder: str, include_partial: bool = False) -> List[str]:
    """The ``.npz`` files directly in ``folder``, sorted by name; with ``include_partial`` also
    ``folder/partial/NAME.npz`` for every NAME that has no final file yet (a point in
    training, ``weights/recipe/grid.py``)."""
    def npz(d):
        return {n for n in os.listdir(d) if n.endswith(".npz") and not n.endswith(".tmp.npz")
                and os.path.isfile(os.path.join(d, n))} if os.path.isdir(d) else set()
    final = npz(folder)
    paths = {n: os.path.join(folder, n) for n in final}
    if include_partial:
        part = os.path.join(folder, "partial")
        paths.update({n: os.path.join(part, n) for n in npz(part) - final})
    return [paths[n] for n in sorted(paths)]


def describe(path: str, model: Model) -> dict:
    """Configuration of a point, from its spec and provenance."""
    spec, prov = model.spec, model.spec.provenance or {}
    partial = prov.get("partial")
    return {"file": os.path.basename(path), "sha256": sha256_of(path),
            "config": config_name(model), "depth": spec.depth, "edge_convs": spec.edge_convs,
            "cloud_convs": spec.num_convs - spec.edge_convs,
            "edge_bits": spec.edge_bits if spec.edge_convs else 32,
            "exits_after_conv": [e.after_conv for e in spec.exits],
            "exit_features": [int(model.exits[k].weight.shape[1]) for k in range(len(spec.exits))],
            "strategy": prov.get("strategy", "joint") if spec.exits else None,
            "final": partial is None,
            "training": ({"phase": partial.get("phase"), "epoch": partial.get("epoch"),
                          "of": partial.get("of")} if partial else None)}


def replay(model: Model, outs: Sequence[np.ndarray], labels: np.ndarray,
           thresholds: Sequence[float], tables: Dict[str, object]) -> dict:
    """Algorithm 1 replayed on stored logits with ``thresholds``: accuracy, exit fractions,
    accuracy of the samples that leave, and energy per sample (edge, cloud, total) per table."""
    pred, where = calibrate.decide(outs, thresholds)
    correct = pred == labels
    edge = where != engine.FINAL
    out = {"thresholds": [float(t) for t in thresholds],
           "accuracy": float(correct.mean()),
           "edge_fraction": float(edge.mean()),
           "exit_fractions": [float((where == k).mean()) for k in range(len(thresholds))],
           "edge_accuracy": float(correct[edge].mean()) if edge.any() else None,
           "energy": {}}
    for name, table in tables.items():
        s = energy_summary(model, where, table)
        m = s["mean_pJ_per_sample"]
        out["energy"][name] = {
            "edge_pJ": m["edge"], "cloud_pJ": m["cloud"], "total_pJ": m["total"],
            "full_precision_no_exit_pJ": s["baselines_pJ_per_sample"]["full_precision_no_exit"]
            ["total"],
            "reduction_vs_full_precision": s["reduction"]["vs_full_precision_no_exit"]}
    return out


def measure_point(path: str, model: Model, calib, evaluation, rules: Sequence[str],
                  tables: Dict[str, object]) -> dict:
    """Every figure of one point. ``calib`` and ``evaluation``: (logits of every output,
    labels); thresholds are chosen on ``calib`` only."""
    (c_outs, c_y), (e_outs, e_y) = calib, evaluation
    point = describe(path, model)
    k = len(model.exits)
    point["exit_top1"] = [float((o.argmax(1) == e_y).mean()) for o in e_outs[:-1]]
    point["no_exit"] = replay(model, e_outs, e_y, [0.0] * k, tables)
    point["no_exit"]["calibration_accuracy"] = float((c_outs[-1].argmax(1) == c_y).mean())
    point["rules"] = {}
    for rule in rules:
        if rule == STORED:
            thr = [e.threshold for e in model.spec.exits]
        else:
            thr = calibrate.calibrate(c_outs, c_y, rule) if k else []
        row = replay(model, e_outs, e_y, thr, tables)
        row["calibration"] = {key: v for key, v in replay(model, c_outs, c_y, thr, {}).items()
                              if key in ("accuracy", "edge_fraction")}
        point["rules"][rule] = row
    return point


def correct_by_rule(point: dict, outs: Sequence[np.ndarray], labels: np.ndarray) -> dict:
    """Per-sample correctness (bool ``[N]``) of a measured point without exits and under each of
    its rules, from the thresholds :func:`measure_point` recorded."""
    rows = {NO_EXIT: point["no_exit"], **point["rules"]}
    return {rule: calibrate.decide(outs, row["thresholds"])[0] == labels
            for rule, row in rows.items()}


def twins(points: Sequence[dict]) -> List[tuple]:
    """(role, a, b) index pairs: each separate point with its joint twin (same edge and exit),
    each multi-exit point with the single-exit point whose exit is its last one."""
    def key(p):
        return (p["edge_convs"], p["edge_bits"], p["depth"])
    out = []
    for j, b in enumerate(points):
        for i, a in enumerate(points):
            if i == j or key(a) != key(b) or not a["exits_after_conv"]:
                continue
            if (b["strategy"] == "separate" and a["strategy"] == "joint"
                    and a["exits_after_conv"] == b["exits_after_conv"]):
                out.append(("joint vs separate", i, j))
            elif (len(b["exits_after_conv"]) > 1 and a["exits_after_conv"]
                  == b["exits_after_conv"][-1:] and a["strategy"] == b["strategy"] == "joint"):
                out.append(("one vs more exits", i, j))
    return out


def paired_twins(points: Sequence[dict], correct: Sequence[dict]) -> List[dict]:
    """McNemar's exact test between every pair of :func:`twins`, without exits and under each
    rule both points have: counts of samples right in both, only in a, only in b, neither."""
    from .compare import paired
    out = []
    for role, i, j in twins(points):
        a, b = points[i], points[j]
        rules = [r for r in correct[i] if r in correct[j]]
        out.append({"role": role, "a": a["file"], "b": b["file"],
                    "correct": {r: paired(correct[i][r], correct[j][r]) for r in rules}})
    return out


def pareto(items: Sequence[tuple]) -> List[str]:
    """Names of the non-dominated ``(name, accuracy, energy)`` items (higher accuracy and lower
    energy are better), by increasing energy."""
    front = []
    for name, acc, en in items:
        dominated = any((a >= acc and e <= en) and (a > acc or e < en) for _, a, e in items)
        if not dominated:
            front.append((en, -acc, name))
    return [name for _, _, name in sorted(front)]


def fronts(points: Sequence[dict], rule: str, table: str) -> dict:
    """Pareto fronts (accuracy vs energy per sample under ``table``) with exits (``rule``) and
    without, over the points and both series together."""
    with_exits = [(p["file"], p["rules"][rule]["accuracy"],
                   p["rules"][rule]["energy"][table]["total_pJ"]) for p in points if p["rules"]]
    without = [(p["file"] + ":no_exit", p["no_exit"]["accuracy"],
                p["no_exit"]["energy"][table]["total_pJ"]) for p in points]
    return {"rule": rule, "energy_table": table, "with_exits": pareto(with_exits),
            "without_exits": [n.split(":")[0] for n in pareto(without)],
            "both": pareto(with_exits + without)}


def baseline_record(path: str, model: Model, evaluation, tables) -> dict:
    """The full-precision reference: its accuracy and energy without exits."""
    e_outs, e_y = evaluation
    rec = describe(path, model)
    rec["no_exit"] = replay(model, e_outs, e_y, [0.0] * len(model.exits), tables)
    return rec


def ratios_vs(baseline: Optional[dict], points: Sequence[dict], tables) -> None:
    """Add to every point and rule its energy ratio against the measured baseline file
    (baseline energy / point energy) and its accuracy difference in points."""
    if baseline is None:
        return
    b = baseline["no_exit"]
    for p in points:
        for row in [p["no_exit"]] + list(p["rules"].values()):
            row["vs_baseline"] = {
                "accuracy_points": 100 * (row["accuracy"] - b["accuracy"]),
                "energy_ratio": {t: b["energy"][t]["total_pJ"] / row["energy"][t]["total_pJ"]
                                 for t in tables}}

