"""The command line of ``train.py``: its options in groups, and the checks that turn them into
one resolved configuration (a dict, printed at the start of a run and saved with every
checkpoint).

Every bad combination ends the run before any work with one ``error:`` line naming the option
(``SystemExit``, exit status 2 through :func:`fail`).
"""
from __future__ import annotations

import argparse
import os

from xnorcdl import calibrate as xcal
from xnorcdl.spec import ExitSpec, ModelSpec

from cifar_batches import VAL_SIZE
from epoch_select import default_out

#: configuration keys a checkpoint or a partial state must share with the command resuming it
RESUME_KEYS = ("depth", "edge_convs", "edge_bits", "exits", "exit_weights", "strategy",
               "batch", "lr", "sched", "seed", "init", "limit_train", "val_size", "shortcut",
               "time_budget", "teacher", "kd_weight", "kd_temp", "clip_grad", "optimizer",
               "select_by", "select_images", "swa_every", "swa_start", "fit_ranges",
               "init_edge")

#: values of resume keys that checkpoints written before the key existed held implicitly
CHECKPOINT_DEFAULTS = {"clip_grad": 0.0, "optimizer": "sgd", "swa_every": 0, "swa_start": 0.5,
                       "fit_ranges": 0, "init_edge": None}


def fail(msg: str) -> SystemExit:
    """The exception that ends the run with ``error: msg`` on stderr and exit status 2."""
    return SystemExit(f"error: {msg}")


def build_parser(description: str = "") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = ap.add_argument_group("model").add_argument
    g("--depth", type=int, default=32, help="6n+2")
    g("--edge-convs", type=int, default=0, help="M, quantized block convs at the edge (even)")
    g("--edge-bits", type=int, default=1, choices=(1, 2, 4),
      help="bits of the edge convs' weights and activations")
    g("--exits", default="", help="comma-separated after_conv of the early exits, e.g. 20")
    g("--exit-weights", default="",
      help="lambda_k of eq. (5) per early exit (one value: every exit); the head gets 1 - sum")
    g("--shortcut", default="zero_pad", choices=("zero_pad", "conv1x1"),
      help="downsampling shortcut (docs/FORMAT.md)")
    g("--init", default=None, help="weights file to start from (qat_resnet.init_from)")
    g("--init-edge", default=None, metavar="FILE",
      help="with --init: take the stem, the edge convs that are edge convs in both and the "
           "exits at the same place from this trained hybrid instead (qat_resnet.init_from)")
    g("--fit-ranges", type=int, default=0, choices=(0, 1),
      help="with --init and --edge-bits 2/4: rescale the latent weights of edge convs new to "
           "that bit depth and set their input BN gamma so the codes use the quantizer's range "
           "(qat_resnet.fit_quantizer_ranges)")

    g = ap.add_argument_group("schedule and optimizer").add_argument
    g("--strategy", default="joint", choices=("joint", "separate"),
      help="joint: eq. (5-6); separate: the hybrid without exits, then the exits alone")
    g("--epochs", type=int, default=0, help="epochs (phase 1 of separate); or use --time-budget")
    g("--time-budget", type=float, default=0.0,
      help="seconds of training instead of --epochs: the learning rate follows the wall clock "
           "(separate: --exit-budget-frac of it trains the exits)")
    g("--exit-budget-frac", type=float, default=0.2,
      help="separate with --time-budget: fraction of the budget that trains the exits")
    g("--exit-epochs", type=int, default=0,
      help="separate: epochs for the exits (0: max(1, epochs // 4))")
    g("--batch", type=int, default=128, help="training batch size")
    g("--lr", type=float, default=0.1, help="peak learning rate")
    g("--sched", default="onecycle", choices=("onecycle", "cosine"),
      help="learning-rate curve (lr_schedule)")
    g("--warmup", type=float, default=0.15, help="fraction of steps warming up")
    g("--wd", type=float, default=5e-4, help="weight decay on float conv and linear weights")
    g("--wd-latent", type=float, default=0.0, help="weight decay on latent quantized weights")
    g("--optimizer", default="sgd", choices=("sgd", "adam"),
      help="sgd: momentum 0.9, Nesterov; adam: betas 0.9, 0.999 (binary networks often train "
           "better with it; its peak --lr is ~100x smaller)")
    g("--clip-grad", type=float, default=0.0, help="clip the global gradient norm to N (0: off)")
    g("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    g("--swa-every", type=int, default=0, metavar="N",
      help="stochastic weight averaging (weight_average): average the weights of every N-th "
           "step after --swa-start, recompute the BN statistics for the mean and export it to "
           "<out>_swa.npz as well (0: off)")
    g("--swa-start", type=float, default=0.5, metavar="F",
      help="--swa-every: fraction of the run (steps, or the --time-budget) before averaging")
    g("--swa-bn-passes", type=int, default=1, metavar="E",
      help="--swa-every: passes of augmented training batches the averaged model's BN "
           "statistics are recomputed over")

    g = ap.add_argument_group("distillation").add_argument
    g("--teacher", default=None,
      help="weights file whose head logits every output also learns from")
    g("--kd-weight", type=float, default=0.9, help="alpha: weight of the teacher term (--teacher)")
    g("--kd-temp", type=float, default=4.0, help="T: softmax temperature of the teacher term")

    g = ap.add_argument_group("data").add_argument
    g("--val-size", type=int, default=VAL_SIZE, help="last images of the train split held out")
    g("--limit-train", type=int, default=None, help="use only the first N train images (smoke)")
    g("--limit-val", type=int, default=None, help="use only the first N validation images (smoke)")
    g("--max-steps", type=int, default=None, help="stop each epoch after N steps (smoke)")
    g("--synthetic", action="store_true", help="random images instead of CIFAR-10 (tests)")

    g = ap.add_argument_group("checkpoints, log and partial state").add_argument
    g("--ckpt-dir", default=None, help="checkpoints and log (default: cache runs/<out name>)")
    g("--partial", default=None, metavar="DIR",
      help="after every epoch write the model and the schedule state to DIR/<out name>.npz "
           "and .json, and resume from them when no checkpoint is newer (partial_state); "
           "removed once --out is written")
    g("--stop-after", type=int, default=0, metavar="N",
      help="end this invocation after N completed epochs (checkpoint and --partial written); "
           "rerun the same command to continue (0: run to the end)")
    g("--log-every", type=int, default=50, help="log the running loss every N steps")

    g = ap.add_argument_group("validation, output and selection").add_argument
    g("--out", required=True, help="weights file to write")
    g("--eval-every", type=int, default=1, help="validate every N epochs (and after the last)")
    g("--threshold-rule", default="within:0.5",
      help="within:D (points), exits:P (%% leaving), accuracy:A (%%) or fixed:T (nats); "
           "xnorcdl.calibrate")
    g("--select-by", default=None,
      help="also export the validated epoch with the best operating point under this rule "
           "(accuracy:A or within:D: most edge exits; exits:P: best accuracy); epoch_select")
    g("--select-out", default=None, help="file for --select-by (default: <out>_best.npz)")
    g("--select-images", type=int, default=None, metavar="N",
      help="score the epochs for --select-by on the first N validation images only, so the "
           "rest can compare and calibrate the chosen file without the choice's optimism "
           "(python -m xnorcdl.tradeoff --calib-range N:)")

    g = ap.add_argument_group("device and speed").add_argument
    g("--device", default="cpu", choices=("cpu", "cuda"), help="where to train")
    g("--threads", type=int, default=2, help="torch CPU threads")
    g("--channels-last", type=int, default=0, choices=(0, 1),
      help="channels-last memory layout of the activations")
    g("--cuda-graphs", type=int, default=0, choices=(0, 1),
      help="replay the training forward/backward as CUDA graphs (cuda only)")
    g("--compile", type=int, default=0, choices=(0, 1),
      help="run the training forward/backward and the teacher through torch.compile")
    return ap


def _exits(args):
    """(after_conv of each early exit, lambda_k of each), one weight given for several exits
    repeated."""
    exits = [int(s) for s in args.exits.split(",") if s.strip()]
    weights = [float(s) for s in args.exit_weights.split(",") if s.strip()]
    if len(weights) == 1 and len(exits) > 1:
        weights = weights * len(exits)
    if len(weights) != len(exits):
        raise fail(f"{len(weights)} exit weight(s) for {len(exits)} exit(s)")
    if sum(weights) >= 1.0:
        raise fail("the early-exit weights must sum to < 1 (the head gets the rest)")
    return exits, weights


def _check_rules(args, exits) -> None:
    """--threshold-rule and the --select-* options."""
    try:
        xcal.parse_rule(args.threshold_rule)
    except ValueError as exc:
        raise fail(f"--threshold-rule: {exc}")
    if args.select_by is not None:
        try:
            xcal.parse_rule(args.select_by)
        except ValueError as exc:
            raise fail(f"--select-by: {exc}")
        if not exits:
            raise fail("--select-by scores the early exits' operating point: give --exits")
        if args.select_images is not None and args.select_images < 1:
            raise fail("--select-images must be a positive number of images")
        if args.select_out and os.path.abspath(args.select_out) == os.path.abspath(args.out):
            raise fail("--select-out must differ from --out (the last epoch)")
    if args.select_images is not None and args.select_by is None:
        raise fail("--select-images limits the images --select-by scores: give --select-by")


def _check_schedule(args, exits) -> None:
    """The length of the run, the averaging, the speed options and the partial state."""
    exits_only = (args.strategy == "separate" and args.epochs == 0 and args.time_budget == 0
                  and args.exit_epochs > 0)
    if exits_only and not (args.init and exits):
        raise fail("--strategy separate --epochs 0 trains only the exits of an existing "
                   "hybrid: give it as --init FILE, and --exits")
    if not exits_only and (args.epochs > 0) == (args.time_budget > 0):
        raise fail("give exactly one of --epochs N (> 0) and --time-budget SECONDS "
                   "(or, separate, --epochs 0 --exit-epochs N with --init)")
    if args.teacher is not None and not (0.0 <= args.kd_weight <= 1.0 and args.kd_temp > 0):
        raise fail("--kd-weight must lie in [0, 1] and --kd-temp be > 0")
    if args.swa_every:
        if args.swa_every < 0 or not 0.0 <= args.swa_start < 1.0 or args.swa_bn_passes < 1:
            raise fail("--swa-every must be >= 0, --swa-start lie in [0, 1) and "
                       "--swa-bn-passes be >= 1")
        if args.cuda_graphs or (args.strategy == "separate" and exits):
            raise fail("--swa-every averages one joint phase of every parameter: not with "
                       "--strategy separate or --cuda-graphs")
    if args.compile and args.cuda_graphs:
        raise fail("--compile 1 and --cuda-graphs 1 are alternatives; give one")
    if args.stop_after < 0:
        raise fail("--stop-after must be >= 0 epochs")
    if args.partial and (args.time_budget or args.swa_every or args.select_by):
        raise fail("--partial resumes a step schedule by its epoch: not with --time-budget, "
                   "--swa-every or --select-by")
    if not 0.0 < args.exit_budget_frac < 1.0:
        raise fail("--exit-budget-frac must lie strictly between 0 and 1")


def resolve(args) -> dict:
    """The configuration of a run from its parsed arguments, checked: ``vars(args)`` with the
    exits and their weights as lists, the head's weight, the checkpoint directory and the
    derived output files and exit epochs filled in."""
    exits, weights = _exits(args)
    _check_rules(args, exits)
    spec = ModelSpec(depth=args.depth, edge_convs=args.edge_convs, edge_bits=args.edge_bits,
                     shortcut=args.shortcut, exits=tuple(ExitSpec(a, 0.0) for a in exits))
    try:
        spec.validate()
    except ValueError as exc:
        raise fail(str(exc))
    _check_schedule(args, exits)
    if args.init_edge and not args.init:
        raise fail("--init-edge replaces the edge of the --init file: give --init")
    ckpt = args.ckpt_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "xnorcdl", "runs", os.path.splitext(os.path.basename(args.out))[0])
    cfg = dict(vars(args))
    if args.teacher is None:  # nothing to weigh: keeps old checkpoints resumable
        cfg.update(kd_weight=None, kd_temp=None)
    cfg.update(exits=exits, exit_weights=weights, head_weight=1.0 - sum(weights), ckpt_dir=ckpt,
               select_out=(args.select_out or default_out(args.out)) if args.select_by else None,
               swa_out=default_out(args.out, "swa") if args.swa_every else None,
               exit_epochs=(args.exit_epochs or max(1, args.epochs // 4)
                            if args.strategy == "separate" and exits and not args.time_budget
                            else 0))
    return cfg
