"""The exact lineage of a weights file, generated from the provenance it stores.

    python weights/lineage.py weights/r32_20E.npz [--markdown]

A file trained with ``weights/recipe/train.py --init SRC`` stores SRC's path, sha256 and
provenance in its own (``init``, ``init_sha256``, ``init_provenance``), so the provenance is a
chain back to the run that started from scratch. This script walks that chain and prints it
in order, first run first, one numbered step per run or edit:

* a training run: its command, what it started from (sha256 prefix), its teacher, epochs,
  steps, wall time, machine, date, and what was exported (the last epoch, the epoch chosen by
  ``--select-by`` (``selected``), or the weight average of ``--swa-every`` (``swa``));
* edits recorded after a run, in the order listed here: a model soup (``weight_soup``), batch-norm
  statistics re-estimated (``bn_restat``), then each exit-threshold recalibration written by
  ``python -m xnorcdl.tradeoff --write`` (``recalibrations``, in the order they were made).

Each step ends with the sha256 prefix of the file it gave (the next step's source, or the file
itself for the last step). The teacher of a distillation is a side branch; its own lineage is
that of its file. ``weights/LINEAGE.md`` holds this script's ``--markdown`` output for every
shipped file between marker comments, and ``tests/test_lineage.py`` checks that they agree.

The file is read with the engine's validating loader (``xnorcdl.format.load_weights``,
``allow_pickle=False``); nothing here needs PyTorch.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from typing import Dict, List, Optional

from xnorcdl.format import WeightsError, load_weights

SHA_PREFIX = 8  # hex digits of a sha256 shown in a step


class LineageError(ValueError):
    """A provenance that cannot be read as a lineage; the message names the field."""


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _short(sha: Optional[str]) -> str:
    return sha[:SHA_PREFIX] if isinstance(sha, str) and sha else "unknown"


def _need(prov: dict, key: str, where: str, kind=None):
    if not isinstance(prov, dict):
        raise LineageError(f"{where}: expected a JSON object, got {type(prov).__name__}")
    if key not in prov:
        raise LineageError(f"{where}: missing field '{key}'")
    value = prov[key]
    if kind is not None and not isinstance(value, kind):
        raise LineageError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def _runs(prov: dict, where: str = "provenance") -> List[tuple]:
    """The chain of (provenance, field path) from the first run to ``prov``, first run first."""
    chain = []
    while True:
        _need(prov, "command", where, str)
        chain.append((prov, where))
        if not prov.get("init"):
            break
        _need(prov, "init_sha256", where, str)
        prov = _need(prov, "init_provenance", where, dict)
        where += ".init_provenance"
    return chain[::-1]


def _run_step(prov: dict, where: str) -> Dict:
    teacher = prov.get("teacher")
    exported = "the last epoch"
    if prov.get("swa"):
        s = prov["swa"]
        exported = (f"the weight average of {s.get('snapshots')} snapshots (every {s.get('every')} "
                    f"steps from {100 * float(s.get('start', 0)):g} % of the run on), batch-norm "
                    f"statistics over {s.get('bn_passes')} augmented pass(es)")
    elif prov.get("selected"):
        s = prov["selected"]
        exported = (f"epoch {s.get('epoch')} ({s.get('phase')} phase), chosen by "
                    f"--select-by {s.get('by')}")
    return {"kind": "train", "command": prov["command"], "where": where,
            "from": (None if not prov.get("init") else
                     {"path": prov["init"], "sha256": prov["init_sha256"]}),
            "teacher": (None if not teacher else
                        {"path": teacher.get("path"), "sha256": teacher.get("sha256"),
                         "kd_weight": teacher.get("kd_weight"), "kd_temp": teacher.get("kd_temp")}),
            "strategy": prov.get("strategy"), "epochs": prov.get("epochs"),
            "exit_epochs": prov.get("exit_epochs"), "steps": prov.get("steps"),
            "wall_time_s": prov.get("wall_time_s"), "machine": prov.get("machine"),
            "date": prov.get("date"), "exported": exported}


def _edit_steps(prov: dict, where: str) -> List[Dict]:
    out = []
    soup = prov.get("weight_soup")
    if soup:
        sources = _need(soup, "sources", f"{where}.weight_soup", list)
        out.append({"kind": "weight_soup", "where": f"{where}.weight_soup",
                    "sources": [{"path": s.get("path"), "sha256": s.get("sha256")}
                                for s in sources],
                    "images": soup.get("images"), "augment": soup.get("augment")})
    restat = prov.get("bn_restat")
    if restat:
        out.append({"kind": "bn_restat", "where": f"{where}.bn_restat",
                    "source_sha256": restat.get("source_sha256"), "images": restat.get("images"),
                    "augment": restat.get("augment"), "batch_norms": restat.get("batch_norms")})
    recal = prov.get("recalibrations", [])
    if not isinstance(recal, list):
        raise LineageError(f"{where}.recalibrations: expected a list, got {recal!r}")
    for k, r in enumerate(recal):
        w = f"{where}.recalibrations[{k}]"
        out.append({"kind": "recalibration", "where": w, "rule": _need(r, "rule", w, str),
                    "calibration": r.get("calibration"), "samples": r.get("samples"),
                    "source_sha256": _need(r, "source_sha256", w, str),
                    "previous": r.get("previous"), "thresholds": r.get("thresholds")})
    return out


def lineage(prov: dict, file_sha256: str) -> List[Dict]:
    """Numbered steps (dicts with ``n``, ``kind``, ``gave``) from the first run to the file."""
    if not isinstance(prov, dict):
        raise LineageError("provenance: missing (the file records no lineage)")
    chain = _runs(prov)
    steps: List[Dict] = []
    for i, (p, where) in enumerate(chain):
        block = [_run_step(p, where)] + _edit_steps(p, where)
        # What each step gave: the next edit's source, or the next run's --init, or the file.
        nxt = chain[i + 1][0]["init_sha256"] if i + 1 < len(chain) else file_sha256
        for j, step in enumerate(block):
            later = block[j + 1] if j + 1 < len(block) else None
            step["gave"] = (later.get("source_sha256") if later and later.get("source_sha256")
                            else nxt)
        steps.extend(block)
    for n, step in enumerate(steps, 1):
        step["n"] = n
    outputs = {s["gave"]: s["n"] for s in steps}
    for s in steps:  # a teacher made earlier in this chain is named by its step
        if s["kind"] == "train" and s["teacher"]:
            s["teacher"]["step"] = outputs.get(s["teacher"]["sha256"])
    return steps


def _seconds(s) -> str:
    if not isinstance(s, (int, float)):
        return "wall time not recorded"
    return f"{s:g} s ({s / 60:.0f} min)" if s >= 120 else f"{s:g} s"


def _describe(step: Dict) -> List[str]:
    """The facts of one step as short clauses (shared by the text and Markdown forms)."""
    if step["kind"] == "train":
        f = step["from"]
        src = ("from scratch" if f is None
               else f"from {f['path']} (sha256 {_short(f['sha256'])})")
        t = step["teacher"]
        if t is None:
            teach = "no teacher"
        else:
            teach = (f"teacher {t['path']} (sha256 {_short(t['sha256'])}"
                     + (f", the output of step {t['step']}" if t.get("step") else "")
                     + f"), distillation weight {t['kd_weight']:g}, temperature {t['kd_temp']:g}")
        epochs = f"{step['strategy']}, {step['epochs']} epoch(s)"
        if step["exit_epochs"]:
            epochs += f" + {step['exit_epochs']} exit-only epoch(s)"
        return [src, teach, f"{epochs}, {step['steps']} steps, {_seconds(step['wall_time_s'])}",
                f"on {step['machine']}", f"finished {step['date']}", f"exported {step['exported']}"]
    if step["kind"] == "recalibration":
        prev = ", ".join(f"{t:.7g}" for t in step["previous"] or [])
        new = ", ".join(f"{t:.7g}" for t in step["thresholds"] or [])
        return [f"from sha256 {_short(step['source_sha256'])}",
                f"exit thresholds by rule {step['rule']} on {step['calibration']} "
                f"({step['samples']} samples): {prev} -> {new} nats",
                "command rebuilt from the record (rule, calibration set, thresholds)"]
    if step["kind"] == "bn_restat":
        return [f"from sha256 {_short(step['source_sha256'])}",
                f"running statistics of {step['batch_norms']} batch norms re-estimated over "
                f"{step['images']} training images (augmented passes: {step['augment']})"]
    srcs = ", ".join(f"{s['path']} ({_short(s['sha256'])})" for s in step["sources"])
    return [f"mean of {srcs}",
            f"batch-norm statistics over {step['images']} training images "
            f"(augmented passes: {step['augment']})"]


def _command(step: Dict) -> str:
    return {"train": lambda s: s["command"],
            "recalibration": lambda s: (f"python -m xnorcdl.tradeoff --weights SOURCE "
                                       f"--rules {s['rule']} --write OUT"),
            "bn_restat": lambda s: "python weights/recipe/bn_restat.py",
            "weight_soup": lambda s: "python weights/recipe/weight_soup.py"}[step["kind"]](step)


def format_text(path: str, sha: str, steps: List[Dict]) -> str:
    lines = [f"{path}: sha256 {sha}, {len(steps)} step(s)"]
    for s in steps:
        lines.append(f"{s['n']:>2}. {_command(s)}")
        lines += [f"    {c}" for c in _describe(s)]
        lines.append(f"    gave sha256 {_short(s['gave'])}")
    return "\n".join(lines) + "\n"


def format_markdown(path: str, sha: str, steps: List[Dict]) -> str:
    lines = []
    for s in steps:
        lines.append(f"{s['n']}. " + "; ".join(_describe(s)) + f"; gave `{_short(s['gave'])}`:")
        lines += ["", "   ```", f"   {_command(s)}", "   ```", ""]
    lines.append(f"The file: `{path}`, sha256 `{sha}`.")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python weights/lineage.py",
        description="Print the numbered lineage of a weights file from its stored provenance.")
    p.add_argument("weights", help="a weights file (.npz)")
    p.add_argument("--markdown", action="store_true",
                   help="Markdown, as pasted in weights/LINEAGE.md (default: plain text)")
    return p


def render(path: str, markdown: bool = False, label: Optional[str] = None) -> str:
    """The lineage of the file at ``path``; ``label`` is the name printed for it (default path)."""
    spec, _ = load_weights(path)
    sha = sha256_of(path)
    steps = lineage(spec.provenance, sha)
    return (format_markdown if markdown else format_text)(label or path, sha, steps)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = render(args.weights, args.markdown)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LineageError as exc:
        print(f"error: {args.weights}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
