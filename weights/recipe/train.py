#!/usr/bin/env python
"""Train a conditionally deep hybrid ResNet on CIFAR-10 and export it in the xnorcdl format.

One command, the configuration as arguments (printed, resolved, at start)::

    python weights/recipe/train.py --depth 32 --edge-convs 20 --edge-bits 1 --exits 20 \
        --exit-weights 0.6 --epochs 30 --seed 0 --init weights/r32_fp.npz \
        --out weights/r32_20E.npz

The PyTorch model (:mod:`qat_resnet`) mirrors docs/FORMAT.md operation by operation; quantized
layers train XNOR-Net style on real-valued latent weights with a straight-through estimator.
This file runs the phases of a run (:func:`main`); the recipe's other modules, beside it:
:mod:`train_options` (the command line and its checks), :mod:`train_phases` (model, data,
optimizer, schedule, one epoch, the loss, checkpoints), :mod:`train_export` (validation,
threshold calibration, provenance, export), :mod:`cifar_batches` (split and augmentation),
:mod:`lr_schedule`, :mod:`val_scoring` (validation logits, Algorithm 1, thresholds),
:mod:`epoch_select`, :mod:`weight_average`, :mod:`partial_state` and :mod:`run_records`
(log, checkpoints, provenance). ``python weights/recipe/train.py --help`` lists every option
with its default, in groups.

Training strategies (paper section II.B):

* ``joint`` (eq. 5-6): loss = sum_k lambda_k L_k over the early exits (``--exit-weights``) plus
  (1 - sum lambda_k) times the loss of the final exit (the head); L_k is eq. (4).
* ``separate``: train the hybrid without exits (head loss only) for ``--epochs``, then freeze
  every conv and BN (BN in inference mode) and train each exit alone on eq. (4) for
  ``--exit-epochs`` (the exits share no parameters, so one pass trains all of them independently).
  ``--epochs 0 --exit-epochs N --init FILE`` skips the first phase: it trains (or attaches, for
  an exit the file lacks) only the exits of an already trained hybrid, every other array as in
  FILE.

Data: the 50000 CIFAR-10 training images, of which the LAST 5000 are held out as validation and
never trained on; the test split is never read here. Augmentation: random crop with 4-pixel zero
padding and horizontal flip. SGD (momentum 0.9, Nesterov), or Adam (``--optimizer adam``,
betas 0.9/0.999, the decay coupled as an L2 term), weight decay on float conv and linear
weights only (not on BN, biases, or, by default, the latent weights of quantized convs),
OneCycle or cosine learning rate, batch 128. ``--time-budget S`` replaces ``--epochs``: the same
learning-rate curve is followed along the wall clock and training stops when S seconds are spent
(the epochs and steps done are recorded); on CUDA, convolutions use TF32 (exact for the codes).

Distillation (``--teacher FILE``, optional): every output (exits and head) also learns from the
head logits of a frozen model, typically the full-precision ResNet; see
:func:`train_phases.distill_loss`.
It changes the loss only, never the exported model's semantics. Distillation at T = 4 makes the
binary hybrid diverge within a few dozen steps at lr 0.1 (logits grow without bound, then NaN);
``--clip-grad N`` clips the global gradient norm (N = 5 keeps it stable; the plain
cross-entropy gradient norm is about 3 at the start).

``--cuda-graphs 1`` (CUDA, joint training) captures the training forward and backward once and
replays them (:func:`train_phases.graph_model`); same kernels, fewer launches. ``--compile 1`` runs the
training forward/backward (and the teacher) through ``torch.compile`` instead: on two CPU cores a
batch-128 step of the 20E+10C hybrid takes 0.75 s instead of 1.05 s, after a one-time compilation
of about 100 s (2-4 minutes with a teacher); validation and export use the ordinary modules.

Exit thresholds are calibrated on the validation split only (:mod:`val_scoring`): by default
the largest threshold such that the validation accuracy of the whole conditional network stays
within 0.5 points of the no-exit validation accuracy (``--threshold-rule within:0.5``);
``exits:P`` lets at most P % of the validation samples leave; ``accuracy:A`` keeps the
validation accuracy >= A %; ``fixed:T`` uses T for every exit
(:mod:`xnorcdl.calibrate`). Both the calibrated and the paper's fixed 0.5 figures are recorded in
the file's ``provenance``; ``python -m xnorcdl.tradeoff`` recalibrates a file without PyTorch.

``--select-by RULE`` scores every validated epoch by the operating point RULE calibrates on the
validation split (``accuracy:A``: most edge exits at A %; ``exits:P``: best accuracy at P %
exits) and exports the best epoch to ``--select-out`` besides the last to ``--out``
(:mod:`epoch_select`; the choice is recorded in the provenance as ``selected``).

``--swa-every N`` averages the weights of every N-th step once ``--swa-start`` of the run is
spent (stochastic weight averaging, :mod:`weight_average`), recomputes the BN statistics for
the mean over augmented training batches and exports it to ``<out>_swa.npz`` beside ``--out``.

Initialisation from an .npz (``--init``): arrays are copied by name where the layer has the same
role in both files (:func:`qat_resnet.init_from`: edge BNs without a counterpart start as the
identity, latent weights from the full-precision conv weights, missing exits at random).

Checkpoints are written atomically after every epoch to ``--ckpt-dir`` (default
``$XDG_CACHE_HOME/xnorcdl/runs/<name of --out>``), with the log file ``train.log``; rerunning the
same command resumes from the last completed epoch. ``--partial DIR`` also keeps the model and
the schedule state after every epoch in DIR (:mod:`partial_state`), which a run resumes from
when no checkpoint is newer; ``--stop-after N`` ends an invocation after N epochs.

A bad option or input file ends the command with one ``error:`` line and exit status 2.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from typing import List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the recipe's own modules

import partial_state  # noqa: E402
import train_export  # noqa: E402
import train_phases  # noqa: E402
import weight_average  # noqa: E402
from epoch_select import operating_point  # noqa: E402
from lr_schedule import fast_forward  # noqa: E402
from qat_resnet import CHANNELS_LAST, named_tensors  # noqa: E402
from run_records import Logger, atomic_save  # noqa: E402
from train_options import CHECKPOINT_DEFAULTS, RESUME_KEYS, build_parser, fail, resolve  # noqa: E402,F401
from val_scoring import predict  # noqa: E402


def resume_partial(cfg: dict, model, log):
    """(state, resume marker) of the partial state ``--partial`` holds for this run, its arrays
    copied into ``model`` (:mod:`partial_state`), or None when there is none. ``--epochs`` may
    change before the last phase, as with a checkpoint: the change is recorded."""
    record = partial_state.load(cfg["partial"], cfg, RESUME_KEYS, named_tensors(model),
                                CHECKPOINT_DEFAULTS)
    if record is None:
        return None
    state = record["state"]
    if record["epochs"] != cfg["epochs"]:
        if state["phase"] > 0 or state["epoch"] > cfg["epochs"]:
            raise fail(f"--partial {cfg['partial']}: cannot change --epochs to {cfg['epochs']} "
                       f"after epoch {state['epoch']} of phase {state['phase']}")
        state.setdefault("schedule_changes", []).append(
            {"after_epoch": state["epoch"], "from_epochs": record["epochs"],
             "to_epochs": cfg["epochs"]})
    log(f"resuming from --partial {cfg['partial']}: phase {state['phase']} epoch "
        f"{state['epoch']}, {state['wall']:.0f}s already spent (momentum restarts)")
    return state, {"partial": True}


def main(argv: Optional[List[str]] = None) -> int:
    """One run: resolve the options, build the model and data, resume from a checkpoint or a
    partial state when there is one, train the phases epoch by epoch (validating, checkpointing
    and, with ``--partial``, writing the partial state after each), then export ``--out`` and,
    when asked, the ``--select-by`` epoch and the weight average. Returns 0."""
    args = build_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    cfg = resolve(args)
    torch.set_num_threads(cfg["threads"])
    CHANNELS_LAST[0] = bool(cfg["channels_last"])
    os.makedirs(cfg["ckpt_dir"], exist_ok=True)
    log = Logger(os.path.join(cfg["ckpt_dir"], "train.log"))
    command = "python weights/recipe/train.py " + " ".join(shlex.quote(a) for a in
                                                           (sys.argv[1:] if argv is None else argv))
    log(f"command: {command}")
    log("configuration: " + json.dumps(cfg, sort_keys=True))
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    model, data, teacher, fwd = train_phases.build(cfg, log)
    dev, timed = cfg["device"], cfg["time_budget"] > 0

    steps = data.steps_per_epoch(cfg["batch"])
    if cfg["max_steps"]:
        steps = min(steps, cfg["max_steps"])
    ck_path = os.path.join(cfg["ckpt_dir"], "last.pt")
    best_path = os.path.join(cfg["ckpt_dir"], "best.pt")
    state, resume = train_phases.load_checkpoint(ck_path, cfg, model, steps, log)
    if resume is None and cfg["partial"]:
        state, resume = resume_partial(cfg, model, log) or (state, resume)
    trained_here, stopped = 0, False
    n_sel = train_export.select_count(cfg, len(data.y_val))
    if cfg["select_images"] and n_sel >= len(data.y_val):
        raise fail(f"--select-images {n_sel}: the validation split holds {len(data.y_val)} "
                   "images; leave some for the comparison")
    if cfg["select_by"] and cfg["init"] and resume is None:  # the point training must beat
        val = predict(model, data.x_val[:n_sel], device=dev)
        start = operating_point([l.numpy() for l in val], data.y_val[:n_sel].numpy(),
                                cfg["select_by"])
        state["init_point"] = {k: start[k] for k in ("acc", "edge")}
        log(f"--init {cfg['init']}: {cfg['select_by']}: {start['acc']:.2f} % with "
            f"{start['edge']:.2f} % exits on validation")
    averager = None  # --swa-every: the running mean, saved with every checkpoint
    if cfg["swa_every"]:
        averager = weight_average.Averager(model, cfg["swa_start"], cfg["swa_every"])
        if resume is not None and "swa" in resume:
            averager.load_state_dict(resume["swa"])

    def swa_state() -> dict:
        return {} if averager is None else {"swa": averager.state_dict()}

    for p, (pname, epochs, weights, frozen, seconds) in enumerate(train_phases.plan_phases(cfg)):
        if p < state["phase"]:
            continue
        if epochs == 0:  # separate with --epochs 0: the --init hybrid's convs stay as they are
            state.setdefault("phase_epochs", {})[pname] = 0
            state["phase"], state["epoch"] = p + 1, 0
            log(f"phase {pname}: skipped (--epochs 0)")
            continue
        opt, sched = train_phases.optimizer_for(model, cfg, frozen, epochs, steps, seconds)
        gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + p)
        if resume is not None and state["phase"] == p and "opt" in resume:
            opt.load_state_dict(resume["opt"])
            if "sched" in resume:
                sched.load_state_dict(resume["sched"])
            else:
                fast_forward(sched, state["epoch"] * steps)
            gen.set_state(resume["gen"])
        elif resume is not None and resume.get("partial") and state["phase"] == p:
            fast_forward(sched, state["epoch"] * steps)
        # Graphs need every output in the loss (an unused output would feed the captured
        # backward a stale gradient): joint training, or phase 1 of separate without exits.
        used = [w > 0 for w in weights]
        if cfg["cuda_graphs"] and dev == "cuda" and not frozen and all(used) \
                and len(data.x_train) >= cfg["batch"]:
            # The teacher stays an ordinary module: a hand-captured graph of its inference
            # forward replayed wrong logits (then NaN) on an H200 while the ordinary call was
            # exact; ungraphed it adds ~10 % to a graphed step.
            model = train_phases.graph_model(model, cfg["batch"], log)
        after_step = None
        if averager is not None:  # one phase: joint (resolve refuses the others)
            def after_step():  # a step schedule's last_epoch counts the steps done (resumed too)
                averager.after_step(model, sched.progress() if timed
                                    else sched.last_epoch / (epochs * steps))

        def checkpoint():  # resumable state after a completed (or just validated) epoch
            atomic_save({"cfg": cfg, "model": model.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "gen": gen.get_state(), "state": state,
                         **swa_state()}, ck_path)

        log(f"phase {pname}: " + (f"{seconds:.0f} s budget" if timed else f"{epochs} epochs")
            + f" x {steps} steps, loss weights {weights}")
        for epoch in range(state["epoch"] if state["phase"] == p else 0, epochs):
            if cfg["partial"]:  # the data order of an epoch does not depend on where a run resumed
                gen = partial_state.epoch_generator(cfg["seed"], p, epoch)
            loss, secs, nsteps = train_phases.train_epoch(
                model, data, opt, sched, cfg, gen, weights, log, epoch, epochs, frozen, teacher,
                fwd, after_step)
            if nsteps == 0:  # the budget ran out exactly at an epoch boundary
                prev = state["history"][-1] if state["history"] else None
                if prev is not None and prev["phase"] == pname and "val_acc" not in prev:
                    # the epoch before was the last one after all: validate it as such
                    msg = train_export.validate_epoch(model, data, cfg, state, prev, best_path)
                    log(f"phase {pname} epoch {prev['epoch']}: the budget ran out at its end"
                        + msg)
                    checkpoint()
                break
            last = epoch + 1 == epochs or (timed and sched.done())
            t1 = time.time()
            entry = {"phase": pname, "epoch": epoch + 1, "steps": nsteps, "loss": round(loss, 5),
                     "seconds": round(secs, 1)}
            msg = ""
            if last or (epoch + 1) % max(1, cfg["eval_every"]) == 0:
                msg = train_export.validate_epoch(model, data, cfg, state, entry, best_path)
            state["wall"] += secs + (time.time() - t1)
            state["epoch"] = epoch + 1
            state["phase"] = p
            state["history"].append(entry)
            log(f"phase {pname} epoch {epoch + 1}/{'?' if timed else epochs} done in {secs:.1f}s: "
                f"loss {loss:.4f}{msg}; total {state['wall']:.0f}s")
            checkpoint()
            trained_here += 1
            if cfg["partial"]:
                partial_state.save(
                    cfg["partial"], cfg, RESUME_KEYS, state, sched.get_last_lr()[0],
                    lambda path: train_export.validate_and_export(
                        model, data, {**cfg, "out": path}, state, command, log,
                        extra={"partial": {"phase": pname, "epoch": epoch + 1, "of": epochs}}))
                log(f"partial state written to {cfg['partial']}")
            if last:
                break
            if cfg["stop_after"] and trained_here >= cfg["stop_after"]:
                stopped = True
                break
        if stopped:
            break
        state.setdefault("phase_epochs", {})[pname] = state["epoch"]
        state["phase"], state["epoch"] = p + 1, 0
        resume = None
        atomic_save({"cfg": cfg, "model": model.state_dict(), "state": state, **swa_state()},
                    ck_path)

    if stopped:
        log(f"--stop-after {cfg['stop_after']}: stopping after phase {state['phase']} epoch "
            f"{state['epoch']}; rerun the same command to continue")
        return 0
    train_export.validate_and_export(model, data, cfg, state, command, log)
    if cfg["partial"]:
        partial_state.remove(cfg["partial"], cfg["out"])
    if cfg["select_by"] and state.get("best"):
        kept = torch.load(best_path, map_location="cpu", weights_only=False)
        model.load_state_dict(kept["model"])
        best = kept["best"]
        log(f"--select-by {cfg['select_by']}: phase {best['phase']} epoch {best['epoch']} "
            f"({best['acc']:.2f} % with {best['edge']:.2f} % exits on validation)")
        train_export.validate_and_export(model, data, {**cfg, "out": cfg["select_out"]}, state,
                                         command, log, selected=best)
    if averager is not None:
        train_export.export_average(averager, data, cfg, state, command, log)
    return 0


def run(argv: Optional[List[str]] = None) -> int:
    """:func:`main` behind the command's error boundary: a bad option or input file ends it
    with its ``error:`` line on stderr and exit status 2; other exceptions keep their
    traceback."""
    try:
        return main(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str) and exc.code.startswith("error:"):
            print(exc.code, file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(run())
