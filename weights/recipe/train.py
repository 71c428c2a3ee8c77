#!/usr/bin/env python
"""Train a conditionally deep hybrid ResNet on CIFAR-10 and export it in the xnorcdl format.

One command, the configuration as arguments (printed, resolved, at start)::

    python weights/recipe/train.py --depth 32 --edge-convs 20 --edge-bits 1 --exits 20 \
        --exit-weights 0.6 --epochs 30 --seed 0 --init weights/r32_fp.npz \
        --out weights/r32_20E.npz

The PyTorch model (:mod:`qat_resnet`) mirrors docs/FORMAT.md operation by operation; quantized
layers train XNOR-Net style on real-valued latent weights with a straight-through estimator.
The recipe's other modules, beside this file: :mod:`cifar_batches` (split and augmentation),
:mod:`lr_schedule`, :mod:`val_scoring` (validation logits, Algorithm 1, thresholds) and
:mod:`run_records` (log, checkpoints, provenance).

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
head logits of a frozen model, typically the full-precision ResNet; see :func:`distill_loss`.
It changes the loss only, never the exported model's semantics. Distillation at T = 4 makes the
binary hybrid diverge within a few dozen steps at lr 0.1 (logits grow without bound, then NaN);
``--clip-grad N`` clips the global gradient norm (N = 5 keeps it stable; the plain
cross-entropy gradient norm is about 3 at the start).

``--cuda-graphs 1`` (CUDA, joint training) captures the training forward and backward once and
replays them (:func:`graph_model`); same kernels, fewer launches. ``--compile 1`` runs the
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

``--cloud-only`` (with ``--init``) trains only the layers after the last early exit, the cloud
convs and the head, on the head's loss; the stem, the convs up to the last exit (BN in inference
mode) and the exits keep the --init file's arrays, so every exit decision of Algorithm 1 stays
as it was and only the samples that reach the cloud can change their prediction.
``--cloud-focus T:W`` weighs the head loss of the samples an exit would take at entropy threshold
T by W (:func:`focus_weights`): the cloud is trained on the mix it will see at deployment.

``--hint W`` (with ``--teacher``, joint) adds W times a feature hint to eq. (5): the pooled
block output each early exit reads learns the teacher's pooled output of the same block through
a training-only 1x1 adapter (:mod:`feature_hint`, FitNets on the exit's input; the adapter is
fitted by least squares first and never exported).

``--swa-every N`` averages the weights of every N-th step once ``--swa-start`` of the run is
spent (stochastic weight averaging, :mod:`weight_average`; ``--sched constant`` gives the flat
rate it is meant to sample), recomputes the BN statistics for the mean over augmented training
batches and exports it to ``<out>_swa.npz`` beside ``--out``.

Initialisation from an .npz (``--init``): arrays are copied by name where the layer has the same
role in both files (:func:`qat_resnet.init_from`: edge BNs without a counterpart start as the
identity, latent weights from the full-precision conv weights, missing exits at random).

Checkpoints are written atomically after every epoch to ``--ckpt-dir`` (default
``$XDG_CACHE_HOME/xnorcdl/runs/<name of --out>``), with the log file ``train.log``; rerunning the
same command resumes from the last completed epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the recipe's own modules

from xnorcdl import calibrate as xcal  # noqa: E402
from xnorcdl.spec import ExitSpec, ModelSpec  # noqa: E402

from cifar_batches import VAL_SIZE, Data  # noqa: E402
from epoch_select import better, default_out, operating_point  # noqa: E402
from lr_schedule import TimeSched, make_sched  # noqa: E402
from feature_hint import Hints, fit_least_squares  # noqa: E402
from qat_resnet import (CHANNELS_LAST, HybridResNet, QuanConv, export, init_from,  # noqa: E402
                        model_from_file, named_tensors)
from run_records import Logger, atomic_save, init_record, machine, teacher_record  # noqa: E402
from val_scoring import calibrate_fast, conditional, entropy_tensor, predict  # noqa: E402
import partial_state  # noqa: E402
import weight_average  # noqa: E402


# ============================================================================ training

def distill_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: Optional[torch.Tensor],
                 alpha: float, temp: float,
                 sample_w: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Loss of one output (an early exit or the head).

    Without a teacher: eq. (4), the cross-entropy L = CE(y_hat, y). With a teacher's logits t
    (``--teacher``, knowledge distillation, Hinton et al. 2015):
    L = (1 - alpha) * CE(y_hat, y) + alpha * T^2 * KL(softmax(t / T) || softmax(y_hat / T)),
    Hinton's T^2 keeps the soft term's gradient T * (q_student - q_teacher) on the scale of the
    hard term's when logit gaps are small against T; with large gaps it is up to T times
    larger, which is why distilling a binary hybrid needs ``--clip-grad``.
    Every output (exits and head) learns from the same teacher logits; eq. (5) then weighs
    the outputs' losses as before.

    ``sample_w`` (``--cloud-focus``): per-sample weights w_i; the batch mean becomes the weighted
    mean sum_i w_i L_i / sum_i w_i of the per-sample losses L_i (all ones: the plain mean).
    """
    weighted = sample_w is not None
    loss = F.cross_entropy(logits, labels, reduction="none" if weighted else "mean")
    if teacher is not None and alpha != 0.0:
        soft = F.kl_div(F.log_softmax(logits / temp, dim=1), F.log_softmax(teacher / temp, dim=1),
                        reduction="none" if weighted else "batchmean", log_target=True)
        loss = (1.0 - alpha) * loss + alpha * temp * temp * (soft.sum(1) if weighted else soft)
    return (loss * sample_w).sum() / sample_w.sum() if weighted else loss


def focus_weights(early: List[torch.Tensor], threshold: float, easy_weight: float) -> torch.Tensor:
    """Per-sample weights of the head loss under ``--cloud-focus T:W``: W for a sample some early
    exit would take at threshold T (Algorithm 1: softmax entropy < T nats), 1 for the samples
    that reach the cloud. At deployment the cloud sees only the latter; W < 1 spends the cloud's
    capacity on them."""
    easy = torch.stack([entropy_tensor(l.detach()) < threshold for l in early]).any(0)
    one = torch.ones(easy.shape, dtype=torch.float64, device=easy.device)
    return torch.where(easy, one * easy_weight, one)


def load_teacher(path: str, n_classes: int, device) -> HybridResNet:
    """The model of a weights file, frozen, in inference mode (BN uses running statistics)."""
    teacher = model_from_file(path)
    if teacher.spec.num_classes != n_classes:
        raise SystemExit(f"error: --teacher {path}: {teacher.spec.num_classes} classes, "
                         f"the student has {n_classes}")
    teacher.eval()
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    return teacher.to(device)


def param_groups(model: HybridResNet, wd: float, wd_latent: float):
    """Parameter groups: float conv and linear weights decay by ``wd``, the latent weights of
    quantized convs by ``wd_latent``, BN parameters and biases not at all."""
    decay, latent, none = [], [], []
    for m in model.modules():
        if isinstance(m, QuanConv):
            latent.append(m.weight)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            decay.append(m.weight)
    seen = {id(p) for p in decay + latent}
    none = [p for p in model.parameters() if id(p) not in seen]
    return [{"params": decay, "weight_decay": wd}, {"params": latent, "weight_decay": wd_latent},
            {"params": none, "weight_decay": 0.0}]


def graph_model(model: HybridResNet, batch: int, log=print) -> HybridResNet:
    """Capture the training forward and backward of ``model`` (train mode, a batch of ``batch``
    images, all outputs) as CUDA graphs (torch.cuda.make_graphed_callables): one replay
    instead of some hundreds of kernel launches each way, which is what bounds a ResNet-32 step
    on a large GPU. Same kernels, same math; eval mode keeps the ordinary forward. The capture's
    warm-up passes (on zero images) must not leave traces in the BN running statistics, so
    those are restored afterwards."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    sample = torch.zeros(batch, 3, 32, 32, dtype=torch.uint8, device="cuda")
    t0 = time.time()
    graphed = torch.cuda.make_graphed_callables(model, (sample,))
    with torch.no_grad():
        for k, v in graphed.state_dict().items():
            v.copy_(saved[k])
    log(f"CUDA graphs captured for batch {batch} in {time.time() - t0:.1f}s")
    return graphed


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = ap.add_argument
    a("--depth", type=int, default=32, help="6n+2")
    a("--edge-convs", type=int, default=0, help="M, quantized block convs at the edge (even)")
    a("--edge-bits", type=int, default=1, choices=(1, 2, 4))
    a("--exits", default="", help="comma-separated after_conv of the early exits, e.g. 20")
    a("--exit-weights", default="", help="lambda_k of eq. (5) per early exit; the head gets 1 - sum")
    a("--shortcut", default="zero_pad", choices=("zero_pad", "conv1x1"))
    a("--strategy", default="joint", choices=("joint", "separate"))
    a("--epochs", type=int, default=0, help="epochs (phase 1 of separate); or use --time-budget")
    a("--time-budget", type=float, default=0.0,
      help="seconds of training instead of --epochs: the learning rate follows the wall clock "
           "(separate: --exit-budget-frac of it trains the exits)")
    a("--exit-budget-frac", type=float, default=0.2, help="separate with --time-budget")
    a("--exit-epochs", type=int, default=0, help="separate: epochs for the exits (0: max(1, epochs // 4))")
    a("--batch", type=int, default=128)
    a("--lr", type=float, default=0.1, help="peak learning rate")
    a("--sched", default="onecycle", choices=("onecycle", "cosine", "constant"))
    a("--warmup", type=float, default=0.15, help="fraction of steps warming up")
    a("--wd", type=float, default=5e-4, help="weight decay on float conv and linear weights")
    a("--wd-latent", type=float, default=0.0, help="weight decay on latent quantized weights")
    a("--optimizer", default="sgd", choices=("sgd", "adam"),
      help="sgd: momentum 0.9, Nesterov; adam: betas 0.9, 0.999 (binary networks often train "
           "better with it; its peak --lr is ~100x smaller)")
    a("--clip-grad", type=float, default=0.0, help="clip the global gradient norm to N (0: off)")
    a("--seed", type=int, default=0)
    a("--init", default=None, help="weights file to start from")
    a("--teacher", default=None,
      help="weights file whose head logits every output also learns from (distillation)")
    a("--kd-weight", type=float, default=0.9, help="alpha: weight of the teacher term (--teacher)")
    a("--kd-temp", type=float, default=4.0, help="T: softmax temperature of the teacher term")
    a("--hint", type=float, default=0.0, metavar="W",
      help="weight of the feature hint (feature_hint): the pooled block output each early "
           "exit reads learns the teacher's (through a training-only 1x1 adapter); needs "
           "--teacher, joint")
    a("--hint-images", type=int, default=2048,
      help="--hint: training images (unaugmented) the adapters are first fitted on")
    a("--out", required=True, help="weights file to write")
    a("--ckpt-dir", default=None, help="checkpoints and log (default: cache runs/<out name>)")
    a("--partial", default=None, metavar="DIR",
      help="after every epoch write the model and the schedule state to DIR/<out name>.npz "
           "and .json, and resume from them when no checkpoint is newer (partial_state); "
           "removed once --out is written")
    a("--stop-after", type=int, default=0, metavar="N",
      help="end this invocation after N completed epochs (checkpoint and --partial written); "
           "rerun the same command to continue (0: run to the end)")
    a("--val-size", type=int, default=VAL_SIZE, help="last images of the train split held out")
    a("--threshold-rule", default="within:0.5",
      help="within:D (points), exits:P (%% leaving), accuracy:A (%%) or fixed:T (nats); "
           "xnorcdl.calibrate")
    a("--limit-train", type=int, default=None, help="use only the first N train images (smoke)")
    a("--limit-val", type=int, default=None, help="use only the first N validation images (smoke)")
    a("--max-steps", type=int, default=None, help="stop each epoch after N steps (smoke)")
    a("--synthetic", action="store_true", help="random images instead of CIFAR-10 (tests)")
    a("--threads", type=int, default=2)
    a("--channels-last", type=int, default=0, choices=(0, 1))
    a("--cuda-graphs", type=int, default=0, choices=(0, 1),
      help="replay the training forward/backward as CUDA graphs (cuda only)")
    a("--compile", type=int, default=0, choices=(0, 1),
      help="run the training forward/backward and the teacher through torch.compile")
    a("--device", default="cpu", choices=("cpu", "cuda"))
    a("--log-every", type=int, default=50)
    a("--eval-every", type=int, default=1, help="validate every N epochs (and after the last)")
    a("--select-by", default=None,
      help="also export the validated epoch with the best operating point under this rule "
           "(accuracy:A or within:D: most edge exits; exits:P: best accuracy); epoch_select")
    a("--select-out", default=None, help="file for --select-by (default: <out>_best.npz)")
    a("--select-images", type=int, default=None, metavar="N",
      help="score the epochs for --select-by on the first N validation images only, so the "
           "rest can compare and calibrate the chosen file without the choice's optimism "
           "(python -m xnorcdl.tradeoff --calib-range N:)")
    a("--swa-every", type=int, default=0, metavar="N",
      help="stochastic weight averaging (weight_average): average the weights of every N-th "
           "step after --swa-start, recompute the BN statistics for the mean and export it to "
           "<out>_swa.npz as well (0: off)")
    a("--swa-start", type=float, default=0.5, metavar="F",
      help="--swa-every: fraction of the run (steps, or the --time-budget) before averaging")
    a("--swa-bn-passes", type=int, default=1, metavar="E",
      help="--swa-every: passes of augmented training batches the averaged model's BN "
           "statistics are recomputed over")
    a("--uncropped", type=float, default=0.0, metavar="F",
      help="probability that a training sample is taken whole (central offset, no zero border; "
           "still flipped at random) instead of a random crop of the 4-padded image")
    a("--cloud-only", action="store_true",
      help="train only the layers after the last early exit (cloud convs, head) on the head "
           "loss; the stem, the convs up to the last exit (BN in inference mode) and the exits "
           "stay as in --init, so no exit decision changes")
    a("--cloud-focus", default=None, metavar="T:W",
      help="with --cloud-only: the head loss of samples an early exit would take at entropy "
           "threshold T (nats) weighs W, the others 1 (focus_weights)")
    return ap


def resolve(args) -> dict:
    exits = [int(s) for s in args.exits.split(",") if s.strip()]
    weights = [float(s) for s in args.exit_weights.split(",") if s.strip()]
    if len(weights) == 1 and len(exits) > 1:
        weights = weights * len(exits)
    if len(weights) != len(exits):
        raise SystemExit(f"error: {len(weights)} exit weight(s) for {len(exits)} exit(s)")
    try:
        xcal.parse_rule(args.threshold_rule)
    except ValueError as exc:
        raise SystemExit(f"error: --threshold-rule: {exc}")
    if args.select_by is not None:
        try:
            xcal.parse_rule(args.select_by)
        except ValueError as exc:
            raise SystemExit(f"error: --select-by: {exc}")
        if not exits:
            raise SystemExit("error: --select-by scores the early exits' operating point: "
                             "give --exits")
        if args.select_images is not None and args.select_images < 1:
            raise SystemExit("error: --select-images must be a positive number of images")
        if args.select_out and os.path.abspath(args.select_out) == os.path.abspath(args.out):
            raise SystemExit("error: --select-out must differ from --out (the last epoch)")
    if sum(weights) >= 1.0:
        raise SystemExit("error: the early-exit weights must sum to < 1 (the head gets the rest)")
    if args.select_images is not None and args.select_by is None:
        raise SystemExit("error: --select-images limits the images --select-by scores: give "
                         "--select-by")
    focus = None
    if args.cloud_only and not (args.init and exits and args.strategy == "joint"):
        raise SystemExit("error: --cloud-only trains the cloud of an existing hybrid behind its "
                         "early exits: give --init FILE and --exits (strategy joint)")
    if args.cloud_focus is not None:
        if not args.cloud_only:
            raise SystemExit("error: --cloud-focus weighs the head loss of --cloud-only")
        try:
            focus = [float(v) for v in args.cloud_focus.split(":")]
        except ValueError:
            focus = []
        if len(focus) != 2 or not (focus[0] > 0 and focus[1] >= 0):
            raise SystemExit(f"error: --cloud-focus: expected T:W with T > 0 (nats) and W >= 0, "
                             f"got {args.cloud_focus!r}")
    spec = ModelSpec(depth=args.depth, edge_convs=args.edge_convs, edge_bits=args.edge_bits,
                     shortcut=args.shortcut,
                     exits=tuple(ExitSpec(a, 0.0) for a in exits))
    try:
        spec.validate()
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    ckpt = args.ckpt_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "xnorcdl", "runs", os.path.splitext(os.path.basename(args.out))[0])
    exits_only = (args.strategy == "separate" and args.epochs == 0 and args.time_budget == 0
                  and args.exit_epochs > 0)
    if exits_only and not (args.init and exits):
        raise SystemExit("error: --strategy separate --epochs 0 trains only the exits of an "
                         "existing hybrid: give it as --init FILE, and --exits")
    if not exits_only and (args.epochs > 0) == (args.time_budget > 0):
        raise SystemExit("error: give exactly one of --epochs N (> 0) and --time-budget SECONDS "
                         "(or, separate, --epochs 0 --exit-epochs N with --init)")
    if args.teacher is not None and not (0.0 <= args.kd_weight <= 1.0 and args.kd_temp > 0):
        raise SystemExit("error: --kd-weight must lie in [0, 1] and --kd-temp be > 0")
    if args.hint < 0 or args.hint_images < 1:
        raise SystemExit("error: --hint must be >= 0 and --hint-images >= 1")
    if args.hint and not (args.teacher and exits and args.strategy == "joint"
                          and not args.cloud_only):
        raise SystemExit("error: --hint compares the early exits' features with a teacher's: "
                         "give --teacher and --exits (strategy joint, not --cloud-only)")
    if args.hint and args.cuda_graphs:
        raise SystemExit("error: --hint is not captured by --cuda-graphs; use --compile 1")
    if args.swa_every:
        if args.swa_every < 0 or not 0.0 <= args.swa_start < 1.0 or args.swa_bn_passes < 1:
            raise SystemExit("error: --swa-every must be >= 0, --swa-start lie in [0, 1) and "
                             "--swa-bn-passes be >= 1")
        if args.cloud_only or args.cuda_graphs or (args.strategy == "separate" and exits):
            raise SystemExit("error: --swa-every averages one joint phase of every parameter: "
                             "not with --cloud-only, --strategy separate or --cuda-graphs")
    if args.compile and args.cuda_graphs:
        raise SystemExit("error: --compile 1 and --cuda-graphs 1 are alternatives; give one")
    if not 0.0 <= args.uncropped <= 1.0:
        raise SystemExit("error: --uncropped must lie in [0, 1]")
    if args.stop_after < 0:
        raise SystemExit("error: --stop-after must be >= 0 epochs")
    if args.partial and (args.time_budget or args.swa_every or args.select_by):
        raise SystemExit("error: --partial resumes a step schedule by its epoch: not with "
                         "--time-budget, --swa-every or --select-by")
    if not 0.0 < args.exit_budget_frac < 1.0:
        raise SystemExit("error: --exit-budget-frac must lie strictly between 0 and 1")
    cfg = dict(vars(args))
    if args.teacher is None:  # nothing to weigh: keeps old checkpoints resumable
        cfg.update(kd_weight=None, kd_temp=None)
    if not args.uncropped:    # the default augmentation, as recorded before the option
        cfg.update(uncropped=None)
    cfg.update(exits=exits, exit_weights=weights, head_weight=1.0 - sum(weights), ckpt_dir=ckpt,
               cloud_focus=focus,
               select_out=(args.select_out or default_out(args.out)) if args.select_by else None,
               swa_out=default_out(args.out, "swa") if args.swa_every else None,
               exit_epochs=(args.exit_epochs or max(1, args.epochs // 4)
                            if args.strategy == "separate" and exits and not args.time_budget
                            else 0))
    return cfg


def train_epoch(model, data, opt, sched, cfg, gen, weights, log, epoch, total_epochs,
                frozen="", teacher=None, fwd=None, after_step=None):
    """One pass over the shuffled training images (fewer steps with --max-steps, or when a
    --time-budget runs out). Running loss and accuracy stay on the device between log lines, so
    a GPU is never made to wait for the host. ``fwd`` (default ``model``) is the callable that
    runs the training forward, e.g. ``torch.compile(model)`` (``model.edge_outputs`` when
    ``frozen`` is "edge"); ``teacher`` may be compiled too. ``frozen``: "" trains everything,
    "convs" only the exits (separate, phase 2), "edge" only what follows the last exit
    (``--cloud-only``). ``after_step()``, if given, runs after every optimizer step.
    Returns (mean loss, seconds, steps done)."""
    fwd = model if fwd is None else fwd
    model.train()
    if frozen == "convs":  # separate optimisation, phase 2: BN in inference mode, convs frozen
        model.eval()
    elif frozen == "edge":  # --cloud-only: the exit decisions' layers in inference mode
        for m in model.frozen_by_cloud_only():
            m.eval()
    focus = cfg.get("cloud_focus")
    steps = data.steps_per_epoch(cfg["batch"])
    if cfg["max_steps"]:
        steps = min(steps, cfg["max_steps"])
    timed = isinstance(sched, TimeSched)
    t0 = time.time()
    dev = cfg["device"]
    tot_loss = torch.zeros((), dtype=torch.float64, device=dev)
    tot_correct = torch.zeros(len(weights), dtype=torch.int64, device=dev)
    tot_hint = torch.zeros((), dtype=torch.float64, device=dev)
    hinted = bool(cfg.get("hint")) and not frozen
    seen = done = 0
    of = "?" if timed else str(total_epochs)
    trained = [q for g in opt.param_groups for q in g["params"] if q.requires_grad]
    uncropped = cfg.get("uncropped") or 0.0
    for step, (xb, yb) in enumerate(data.batches(cfg["batch"], gen, uncropped)):
        if step >= steps or (timed and sched.done()):
            break
        xb, yb = xb.to(dev), yb.to(dev)
        if frozen == "edge":  # fwd: the (compiled) model.edge_outputs
            with torch.no_grad():
                early, h = fwd(xb)
            logits = list(early) + [model.cloud_logits(h, max(model.exit_after) + 1)]
        elif frozen:
            with torch.no_grad():
                feats = model.features(model.prepare(xb), max(model.exit_after))
            logits = [model.exit_logits(k, feats[k]) for k in range(len(model.exits))]
        elif hinted:  # fwd, teacher: forward_tapped (logits, outputs of the exits' blocks)
            logits, s_feats = fwd(xb)
        else:
            logits = fwd(xb) if weights[-1] > 0 else fwd(xb, with_head=False)
        soft = None
        if teacher is not None:
            with torch.no_grad():
                t_out = teacher(xb)
            soft, t_feats = (t_out[0][-1], t_out[1]) if hinted else (t_out[-1], None)
        sw = None if focus is None else focus_weights(logits[:-1], focus[0], focus[1])
        loss = sum(w * distill_loss(l, yb, soft, cfg["kd_weight"], cfg["kd_temp"],
                                    sw if k == len(logits) - 1 else None)
                   for k, (w, l) in enumerate(zip(weights, logits)) if w > 0)
        if hinted:
            hint = model.hints.loss(s_feats, t_feats)
            loss = loss + cfg["hint"] * hint
            tot_hint += hint.detach().double() * len(yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["clip_grad"]:  # global norm, computed on the device (no host sync)
            torch.nn.utils.clip_grad_norm_(trained, cfg["clip_grad"], foreach=True)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        done += 1
        with torch.no_grad():
            tot_loss += loss.detach().double() * len(yb)
            for k, l in enumerate(logits):
                tot_correct[k] += (l.argmax(1) == yb).sum()
        seen += len(yb)
        if (step + 1) % cfg["log_every"] == 0 or step + 1 == steps:
            el = time.time() - t0
            acc = (tot_correct.double() / seen * 100).tolist()
            log(f"epoch {epoch + 1}/{of} step {step + 1}/{steps} loss {float(tot_loss) / seen:.4f} "
                f"train acc {' '.join(f'{a:.1f}' for a in acc)} "
                + (f"hint {float(tot_hint) / seen:.4f} " if hinted else "")
                + f"lr {sched.get_last_lr()[0]:.3g} {el / (step + 1):.3f}s/step "
                f"epoch eta {el / (step + 1) * (steps - step - 1):.0f}s")
    return float(tot_loss) / max(1, seen), time.time() - t0, done


def plan_phases(cfg: dict) -> list:
    """The training phases as (name, epochs, loss weights per output, frozen, seconds): one
    ``joint`` (or ``plain``, without exits) phase, ``cloud`` (``--cloud-only``: head loss only,
    frozen "edge"), or ``hybrid`` then ``exits`` (frozen "convs") for the separate strategy.
    With ``--time-budget`` the clock, not an epoch count, ends a phase."""
    n_early = len(cfg["exits"])
    budget, timed = cfg["time_budget"], cfg["time_budget"] > 0
    many = 10 ** 9
    if cfg.get("cloud_only"):
        return [("cloud", many if timed else cfg["epochs"], [0.0] * n_early + [1.0], "edge",
                 budget)]
    if cfg["strategy"] == "joint" or not n_early:
        return [("joint" if n_early else "plain", many if timed else cfg["epochs"],
                 cfg["exit_weights"] + [cfg["head_weight"]], "", budget)]
    frac = cfg["exit_budget_frac"]
    return [("hybrid", many if timed else cfg["epochs"], [0.0] * n_early + [1.0], "",
             budget * (1 - frac)),
            ("exits", many if timed else cfg["exit_epochs"], [1.0] * n_early + [0.0], "convs",
             budget * frac)]


#: configuration keys a checkpoint must share with the command that resumes it
RESUME_KEYS = ("depth", "edge_convs", "edge_bits", "exits", "exit_weights", "strategy",
               "batch", "lr", "sched", "seed", "init", "limit_train", "val_size", "shortcut",
               "time_budget", "teacher", "kd_weight", "kd_temp", "clip_grad", "optimizer",
               "select_by", "cloud_only", "cloud_focus", "select_images", "hint", "hint_images",
               "swa_every", "swa_start", "uncropped")


def load_checkpoint(ck_path: str, cfg: dict, model: HybridResNet, steps: int, log):
    """(state, checkpoint or None): the run's progress, restored into ``model`` from ``ck_path``
    when it exists and was made with the same configuration. Only ``--epochs`` may change (before
    the last phase ends): the step schedule is then re-planned from the completed steps."""
    state = {"phase": 0, "epoch": 0, "wall": 0.0, "history": []}
    if not os.path.exists(ck_path):
        return state, None
    resume = torch.load(ck_path, map_location="cpu", weights_only=False)
    old = {"clip_grad": 0.0, "optimizer": "sgd", "cloud_only": False,  # older checkpoints
           "hint": 0.0, "hint_images": 2048, "swa_every": 0, "swa_start": 0.5,
           **resume["cfg"]}
    diff = {k: (old.get(k), cfg[k]) for k in RESUME_KEYS if old.get(k) != cfg[k]}
    if diff:
        raise SystemExit(f"error: {ck_path} was made with another configuration {diff}; "
                         "use another --ckpt-dir or delete it")
    model.load_state_dict(resume["model"])
    state = resume["state"]
    if resume["cfg"]["epochs"] != cfg["epochs"]:
        if state["phase"] > 0 or state["epoch"] > cfg["epochs"]:
            raise SystemExit(f"error: {ck_path}: cannot change --epochs to {cfg['epochs']} "
                             f"after epoch {state['epoch']} of phase {state['phase']}")
        state.setdefault("schedule_changes", []).append(
            {"after_epoch": state["epoch"], "from_epochs": resume["cfg"]["epochs"],
             "to_epochs": cfg["epochs"]})
        resume.pop("sched", None)
        log(f"--epochs changed from {resume['cfg']['epochs']} to {cfg['epochs']} after epoch "
            f"{state['epoch']}: the schedule continues from step {state['epoch'] * steps} "
            f"of {cfg['epochs'] * steps}")
    log(f"resuming from {ck_path}: phase {state['phase']} epoch {state['epoch']}, "
        f"{state['wall']:.0f}s already spent")
    return state, resume


def build(cfg: dict, log):
    """(model, data, teacher, training forward) on ``cfg['device']``."""
    spec = ModelSpec(depth=cfg["depth"], edge_convs=cfg["edge_convs"], edge_bits=cfg["edge_bits"],
                     shortcut=cfg["shortcut"], exits=tuple(ExitSpec(a, 0.0) for a in cfg["exits"]))
    model = HybridResNet(spec)
    if cfg["init"]:
        init_from(model, cfg["init"], log)
    dev = cfg["device"]
    if dev == "cuda":
        # TF32 rounds conv inputs to 10 mantissa bits and accumulates in float32: the +-1 (and
        # 2/4-bit) codes of quantized convs are exact in TF32, float convs see rounding noise.
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
    model.to(dev)
    if CHANNELS_LAST[0]:
        model.to(memory_format=torch.channels_last)
    data = Data(cfg["val_size"], cfg["limit_train"], cfg["limit_val"], cfg["synthetic"], cfg["seed"])
    data.to(dev)
    teacher = None
    if cfg["teacher"]:
        teacher = load_teacher(cfg["teacher"], spec.num_classes, dev)
        log(f"teacher: {cfg['teacher']} (alpha {cfg['kd_weight']}, T {cfg['kd_temp']})")
    # The training forward (--cloud-only: of the frozen part; --hint: with the exits' block
    # outputs, and the teacher's); validation and export use ``model`` itself.
    fwd = model.edge_outputs if cfg.get("cloud_only") else model
    if cfg["hint"]:
        taps = tuple(model.exit_after)
        attach_hints(model, teacher, data.x_train[:cfg["hint_images"]], cfg["batch"], log)
        student, frozen_teacher = model, teacher

        def fwd(pixels):
            return student.forward_tapped(pixels, taps)

        def teacher(pixels):
            return frozen_teacher.forward_tapped(pixels, taps)
    if cfg["compile"]:  # same parameters and buffers, compiled on the first call
        fwd = torch.compile(fwd)
        teacher = None if teacher is None else torch.compile(teacher)
    log(f"data: {data.source}; {len(data.x_train)} train, {len(data.x_val)} validation images")
    return model, data, teacher, fwd


def attach_hints(model: HybridResNet, teacher: HybridResNet, images: torch.Tensor, batch: int,
                 log) -> None:
    """``--hint``: give ``model`` its training-only adapters (``model.hints``, not exported),
    fitted by least squares on ``images`` (both networks in inference mode)."""
    spec, tspec = model.spec, teacher.spec
    for b in model.exit_after:
        if b >= tspec.num_blocks or (tspec.block_output_shape(b)[1:]
                                     != spec.block_output_shape(b)[1:]):
            raise SystemExit(f"error: --hint: the teacher has no block {b} with the student's "
                             f"{spec.block_output_shape(b)} output (depth {tspec.depth} vs "
                             f"{spec.depth})")
    model.hints = Hints([spec.block_output_shape(b)[0] for b in model.exit_after],
                        [tspec.block_output_shape(b)[0] for b in model.exit_after])
    model.hints.to(images.device)
    was = model.training
    model.eval()
    s_parts, t_parts = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            s_parts.append(model.forward_tapped(images[i:i + batch], model.exit_after)[1])
            t_parts.append(teacher.forward_tapped(images[i:i + batch], model.exit_after)[1])
    model.train(was)
    cat = lambda parts: [torch.cat(p) for p in zip(*parts)]  # noqa: E731
    errors = fit_least_squares(model.hints, cat(s_parts), cat(t_parts))
    log(f"--hint: adapters fitted on {len(images)} training images, relative error left "
        + " ".join(f"{e:.4f}" for e in errors))


def optimizer_for(model: HybridResNet, cfg: dict, frozen: str, epochs: int, steps: int,
                  seconds: float):
    """(optimizer, schedule) of one phase: every parameter, only the exits when the convs are
    ``frozen`` ("convs", phase 2 of the separate strategy), or only what follows the last exit
    ("edge", ``--cloud-only``)."""
    for prm in model.parameters():
        prm.requires_grad_(frozen != "convs")
    if frozen == "edge":
        for m in model.frozen_by_cloud_only():
            for prm in m.parameters():
                prm.requires_grad_(False)
        groups = [{**g, "params": [q for q in g["params"] if q.requires_grad]}
                  for g in param_groups(model, cfg["wd"], cfg["wd_latent"])]
    elif frozen == "convs":
        for e in model.exits:
            for prm in e.parameters():
                prm.requires_grad_(True)
        groups = [{"params": [e.weight for e in model.exits], "weight_decay": cfg["wd"]},
                  {"params": [e.bias for e in model.exits], "weight_decay": 0.0}]
    else:
        groups = param_groups(model, cfg["wd"], cfg["wd_latent"])
    if cfg["optimizer"] == "adam":
        opt = torch.optim.Adam(groups, lr=cfg["lr"], betas=(0.9, 0.999))
    else:
        opt = torch.optim.SGD(groups, lr=cfg["lr"], momentum=0.9, nesterov=True)
    if cfg["time_budget"] > 0:
        return opt, TimeSched(opt, cfg["sched"], cfg["lr"], seconds, cfg["warmup"])
    return opt, make_sched(opt, cfg["sched"], cfg["lr"], epochs * steps, cfg["warmup"])


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


def validate_and_export(model: HybridResNet, data: Data, cfg: dict, state: dict, command: str,
                        log, selected: Optional[dict] = None,
                        extra: Optional[dict] = None) -> None:
    """Calibrate the exit thresholds on the validation split (``--threshold-rule``), record the
    validation figures and the run in the provenance, and write ``--out``. ``selected``: the
    model is the epoch ``--select-by`` chose, recorded as such (the history stays the run's);
    ``extra``: further provenance entries (``swa``)."""
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
    log(f"validation ({validation_scope(cfg, len(yv))}): " + json.dumps(figures))
    done = list(state.get("phase_epochs", {}).values()) or [cfg["epochs"], cfg["exit_epochs"]]
    prov = {"command": command, "strategy": cfg["strategy"], "epochs": done[0],
            "exit_epochs": done[1] if len(done) > 1 else cfg["exit_epochs"],
            "time_budget_s": cfg["time_budget"] or None,
            "steps": sum(h.get("steps", 0) for h in state["history"]),
            "batch": cfg["batch"], "lr": cfg["lr"], "exit_weights": cfg["exit_weights"],
            "clip_grad": cfg["clip_grad"] or None, "optimizer": cfg["optimizer"],
            "seed": cfg["seed"], **init_record(cfg["init"]), **teacher_record(cfg),
            **({"cloud_only": {"focus": cfg["cloud_focus"]}} if cfg.get("cloud_only") else {}),
            **({"hint": {"weight": cfg["hint"], "blocks": list(model.exit_after),
                         "fit_images": cfg["hint_images"]}} if cfg.get("hint") else {}),
            "data": data.source,
            "wall_time_s": round(state["wall"], 1), "machine": machine(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "validation": figures, "history": state["history"],
            **({"selected": {"by": selected["rule"], "phase": selected["phase"],
                             "epoch": selected["epoch"], "val_acc": selected["acc"],
                             "val_edge": selected["edge"],
                             "val_images": select_count(cfg, len(yv)),
                             "init_point": state.get("init_point")}} if selected else {}),
            "schedule_changes": state.get("schedule_changes", []), **(extra or {})}
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out"])), exist_ok=True)
    export(model, cfg["out"], thresholds, prov)
    log(f"wrote {cfg['out']}")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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
    model, data, teacher, fwd = build(cfg, log)
    dev, timed = cfg["device"], cfg["time_budget"] > 0

    steps = data.steps_per_epoch(cfg["batch"])
    if cfg["max_steps"]:
        steps = min(steps, cfg["max_steps"])
    ck_path = os.path.join(cfg["ckpt_dir"], "last.pt")
    best_path = os.path.join(cfg["ckpt_dir"], "best.pt")
    state, resume = load_checkpoint(ck_path, cfg, model, steps, log)
    if resume is None and cfg["partial"]:
        record = partial_state.load(cfg["partial"], cfg, RESUME_KEYS, named_tensors(model))
        if record is not None:
            state, resume = record["state"], {"partial": True}
            if record["epochs"] != cfg["epochs"]:
                if state["phase"] > 0 or state["epoch"] > cfg["epochs"]:
                    raise SystemExit(f"error: --partial {cfg['partial']}: cannot change --epochs "
                                     f"to {cfg['epochs']} after epoch {state['epoch']} of phase "
                                     f"{state['phase']}")
                state.setdefault("schedule_changes", []).append(
                    {"after_epoch": state["epoch"], "from_epochs": record["epochs"],
                     "to_epochs": cfg["epochs"]})
            log(f"resuming from --partial {cfg['partial']}: phase {state['phase']} epoch "
                f"{state['epoch']}, {state['wall']:.0f}s already spent (momentum restarts)")
    trained_here, stopped = 0, False
    n_sel = select_count(cfg, len(data.y_val))
    if cfg["select_images"] and n_sel >= len(data.y_val):
        raise SystemExit(f"error: --select-images {n_sel}: the validation split holds "
                         f"{len(data.y_val)} images; leave some for the comparison")
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

    for p, (pname, epochs, weights, frozen, seconds) in enumerate(plan_phases(cfg)):
        if p < state["phase"]:
            continue
        if epochs == 0:  # separate with --epochs 0: the --init hybrid's convs stay as they are
            state.setdefault("phase_epochs", {})[pname] = 0
            state["phase"], state["epoch"] = p + 1, 0
            log(f"phase {pname}: skipped (--epochs 0)")
            continue
        opt, sched = optimizer_for(model, cfg, frozen, epochs, steps, seconds)
        gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + p)
        if resume is not None and state["phase"] == p and "opt" in resume:
            opt.load_state_dict(resume["opt"])
            if "sched" in resume:
                sched.load_state_dict(resume["sched"])
            else:
                for _ in range(state["epoch"] * steps):
                    sched.step()
            gen.set_state(resume["gen"])
        elif resume is not None and resume.get("partial") and state["phase"] == p:
            for _ in range(state["epoch"] * steps):
                sched.step()
        # Graphs need every output in the loss (an unused output would feed the captured
        # backward a stale gradient): joint training, or phase 1 of separate without exits.
        used = [w > 0 for w in weights]
        if cfg["cuda_graphs"] and dev == "cuda" and not frozen and all(used) \
                and len(data.x_train) >= cfg["batch"]:
            # The teacher stays an ordinary module: a hand-captured graph of its inference
            # forward replayed wrong logits (then NaN) on an H200 while the ordinary call was
            # exact; ungraphed it adds ~10 % to a graphed step.
            model = graph_model(model, cfg["batch"], log)
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
            loss, secs, nsteps = train_epoch(model, data, opt, sched, cfg, gen, weights, log,
                                             epoch, epochs, frozen, teacher, fwd, after_step)
            if nsteps == 0:  # the budget ran out exactly at an epoch boundary
                prev = state["history"][-1] if state["history"] else None
                if prev is not None and prev["phase"] == pname and "val_acc" not in prev:
                    # the epoch before was the last one after all: validate it as such
                    msg = validate_epoch(model, data, cfg, state, prev, best_path)
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
                msg = validate_epoch(model, data, cfg, state, entry, best_path)
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
                    lambda path: validate_and_export(
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
    validate_and_export(model, data, cfg, state, command, log)
    if cfg["partial"]:
        partial_state.remove(cfg["partial"], cfg["out"])
    if cfg["select_by"] and state.get("best"):
        kept = torch.load(best_path, map_location="cpu", weights_only=False)
        model.load_state_dict(kept["model"])
        best = kept["best"]
        log(f"--select-by {cfg['select_by']}: phase {best['phase']} epoch {best['epoch']} "
            f"({best['acc']:.2f} % with {best['edge']:.2f} % exits on validation)")
        validate_and_export(model, data, {**cfg, "out": cfg["select_out"]}, state, command, log,
                            selected=best)
    if averager is not None:
        export_average(averager, data, cfg, state, command, log)
    return 0


def export_average(averager, data: Data, cfg: dict, state: dict, command: str, log) -> None:
    """``--swa-every``: the averaged weights, their BN statistics recomputed over
    ``--swa-bn-passes`` passes of augmented training batches, calibrated and written to
    ``<out>_swa.npz`` (:mod:`weight_average`)."""
    t0 = time.time()
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + 999)
    batches = (b for _ in range(cfg["swa_bn_passes"])
               for b in data.batches(cfg["batch"], gen, cfg.get("uncropped") or 0.0))
    model = averager.finish(batches)
    log(f"--swa-every {cfg['swa_every']}: {averager.snapshots} snapshots averaged, BN statistics "
        f"recomputed over {cfg['swa_bn_passes']} pass(es) in {time.time() - t0:.0f}s")
    validate_and_export(model, data, {**cfg, "out": cfg["swa_out"]}, state, command, log,
                        extra={"swa": {"every": cfg["swa_every"], "start": cfg["swa_start"],
                                       "snapshots": averager.snapshots,
                                       "bn_passes": cfg["swa_bn_passes"]}})


if __name__ == "__main__":
    sys.exit(main())
