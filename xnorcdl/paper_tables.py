"""Tables II, III and IV of the paper in its layout, the paper's numbers beside ours, from a
design-space document (:mod:`xnorcdl.explore`).

Ours are measured by the engine on the evaluation images with the first rule's thresholds;
energies are means per sample (every sample pays the edge, only cloud-bound samples the cloud)
from the operation counter priced with paper Table I, under the default (valid-tap MACs, weights
and activations from memory) and the paper-style (dense MACs, weights read once) tables.
"""
from __future__ import annotations

import os
from typing import Optional

from .files import atomic_write

#: Table II (CIFAR-10 row): % of early exits and accuracy, separate vs joint, 16E+14C binary
PAPER_II = {"separate": (24.1, 88.72), "joint": (52.8, 89.16)}
#: Table III: edge and cloud energy per configuration and bit depth, in the paper's unit ("mJ")
PAPER_III = {10: {1: (261, 2269), 2: (295, 2108), 4: (363, 2059)},
             16: {1: (213, 1440), 2: (264, 1168), 4: (365, 1089)},
             20: {1: (236, 991), 2: (299, 805), 4: (424, 726)},
             24: {1: (203, 645), 2: (278, 478), 4: (429, 406)}}
#: Table IV, 20E+10C binary: exit fractions (%), accuracy (%), energy ("mJ"), 1 vs 2 exits
PAPER_IV = {1: ([59.3], 88.61, 729), 2: ([38.6, 19.7], 85.98, 724)}

DASH = "—"


def _find(doc: dict, m: int, bits: int, exits: int = 1, strategy: str = "joint") -> Optional[dict]:
    for p in doc["points"]:
        if (p["edge_convs"], p["edge_bits"], len(p["exits_after_conv"]), p["strategy"]) == \
                (m, bits, exits, strategy):
            return p
    return None


def _pct(x: Optional[float]) -> str:
    return DASH if x is None else f"{100 * x:.2f}"


def _mark(p: dict) -> str:
    return "" if p["final"] else "*"


def table_ii(doc: dict, rule: str) -> str:
    sep, joint = _find(doc, 16, 1, strategy="separate"), _find(doc, 16, 1)

    def cells(p):
        if p is None:
            return DASH, DASH
        r = p["rules"][rule]
        return _pct(r["edge_fraction"]) + _mark(p), _pct(r["accuracy"]) + _mark(p)

    (se, sa), (je, ja) = cells(sep), cells(joint)
    return "\n".join([
        "### Table II: separate vs joint optimization (16E+14C, binary edge)",
        "",
        "| | early exits, separate (%) | early exits, joint (%) | accuracy, separate (%) "
        "| accuracy, joint (%) |",
        "|---|---:|---:|---:|---:|",
        f"| CIFAR-10, paper | {PAPER_II['separate'][0]} | {PAPER_II['joint'][0]} | "
        f"{PAPER_II['separate'][1]} | {PAPER_II['joint'][1]} |",
        f"| CIFAR-10, ours | {se} | {je} | {sa} | {ja} |",
        paired_note(doc, joint, sep, rule, ("joint", "separate"))]).rstrip()


def paired_note(doc: dict, a: Optional[dict], b: Optional[dict], rule: str, names) -> str:
    """One line under a table: the paired test of points a and b (``doc["paired"]``), with
    exits (``rule``) and without; empty when either point is missing or was not paired."""
    if a is None or b is None:
        return ""
    for row in doc.get("paired", []):
        if (row["a"], row["b"]) == (a["file"], b["file"]):
            break
    else:
        return ""

    def part(key, what):
        c = row["correct"].get(key)
        if c is None:
            return ""
        return (f"{what}: right only with {names[0]} on {c['only_a']} images, only with "
                f"{names[1]} on {c['only_b']}, p = {c['p_value']:.2g}")
    parts = [x for x in (part(rule, f"with exits (`{rule}`)"), part("no exit", "without exits"))
             if x]
    return ("\nPaired on the same images (McNemar's exact test, two-sided), "
            + "; ".join(parts) + ".")


def _uj(p: Optional[dict], rule: str, table: str, part: str) -> str:
    if p is None:
        return DASH
    return f"{p['rules'][rule]['energy'][table][part] / 1e6:.1f}{_mark(p)}"


def table_iii(doc: dict, rule: str) -> str:
    head = ("| | 1-bit edge | 1-bit cloud | 2-bit edge | 2-bit cloud | 4-bit edge | 4-bit cloud |\n"
            "|---|---:|---:|---:|---:|---:|---:|")
    lines = ["### Table III: inference energy at the edge and in the cloud", "",
             "Paper (its unit is printed as \"mJ\"; a full-precision ResNet-32 is about 70 M MACs, "
             "about 0.32 mJ per sample at 4.6 pJ per MAC, so these are neither mJ per sample nor "
             "comparable in scale with ours; the paper's Table III also belongs to its CIFAR-100 "
             "discussion). Compare the shape: edge roughly flat, cloud falling with M.", "", head]
    for m, row in PAPER_III.items():
        lines.append(f"| {m}E+{30 - m}C | " + " | ".join(f"{row[b][0]} | {row[b][1]}"
                                                          for b in (1, 2, 4)) + " |")
    for table, what in (("default", "default table: valid-tap MACs, weights and activations "
                                     "from memory"),
                        ("paper", "paper-style table: dense MACs, weights read once")):
        lines += ["", f"Ours, CIFAR-10, uJ per sample ({what}):", "", head]
        for m in PAPER_III:
            cells = []
            for b in (1, 2, 4):
                p = _find(doc, m, b)
                cells += [_uj(p, rule, table, "edge_pJ"), _uj(p, rule, table, "cloud_pJ")]
            lines.append(f"| {m}E+{30 - m}C | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_iv(doc: dict, rule: str) -> str:
    one, two = _find(doc, 20, 1), _find(doc, 20, 1, exits=2)

    def cells(p):
        if p is None:
            return DASH, DASH, DASH
        r = p["rules"][rule]
        return (", ".join(_pct(f) for f in r["exit_fractions"]) + _mark(p),
                _pct(r["accuracy"]) + _mark(p), _uj(p, rule, "default", "total_pJ"))

    o, t = cells(one), cells(two)
    p1, p2 = PAPER_IV[1], PAPER_IV[2]
    return "\n".join([
        "### Table IV: one or two early exits (20E+10C, binary edge)", "",
        "| | exiting at edge, 1 exit (%) | 2 exits (%) | accuracy, 1 exit (%) | 2 exits (%) "
        "| energy, 1 exit | 2 exits |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| CIFAR-10, paper (energy in its \"mJ\") | {p1[0][0]} | "
        f"{', '.join(str(v) for v in p2[0])} | {p1[1]} | {p2[1]} | {p1[2]} | {p2[2]} |",
        f"| CIFAR-10, ours (energy in uJ per sample) | {o[0]} | {t[0]} | {o[1]} | {t[1]} "
        f"| {o[2]} | {t[2]} |",
        paired_note(doc, one, two, rule, ("one exit", "two exits"))]).rstrip()


def render(doc: dict) -> str:
    rule = doc["rules"][0]
    ev = doc["evaluation"]
    unfinished = [p["file"] for p in doc["points"] if not p["final"]]
    lines = ["# Design space: Tables II-IV", "",
             f"Ours: {ev['samples']} images of {os.path.basename(ev['images'])}, thresholds by "
             f"rule `{rule}`" + (" (each file's stored thresholds, calibrated on the validation "
                                 "split)" if rule == "stored" else " on the calibration set")
             + "; `—`: point not in the grid yet."]
    if unfinished:
        lines.append("`*`: the file is still in training (a provisional state): "
                     + ", ".join(unfinished) + ".")
    lines += ["", table_ii(doc, rule), "", table_iii(doc, rule), "", table_iv(doc, rule), ""]
    return "\n".join(lines)


def write(doc: dict, path: str) -> None:
    """``tables.md`` at ``path``, atomically."""
    with atomic_write(path, "w") as f:
        f.write(render(doc))
