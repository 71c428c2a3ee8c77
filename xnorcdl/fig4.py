"""Fig. 4 of the paper from a design-space document (:mod:`xnorcdl.explore`): accuracy against
energy per sample, one series per edge bit depth with and without the early exit.

Series: the joint single-exit points of each bit depth, joined in order of M (solid: Algorithm 1
with the first rule's thresholds; dashed: the same files with their exits closed, every sample
to the cloud, i.e. the hybrid of section III.A). Other points (separate optimization, two exits)
are drawn alone, the full-precision baseline as a star, and the points on the Pareto front
(with exits) carry their "16E+14C" labels; a point still in training is ringed in gray with
the epoch it reached. matplotlib (Agg) draws it: plotting is what it is
for, and nothing in the engine depends on it.
"""
from __future__ import annotations

from typing import List

from .files import atomic_path

COLORS = {1: "#d62728", 2: "#1f77b4", 4: "#2ca02c"}


def _series(doc: dict):
    joint, other = {}, []
    for p in doc["points"]:
        single = len(p["exits_after_conv"]) == 1 and p["strategy"] == "joint"
        (joint.setdefault(p["edge_bits"], []).append(p) if single else other.append(p))
    for pts in joint.values():
        pts.sort(key=lambda p: p["edge_convs"])
    return joint, other


def _xy(p: dict, rule: str, table: str, exits: bool):
    row = p["rules"][rule] if exits else p["no_exit"]
    return row["energy"][table]["total_pJ"] / 1e6, 100 * row["accuracy"]


def _save(fig, path: str) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight")


def _label_front(points: List[dict], rule: str, table: str, ax) -> None:
    """Label the Pareto points ("16E+14C 4b"), left to right, above each point, or below it
    where the label before would overlap (within about a label's width and height)."""
    ax.autoscale_view()
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    last = None
    for p in sorted(points, key=lambda q: _xy(q, rule, table, True)):
        x, y = _xy(p, rule, table, True)
        above = True
        if last is not None and abs(x - last[0]) < 0.14 * (x1 - x0) \
                and abs(y - last[1]) < 0.05 * (y1 - y0):
            above = not last[2]
        ax.annotate(f"{p['config']} {p['edge_bits']}b", (x, y), textcoords="offset points",
                    xytext=(5, 5) if above else (5, -13), fontsize=8, weight="bold")
        last = (x, y, above)


def draw(doc: dict, stem: str, table: str = "default") -> List[str]:
    """Write ``stem.png`` and ``stem.svg``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rule = doc["rules"][0]
    joint, other = _series(doc)
    front = set(doc["pareto"][table]["with_exits"])
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for bits in sorted(joint):
        pts, c = joint[bits], COLORS.get(bits, "k")
        xs, ys = zip(*[_xy(p, rule, table, True) for p in pts])
        ax.plot(xs, ys, "-o", color=c, label=f"{bits}-bit edge, with exit ({rule})")
        xs, ys = zip(*[_xy(p, rule, table, False) for p in pts])
        ax.plot(xs, ys, "--s", color=c, alpha=0.55, mfc="none",
                label=f"{bits}-bit edge, without exit")
    for p in other:
        x, y = _xy(p, rule, table, True)
        kind = "2 exits" if len(p["exits_after_conv"]) > 1 else p["strategy"]
        ax.plot([x], [y], "D", color=COLORS.get(p["edge_bits"], "k"), mfc="none", ms=8)
        ax.annotate(f"{p['config']} {p['edge_bits']}b, {kind}", (x, y), textcoords="offset points",
                    xytext=(6, -12), fontsize=7, color="dimgray")
    for p in doc["points"]:
        if not p["final"]:       # a provisional file: ringed, with how far its training got
            x, y = _xy(p, rule, table, True)
            ax.plot([x], [y], "o", ms=14, mfc="none", mec="0.6", zorder=1)
            t = p.get("training") or {}
            if t.get("epoch") is not None:
                ax.annotate(f"epoch {t['epoch']}" + (f"/{t['of']}" if t.get("of") else ""),
                            (x, y), textcoords="offset points", xytext=(-8, -16), fontsize=6,
                            color="0.45")
    if doc.get("baseline"):
        b = doc["baseline"]["no_exit"]
        ax.plot([b["energy"][table]["total_pJ"] / 1e6], [100 * b["accuracy"]], "*", ms=14,
                color="k", label="full precision (32-bit), no exit")
    _label_front([p for p in doc["points"] if p["file"] in front], rule, table, ax)
    unfinished = [p for p in doc["points"] if not p["final"]]
    depths = sorted({p["depth"] for p in doc["points"]})
    title = (f"CIFAR-10, ResNet-{'/'.join(map(str, depths))}: accuracy vs energy per sample")
    if unfinished:
        title += f"\n({len(unfinished)} of {len(doc['points'])} points still in training)"
    ax.set_title(title)
    ax.set_xlabel(f"energy per sample (uJ, {doc['energy_tables'][table]['mac_convention']} MACs, "
                  "paper Table I)")
    ax.set_ylabel(f"test accuracy (%), {doc['evaluation']['samples']} images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.text(0.01, -0.02, "without exit = the same files with their exits closed (every sample "
             "to the cloud); diamonds: separate optimization or two exits"
             + ("; gray rings: still in training (provisional)" if unfinished else ""),
             fontsize=7, color="dimgray")
    out = []
    for ext in ("png", "svg"):
        path = f"{stem}.{ext}"
        _save(fig, path)
        out.append(path)
    plt.close(fig)
    return out
