"""Validation and export of ``train.py``: the per-epoch validation (and ``--select-by``'s score
of the epoch), the calibration of the exit thresholds on the validation split, the provenance
of the file, and the weights files a run writes (``--out``, ``--select-out``, ``<out>_swa.npz``).

Exit thresholds are calibrated on the validation split only (:mod:`val_scoring`): by default
the largest threshold such that the validation accuracy of the whole conditional network stays
within 0.5 points of the no-exit validation accuracy (``--threshold-rule within:0.5``); both
the calibrated and the paper's fixed 0.5 figures are recorded in the provenance.
"""
from __future__ import annotations

import json
import os
import time
from typing import List, Optional

import torch

from cifar_batches import Data
from epoch_select import better, operating_point
from qat_resnet import HybridResNet, export
from run_records import atomic_save, init_edge_record, init_record, machine, teacher_record
from val_scoring import calibrate_fast, conditional, predict


def select_count(cfg: dict, n_val: int) -> int:
    """How many validation images (the first ones) ``--select-by`` chooses on: ``--select-images``,
    or the whole split of ``n_val`` images."""
    return cfg["select_images"] or n_val


def validation_scope(cfg: dict, n_val: int) -> str:
    """What the end-of-run validation figures cover, for the log: with ``--select-images`` the
    whole split mixes the images that chose the epoch with those kept for comparisons."""
    n_sel = select_count(cfg, n_val)
    if not cfg.get("select_by") or n_sel >= n_val:
        return f"all {n_val} images"
    return (f"all {n_val} images: 0..{n_sel - 1} chose the epoch, {n_sel}..{n_val - 1} are "
            f"held out; compare on those with tradeoff --calib-range {n_sel}:")


def accs_text(accs) -> str:
    """Accuracies (%) of the exits and the head as the log prints them: '74.20 89.38'."""
    return " ".join(f"{a:.2f}" for a in accs)


def validate_epoch(model, data, cfg: dict, state: dict, entry: dict, best_path: str) -> str:
    """One validation: records the accuracies in ``entry`` (a history entry), returns the log
    message.
    With ``--select-by`` it also scores the epoch's operating point (:mod:`epoch_select`) and,
    when it is the best so far, saves the model to ``best_path`` and records it as
    ``state['best']`` (saved before the checkpoint that records it)."""
    val = predict(model, data.x_val, device=cfg["device"])
    yv = data.y_val.numpy()
    accs = [round(float((l.argmax(1).numpy() == yv).mean()) * 100, 2) for l in val]
    entry["val_acc"] = accs
    msg = f", val acc per exit/head {accs_text(accs)}"
    if cfg["select_by"]:
        n = select_count(cfg, len(yv))
        point = operating_point([l[:n].numpy() for l in val], yv[:n], cfg["select_by"])
        entry["select"] = {k: point[k] for k in ("acc", "edge")}
        msg += f"; {cfg['select_by']}: {point['acc']:.2f} % with {point['edge']:.2f} % exits"
        if better(point, state.get("best")):
            best = {"phase": entry["phase"], "epoch": entry["epoch"], **point}
            atomic_save({"model": model.state_dict(), "best": best}, best_path)
            state["best"] = best
            msg += " (best so far)"
    return msg


def validation_figures(model: HybridResNet, data: Data, cfg: dict):
    """(figures, thresholds): the exit thresholds calibrated on the validation split with
    ``--threshold-rule``, and the validation figures of the network without exits, at those
    thresholds and at the paper's fixed 0.5 (accuracies and exit fractions in %)."""
    val = predict(model, data.x_val, device=cfg["device"])
    yv = data.y_val.numpy()
    n_early = len(cfg["exits"])
    no_exit = float((val[-1].argmax(1).numpy() == yv).mean())
    figures = {"val_images": len(yv), "val_no_exit_acc": round(no_exit * 100, 2)}
    thresholds: List[float] = []
    if n_early:
        thresholds = calibrate_fast(val, yv, cfg["threshold_rule"])
        acc, fr = conditional(val, yv, thresholds)
        acc05, fr05 = conditional(val, yv, [0.5] * n_early)
        figures.update({
            "val_exit_acc": [round(float((l.argmax(1).numpy() == yv).mean()) * 100, 2)
                             for l in val[:-1]],
            "threshold_rule": cfg["threshold_rule"], "thresholds": thresholds,
            "val_acc": round(acc * 100, 2), "val_exit_fraction": [round(f * 100, 2) for f in fr],
            "val_acc_at_0.5": round(acc05 * 100, 2),
            "val_exit_fraction_at_0.5": [round(f * 100, 2) for f in fr05]})
    return figures, thresholds


def validate_and_export(model: HybridResNet, data: Data, cfg: dict, state: dict, command: str,
                        log, selected: Optional[dict] = None,
                        extra: Optional[dict] = None) -> None:
    """Calibrate the exit thresholds on the validation split (``--threshold-rule``), record the
    validation figures and the run in the provenance, and write ``cfg['out']``. ``selected``:
    the model is the epoch ``--select-by`` chose, recorded as such (the history stays the
    run's); ``extra``: further provenance entries (``swa``, ``partial``)."""
    figures, thresholds = validation_figures(model, data, cfg)
    n_val = figures["val_images"]
    log(f"validation ({validation_scope(cfg, n_val)}): " + json.dumps(figures))
    done = list(state.get("phase_epochs", {}).values()) or [cfg["epochs"], cfg["exit_epochs"]]
    prov = {"command": command, "strategy": cfg["strategy"], "epochs": done[0],
            "exit_epochs": done[1] if len(done) > 1 else cfg["exit_epochs"],
            "time_budget_s": cfg["time_budget"] or None,
            "steps": sum(h.get("steps", 0) for h in state["history"]),
            "batch": cfg["batch"], "lr": cfg["lr"], "exit_weights": cfg["exit_weights"],
            "clip_grad": cfg["clip_grad"] or None, "optimizer": cfg["optimizer"],
            "seed": cfg["seed"], **init_record(cfg["init"]), **init_edge_record(cfg),
            **teacher_record(cfg),
            "data": data.source,
            "wall_time_s": round(state["wall"], 1), "machine": machine(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "validation": figures, "history": state["history"],
            **({"selected": {"by": selected["rule"], "phase": selected["phase"],
                             "epoch": selected["epoch"], "val_acc": selected["acc"],
                             "val_edge": selected["edge"],
                             "val_images": select_count(cfg, n_val),
                             "init_point": state.get("init_point")}} if selected else {}),
            "schedule_changes": state.get("schedule_changes", []), **(extra or {})}
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out"])), exist_ok=True)
    export(model, cfg["out"], thresholds, prov)
    log(f"wrote {cfg['out']}")


def export_average(averager, data: Data, cfg: dict, state: dict, command: str, log) -> None:
    """``--swa-every``: the averaged weights, their BN statistics recomputed over
    ``--swa-bn-passes`` passes of augmented training batches, calibrated and written to
    ``<out>_swa.npz`` (:mod:`weight_average`)."""
    t0 = time.time()
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + 999)
    batches = (b for _ in range(cfg["swa_bn_passes"]) for b in data.batches(cfg["batch"], gen))
    model = averager.finish(batches)
    log(f"--swa-every {cfg['swa_every']}: {averager.snapshots} snapshots averaged, BN statistics "
        f"recomputed over {cfg['swa_bn_passes']} pass(es) in {time.time() - t0:.0f}s")
    validate_and_export(model, data, {**cfg, "out": cfg["swa_out"]}, state, command, log,
                        extra={"swa": {"every": cfg["swa_every"], "start": cfg["swa_start"],
                                       "snapshots": averager.snapshots,
                                       "bn_passes": cfg["swa_bn_passes"]}})
