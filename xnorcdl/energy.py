"""Energy model: the counts of :mod:`xnorcdl.counter` priced with the paper's Table I.

The paper (section III) estimates inference energy "by multiplying the number of full-precision
and binary operations with corresponding energy listed in Table I" and leaves communication out.
Here, per layer (pJ)::

    E = MACs * E_mac(precision) + add32 * E_add + mul32 * E_mul + cmp32 * E_cmp
        + special32 * E_special + (parameter bits + activation bits read + written) * E_bit

with E_mac(32) = the 32-bit MAC row and E_mac(k) = k * E(binary MAC) for k < 32 (section
II.C.1: "the energy consumed by an operation is proportional to the bit-depth"). MACs are the
valid-tap count unless the table says ``"mac_convention": "dense"``; memory is parameters and
activations unless it says ``"memory": "weights"``. The table is the small
JSON file ``energy_table.json`` (every row with its unit and source); :func:`load_energy_table`
reads an edited copy.

A sample's energy depends only on where it left, so everything is computed once per outcome
(exit k, or the head) and indexed per sample. Reductions are reported against (a) the same
network in full precision without exits and (b) the same hybrid without exits. Rules:
docs/COUNTING.md.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import counter
from .counter import FINAL, LayerCount
from .errors import EnergyTableError
from .model import Model

DEFAULT_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "energy_table.json")
TABLE_FORMAT = "xnorcdl-energy"
TABLE_VERSION = 1
#: operation rows every table must define, with their unit
OPERATIONS = {"add32": "pJ/op", "mac32": "pJ/op", "mac1": "pJ/op", "mem_bit": "pJ/bit",
              "mul32": "pJ/op", "cmp32": "pJ/op", "special32": "pJ/op"}
MAC_CONVENTIONS = ("valid", "dense")
#: what memory traffic is priced: parameters and activations, or parameters only
MEMORY_MODES = ("weights_and_activations", "weights")
#: largest table file read (bytes) and largest energy a row may give (pJ)
MAX_TABLE_BYTES = 1 << 20
MAX_ENERGY = 1e9


@dataclasses.dataclass(frozen=True)
class EnergyTable:
    """Energy per operation (pJ) and per bit of memory access (pJ/bit)."""
    path: str
    energy: Dict[str, float]        # OPERATIONS key -> pJ
    source: Dict[str, str]
    mac_convention: str = "valid"
    mac_base: str = "mac1"          # k-bit MAC = k * energy[mac_base]
    memory_mode: str = "weights_and_activations"

    def mac(self, bits: int) -> float:
        """pJ per MAC at ``bits`` precision: the 32-bit row, or k * binary MAC (section II.C.1)."""
        if bits == counter.FLOAT_BITS:
            return self.energy["mac32"]
        if 1 <= bits < counter.FLOAT_BITS:
            return bits * self.energy[self.mac_base]
        raise ValueError(f"no MAC energy for {bits}-bit operands (expected 1..32)")

    def compute(self, row: LayerCount) -> float:
        """pJ of the arithmetic of one layer for one sample."""
        e = self.energy
        return (row.macs(self.mac_convention) * self.mac(row.precision) + row.add32 * e["add32"]
                + row.mul32 * e["mul32"] + row.cmp32 * e["cmp32"]
                + row.special32 * e["special32"])

    def memory(self, row: LayerCount) -> float:
        """pJ of the memory traffic of one layer for one sample (parameters read once, and,
        unless ``memory_mode`` is ``"weights"``, activations read and written once)."""
        bits = row.memory_bits if self.memory_mode == MEMORY_MODES[0] else row.param_bits
        return bits * self.energy["mem_bit"]

    def to_dict(self) -> dict:
        return {"path": self.path, "mac_convention": self.mac_convention,
                "memory_mode": self.memory_mode, "pJ": dict(self.energy),
                "k_bit_mac": f"k * {self.mac_base}"}


def _fail(path: str, key: str, expected: str, got) -> None:
    raise EnergyTableError(f"{path}: key '{key}': expected {expected}, got {got!r}", where=path)


def _number(path: str, key: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or not 0 < v <= MAX_ENERGY:
        _fail(path, key, f"a finite number in (0, {MAX_ENERGY:g}] (a zero, negative or "
                         "non-finite energy would make every ratio meaningless)", v)
    return float(v)


def _only(path: str, where: str, d: dict, allowed: Sequence[str]) -> None:
    extra = sorted(set(d) - set(allowed))
    if extra:
        raise EnergyTableError(f"{path}: unknown key(s) {extra} in {where}; "
                               f"allowed: {sorted(allowed)}", where=path)


def parse_energy_table(doc, path: str = "<table>") -> EnergyTable:
    """Validate a decoded table (see energy_table.json); errors name ``path`` and the key."""
    if not isinstance(doc, dict):
        raise EnergyTableError(f"{path}: expected a JSON object, got {type(doc).__name__}",
                               where=path)
    _only(path, "the table", doc, ("format", "version", "description", "mac_convention",
                                   "memory", "operations", "rules"))
    if type(doc.get("format")) is not str or doc.get("format") != TABLE_FORMAT:
        _fail(path, "format", repr(TABLE_FORMAT), doc.get("format"))
    if type(doc.get("version")) is not int or doc.get("version") != TABLE_VERSION:
        _fail(path, "version", f"the integer {TABLE_VERSION}", doc.get("version"))
    if "description" in doc and type(doc["description"]) is not str:
        _fail(path, "description", "a string", doc["description"])
    conv = doc.get("mac_convention", "valid")
    if type(conv) is not str or conv not in MAC_CONVENTIONS:
        _fail(path, "mac_convention", " or ".join(repr(c) for c in MAC_CONVENTIONS), conv)
    memory = doc.get("memory", MEMORY_MODES[0])
    if type(memory) is not str or memory not in MEMORY_MODES:
        _fail(path, "memory", " or ".join(repr(c) for c in MEMORY_MODES), memory)
    ops = doc.get("operations")
    if not isinstance(ops, dict):
        _fail(path, "operations", "an object of operation rows", ops)
    _only(path, "'operations'", ops, tuple(OPERATIONS))
    energy, source = {}, {}
    for name, unit in OPERATIONS.items():
        key = f"operations.{name}"
        row = ops.get(name)
        if row is None:
            raise EnergyTableError(f"{path}: missing key '{key}' ({unit}, with 'energy', "
                                   f"'unit' and 'source')", where=path)
        if not isinstance(row, dict):
            _fail(path, key, "an object with 'energy', 'unit' and 'source'", row)
        _only(path, f"'{key}'", row, ("energy", "unit", "source", "note"))
        if "energy" not in row:
            raise EnergyTableError(f"{path}: missing key '{key}.energy'", where=path)
        energy[name] = _number(path, f"{key}.energy", row["energy"])
        if type(row.get("unit")) is not str or row.get("unit") != unit:
            _fail(path, f"{key}.unit", repr(unit), row.get("unit"))
        if "note" in row and type(row["note"]) is not str:
            _fail(path, f"{key}.note", "a string", row["note"])
        src = row.get("source")
        if not isinstance(src, str) or not src.strip():
            _fail(path, f"{key}.source", "a non-empty string saying where the figure comes from",
                  src)
        source[name] = src
    rules = doc.get("rules")
    if not isinstance(rules, dict) or not isinstance(rules.get("mac_k"), dict):
        _fail(path, "rules.mac_k", "an object {'rule': 'proportional', 'base': 'mac1', ...}",
              None if not isinstance(rules, dict) else rules.get("mac_k"))
    _only(path, "'rules'", rules, ("mac_k",))
    rule = rules["mac_k"]
    _only(path, "'rules.mac_k'", rule, ("rule", "base", "formula", "source"))
    if type(rule.get("rule")) is not str or rule.get("rule") != "proportional":
        _fail(path, "rules.mac_k.rule", "'proportional' (E(k-bit MAC) = k * E(base))",
              rule.get("rule"))
    if type(rule.get("base")) is not str or rule.get("base") != "mac1":
        _fail(path, "rules.mac_k.base", "'mac1' (the binary MAC row)", rule.get("base"))
    for key in ("formula", "source"):
        if key in rule and type(rule[key]) is not str:
            _fail(path, f"rules.mac_k.{key}", "a string", rule[key])
    return EnergyTable(path, energy, source, conv, rule["base"], memory)


def load_energy_table(path: Optional[str] = None) -> EnergyTable:
    """Read and validate a table; ``None`` reads the default (paper Table I). The file must be
    a regular file of at most :data:`MAX_TABLE_BYTES` of UTF-8 JSON (nesting bounded, no
    duplicate keys); every problem raises :class:`EnergyTableError` naming the file and key."""
    from .files import parse_json, read_bytes
    path = DEFAULT_TABLE if path is None else os.fspath(path)
    raw = read_bytes(path, MAX_TABLE_BYTES, EnergyTableError, "energy table")
    return parse_energy_table(parse_json(raw, path, EnergyTableError), path)


@functools.lru_cache(maxsize=1)
def default_table() -> EnergyTable:
    return load_energy_table(None)


def _table(table) -> EnergyTable:
    if table is None:
        return default_table()
    if isinstance(table, EnergyTable):
        return table
    return load_energy_table(table)


# ---- per outcome ------------------------------------------------------------------------------

@dataclasses.dataclass
class Profile:
    """Everything priced once per outcome o (o = k: left at exit k; o = K: went on to the head)."""
    rows: List[LayerCount]
    masks: np.ndarray           # [K+1, L] bool
    compute: np.ndarray         # [L] pJ per layer
    memory: np.ndarray          # [L] pJ per layer
    edge: np.ndarray            # [L] bool
    labels: List[str]           # outcome names: exit0.., final
    comm_bytes: np.ndarray      # [K+1] bytes sent to the cloud
    fp_no_exit: Dict[str, float]        # baseline (a): full precision, no exits, pJ per sample
    hybrid_no_exit: Dict[str, float]    # baseline (b): this hybrid without exits, pJ per sample
    table: EnergyTable

    def outcome_energy(self) -> Dict[str, np.ndarray]:
        """[K+1] pJ per outcome: edge, cloud, compute, memory, total."""
        e = self.compute + self.memory
        m = self.masks.astype(np.float64)
        return {"edge": m @ np.where(self.edge, e, 0.0), "cloud": m @ np.where(self.edge, 0.0, e),
                "compute": m @ self.compute, "memory": m @ self.memory, "total": m @ e}

    def outcome_counts(self, o: int) -> Dict[str, object]:
        """Every count of :func:`xnorcdl.counter.total` summed over the rows of outcome o."""
        return counter.total([r for r, keep in zip(self.rows, self.masks[o]) if keep])

    def outcomes(self, model: Model) -> List[dict]:
        """One JSON-friendly dict per outcome: pJ per sample (edge, cloud, compute, memory,
        total), bytes sent, MACs by precision (valid and dense)."""
        oe = self.outcome_energy()
        out = []
        for i, label in enumerate(self.labels):
            c = self.outcome_counts(i)
            out.append({
                "outcome": label,
                "after_conv": model.spec.exits[i].after_conv if i < len(model.exits) else None,
                "pJ_per_sample": {k: float(v[i]) for k, v in oe.items()},
                "comm_bytes": int(self.comm_bytes[i]),
                "macs_valid_by_bits": c["macs_valid_by_bits"],
                "macs_dense_by_bits": c["macs_dense_by_bits"]})
        return out


def split_energy(rows: Sequence[LayerCount], table: EnergyTable) -> Dict[str, float]:
    """pJ of ``rows`` for one sample: edge, cloud, compute, memory and total."""
    c = [table.compute(r) for r in rows]
    m = [table.memory(r) for r in rows]
    edge = sum(x + y for x, y, r in zip(c, m, rows) if r.placement == counter.EDGE)
    tot = sum(c) + sum(m)
    return {"edge": edge, "cloud": tot - edge, "compute": sum(c), "memory": sum(m), "total": tot}


def profile(model: Model, table=None) -> Profile:
    """Price every layer once and build the outcome masks (cheap: about 80 rows for ResNet-32)."""
    table = _table(table)
    rows = counter.layer_counts(model)
    masks = counter.outcome_masks(model, rows)
    n_exits = len(model.exits)
    comm = np.zeros(n_exits + 1, dtype=np.int64)
    comm[n_exits] = counter.edge_output_bytes(model)
    fp_rows = counter.layer_counts(model, full_precision=True, exits=False)
    return Profile(rows, masks, np.array([table.compute(r) for r in rows]),
                   np.array([table.memory(r) for r in rows]),
                   np.array([r.placement == counter.EDGE for r in rows]),
                   [f"exit{k}" for k in range(n_exits)] + ["final"], comm,
                   split_energy(fp_rows, table),
                   split_energy([r for r in rows if r.kind != "exit"], table), table)


def per_sample_energy(model: Model, exit_index, table=None) -> Dict[str, np.ndarray]:
    """Per-sample arrays (pJ, bytes, MACs) from ``Results.exit_index`` (exit k or -1)."""
    prof = profile(model, table)
    o = counter.outcome_index(model, exit_index)
    oe = prof.outcome_energy()
    macs = np.array([sum(r.macs(prof.table.mac_convention) for r, keep in zip(prof.rows, m) if keep)
                     for m in prof.masks], dtype=np.int64)
    out = {f"{k}_pJ": v[o] for k, v in oe.items()}
    out["exit_index"] = np.where(o == len(model.exits), FINAL, o)
    out["comm_bytes"] = prof.comm_bytes[o]
    out["macs"] = macs[o]
    return out


def per_sample_records(model: Model, exit_index, table=None) -> List[dict]:
    """The same, JSON-friendly: one dict per sample with its outcome, pJ (edge, cloud, total),
    bytes sent and MACs by precision (in the table's MAC convention)."""
    prof = profile(model, table)
    conv = prof.table.mac_convention
    rows = [{"exit": o["outcome"], "edge_pJ": o["pJ_per_sample"]["edge"],
             "cloud_pJ": o["pJ_per_sample"]["cloud"], "total_pJ": o["pJ_per_sample"]["total"],
             "comm_bytes": o["comm_bytes"], "macs_by_bits": o[f"macs_{conv}_by_bits"]}
            for o in prof.outcomes(model)]
    return [dict(rows[o], macs_by_bits=dict(rows[o]["macs_by_bits"]))
            for o in counter.outcome_index(model, exit_index)]


def _merge_bits(acc: Dict[str, int], d: Dict[str, int], n: int) -> None:
    for k, v in d.items():
        acc[k] = acc.get(k, 0) + n * v


def _ratio(base: Dict[str, float], mean: Dict[str, Optional[float]], key: str) -> Optional[float]:
    return base[key] / mean[key] if mean[key] else None


def energy_summary(model: Model, exit_index, table=None) -> dict:
    """JSON-serialisable energy report of a run (pJ): mean per sample with the edge/cloud split,
    totals, each outcome, reductions vs full precision without exits and vs this hybrid without
    exits, bytes sent to the cloud (not priced, as in the paper) and operation counts summed."""
    prof = profile(model, table)
    o = counter.outcome_index(model, exit_index)
    n = int(o.size)
    counts = np.bincount(o, minlength=len(prof.labels)).astype(np.int64)
    oe = prof.outcome_energy()
    totals = {k: float(counts @ v) for k, v in oe.items()}
    mean = {k: (v / n if n else None) for k, v in totals.items()}
    outcomes, ops = prof.outcomes(model), {}
    for i, row in enumerate(outcomes):
        row["samples"] = int(counts[i])
        for k, v in prof.outcome_counts(i).items():
            if isinstance(v, dict):
                _merge_bits(ops.setdefault(k, {}), v, int(counts[i]))
            else:
                ops[k] = ops.get(k, 0) + int(counts[i]) * v
    cloud_samples = int(counts[-1])
    return {
        "unit": "pJ",
        "table": prof.table.to_dict(),
        "samples": n,
        "mean_pJ_per_sample": mean,
        "total_pJ": totals,
        "outcomes": outcomes,
        "baselines_pJ_per_sample": {"full_precision_no_exit": prof.fp_no_exit,
                                    "hybrid_no_exit": prof.hybrid_no_exit},
        "reduction": {"vs_full_precision_no_exit": _ratio(prof.fp_no_exit, mean, "total"),
                      "vs_hybrid_no_exit": _ratio(prof.hybrid_no_exit, mean, "total"),
                      "compute_only_vs_full_precision_no_exit":
                          _ratio(prof.fp_no_exit, mean, "compute"),
                      "compute_only_vs_hybrid_no_exit":
                          _ratio(prof.hybrid_no_exit, mean, "compute")},
        "communication": {"bytes_per_cloud_sample": int(prof.comm_bytes[-1]),
                          "cloud_samples": cloud_samples,
                          "total_bytes": int(prof.comm_bytes[-1]) * cloud_samples,
                          "mean_bytes_per_sample": (int(prof.comm_bytes[-1]) * cloud_samples / n
                                                    if n else None),
                          "in_energy": False},
        "ops_total": ops,
    }


# ---- console ----------------------------------------------------------------------------------

def fmt_pj(pj: Optional[float]) -> str:
    """A pJ figure in a readable unit (pJ, nJ, uJ, mJ, J)."""
    if pj is None:
        return "n/a"
    for unit, scale in (("J", 1e12), ("mJ", 1e9), ("uJ", 1e6), ("nJ", 1e3)):
        if abs(pj) >= scale:
            return f"{pj / scale:.3f} {unit}"
    return f"{pj:.3f} pJ"


def fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def format_energy(summary: dict) -> str:
    """A few aligned console lines of :func:`energy_summary`."""
    m, t, n = summary["mean_pJ_per_sample"], summary["total_pJ"], summary["samples"]
    b, r, c = summary["baselines_pJ_per_sample"], summary["reduction"], summary["communication"]
    conv = summary["table"]["mac_convention"]
    ratio = lambda x: "n/a" if x is None else f"{x:.2f}x"  # noqa: E731
    lines = [
        f"energy    {fmt_pj(m['total'])}/sample (edge {fmt_pj(m['edge'])}, cloud "
        f"{fmt_pj(m['cloud'])}); {fmt_pj(t['total'])} over {n} samples "
        f"[{os.path.basename(summary['table']['path'])}: {conv} MACs, memory "
        f"{summary['table']['memory_mode'].replace('_', ' ')}]",
        "          " + ", ".join(f"{o['outcome']} {fmt_pj(o['pJ_per_sample']['total'])}"
                                 for o in summary["outcomes"]) + " per sample",
        f"reduction {ratio(r['vs_full_precision_no_exit'])} vs full precision without exits "
        f"({fmt_pj(b['full_precision_no_exit']['total'])}/sample), "
        f"{ratio(r['vs_hybrid_no_exit'])} vs this hybrid without exits "
        f"({fmt_pj(b['hybrid_no_exit']['total'])}/sample)",
        f"          compute only (no memory): "
        f"{ratio(r['compute_only_vs_full_precision_no_exit'])} and "
        f"{ratio(r['compute_only_vs_hybrid_no_exit'])}; memory is {fmt_pj(m['memory'])} "
        f"of the mean",
        f"comm      {c['bytes_per_cloud_sample']} B per cloud-bound sample x {c['cloud_samples']} "
        f"= {c['total_bytes']} B (not in the energy, as in the paper)",
    ]
    ops = summary["ops_total"]
    macs = ", ".join(f"{k}-bit {fmt_count(v)}"
                     for k, v in ops.get(f"macs_{conv}_by_bits", {}).items())
    lines.append(f"ops       MACs {macs or '0'}; add {fmt_count(ops.get('add32', 0))}, "
                 f"mul {fmt_count(ops.get('mul32', 0))}, cmp {fmt_count(ops.get('cmp32', 0))}; "
                 f"memory {fmt_count(ops.get('memory_bits', 0) / 8)}B (run totals)")
    return "\n".join(lines)
