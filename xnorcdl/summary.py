"""``python -m xnorcdl summary``: per-layer operation, memory and energy table of a weights file

In the spirit of Larq's model summary: one row per layer (the prepared layers the engine runs,
counted by :mod:`xnorcdl.counter`) with its placement, precision, output shape, parameters,
parameter memory, MACs by precision and energy per sample (paper Table I, :mod:`xnorcdl.energy`);
totals for the edge, the cloud and the whole network; then what one sample costs for each place
it can leave. ``--json PATH`` writes all of it. Counting rules: docs/COUNTING.md.
``python -m xnorcdl.summary`` runs the same command.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import cli, counter
from .energy import fmt_pj, load_energy_table, profile, split_energy
from .model import load_model
from .report import emit_json


def _kib(bits: int) -> str:
    return f"{bits / 8192:.2f}"


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def layer_table(model, table) -> dict:
    """The summary as a JSON-friendly dict: layers, group totals, outcomes, baselines."""
    prof = profile(model, table)
    bits = sorted({r.precision for r in prof.rows if r.macs_valid})
    layers = []
    for r, c, m in zip(prof.rows, prof.compute, prof.memory):
        d = r.to_dict()
        d.update(compute_pJ=float(c), memory_pJ=float(m), energy_pJ=float(c + m))
        layers.append(d)
    groups = {}
    for name, keep in (("edge", lambda r: r.placement == counter.EDGE),
                       ("cloud", lambda r: r.placement == counter.CLOUD),
                       ("network", lambda r: True)):
        rows = [r for r in prof.rows if keep(r)]
        groups[name] = dict(counter.total(rows), **{f"{k}_pJ": v for k, v in
                                                     split_energy(rows, prof.table).items()})
    spec = model.spec
    return {
        "model": {"depth": spec.depth, "num_classes": spec.num_classes,
                  "edge_convs": spec.edge_convs, "cloud_convs": spec.num_convs - spec.edge_convs,
                  "edge_bits": spec.edge_bits, "shortcut": spec.shortcut,
                  "exits": [e.after_conv for e in spec.exits]},
        "table": prof.table.to_dict(),
        "mac_bits": bits,
        "layers": layers,
        "totals": groups,
        "outcomes": prof.outcomes(model),
        "baselines_pJ_per_sample": {"full_precision_no_exit": prof.fp_no_exit,
                                    "hybrid_no_exit": prof.hybrid_no_exit},
        "bytes_per_cloud_sample": int(prof.comm_bytes[-1]),
    }


def format_table(doc: dict) -> str:
    """Aligned text of :func:`layer_table`."""
    conv = doc["table"]["mac_convention"]
    bits = doc["mac_bits"]
    head = (["layer", "place", "bits", "output", "params", "param KiB", "traffic KiB"]
            + [f"{b}-bit MACs" for b in bits] + ["energy"])
    body = []
    for d in doc["layers"]:
        macs = d[f"macs_{conv}"]
        body.append([d["name"], d["placement"], str(d["precision"]), _shape(d["output_shape"]),
                     str(d["params"]), _kib(d["param_bits"]),
                     _kib(d["read_bits"] + d["write_bits"])]
                    + [str(macs) if macs and d["precision"] == b else "0" for b in bits]
                    + [fmt_pj(d["energy_pJ"])])
    foot = []
    for name, g in doc["totals"].items():
        by = g[f"macs_{conv}_by_bits"]
        foot.append([f"total {name}", "", "", "", str(g["params"]), _kib(g["param_bits"]),
                     _kib(g["read_bits"] + g["write_bits"])]
                    + [str(by.get(str(b), 0)) for b in bits] + [fmt_pj(g["total_pJ"])])
    widths = [max(len(row[i]) for row in [head] + body + foot) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w) if i == 0 or i in (1, 3) else c.rjust(w)  # noqa: E731
                                 for i, (c, w) in enumerate(zip(row, widths)))
    rule = "-" * len(line(head))
    out = [line(head), rule] + [line(r) for r in body] + [rule] + [line(r) for r in foot]
    m = doc["model"]
    net = doc["totals"]["network"]
    out += ["",
            f"ResNet-{m['depth']} {m['edge_convs']}E+{m['cloud_convs']}C, {m['edge_bits']}-bit "
            f"edge, shortcut {m['shortcut']}, exits after conv {m['exits'] or 'none'}",
            f"MACs (every layer, all exits): valid {net['macs_valid']}, dense {net['macs_dense']} "
            f"(energy uses {conv}); table {doc['table']['path']}"]
    for o in doc["outcomes"]:
        e = o["pJ_per_sample"]
        where = f"after conv {o['after_conv']}" if o["after_conv"] else "at the head"
        out.append(f"a sample leaving {o['outcome']} ({where}): {fmt_pj(e['total'])} "
                   f"(edge {fmt_pj(e['edge'])}, cloud {fmt_pj(e['cloud'])}; compute "
                   f"{fmt_pj(e['compute'])}, memory {fmt_pj(e['memory'])}), sends "
                   f"{o['comm_bytes']} B")
    b = doc["baselines_pJ_per_sample"]
    out.append(f"baselines per sample: full precision without exits "
               f"{fmt_pj(b['full_precision_no_exit']['total'])}, this hybrid without exits "
               f"{fmt_pj(b['hybrid_no_exit']['total'])}")
    return "\n".join(out)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    cli.add_weights(ap)
    cli.add_energy(ap)
    cli.add_json(ap, help="also write the summary as JSON ('-' for stdout instead of the table)")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.weights)
    table = load_energy_table(args.energy)
    doc = layer_table(model, table)
    doc["weights"] = args.weights
    if args.json != "-":
        print(format_table(doc))
    return emit_json(doc, args.json) if args.json else 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(sys.modules[__name__], argv, "python -m xnorcdl.summary")


if __name__ == "__main__":
    sys.exit(main())
