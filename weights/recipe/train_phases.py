"""The training of ``train.py``: the model, data and teacher of a run, its phases (the
strategies of the paper's section II.B, :func:`plan_phases`), the optimizer and schedule of
each, one epoch of steps, the loss (eq. 4-6, :func:`distill_loss`), and the checkpoint a run
resumes from."""
from __future__ import annotations

import os
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from xnorcdl.spec import ExitSpec, ModelSpec

from cifar_batches import Data
from lr_schedule import TimeSched, make_sched
from qat_resnet import CHANNELS_LAST, HybridResNet, QuanConv, init_from, model_from_file
from train_options import CHECKPOINT_DEFAULTS, RESUME_KEYS, fail


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: Optional[torch.Tensor],
                 alpha: float, temp: float) -> torch.Tensor:
    """Loss of one output (an early exit or the head), the mean over the batch.

    Without a teacher: eq. (4), the cross-entropy L = CE(y_hat, y). With a teacher's logits t
    (``--teacher``, knowledge distillation, Hinton et al. 2015):
    L = (1 - alpha) * CE(y_hat, y) + alpha * T^2 * KL(softmax(t / T) || softmax(y_hat / T)),
    Hinton's T^2 keeps the soft term's gradient T * (q_student - q_teacher) on the scale of the
    hard term's when logit gaps are small against T; with large gaps it is up to T times
    larger, which is why distilling a binary hybrid needs ``--clip-grad``.
    Every output (exits and head) learns from the same teacher logits; eq. (5) then weighs
    the outputs' losses as before.
    """
    loss = F.cross_entropy(logits, labels)
    if teacher is not None and alpha != 0.0:
        soft = F.kl_div(F.log_softmax(logits / temp, dim=1), F.log_softmax(teacher / temp, dim=1),
                        reduction="batchmean", log_target=True)
        loss = (1.0 - alpha) * loss + alpha * temp * temp * soft
    return loss


def load_teacher(path: str, n_classes: int, device) -> HybridResNet:
    """The model of a weights file, frozen, in inference mode (BN uses running statistics)."""
    teacher = model_from_file(path)
    if teacher.spec.num_classes != n_classes:
        raise fail(f"--teacher {path}: {teacher.spec.num_classes} classes, the student has "
                   f"{n_classes}")
    teacher.eval()
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    return teacher.to(device)


def param_groups(model: HybridResNet, wd: float, wd_latent: float):
    """Parameter groups: float conv and linear weights decay by ``wd``, the latent weights of
    quantized convs by ``wd_latent``, BN parameters and biases not at all."""
    decay, latent = [], []
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


def build(cfg: dict, log):
    """(model, data, teacher, training forward) on ``cfg['device']``; validation and export
    use ``model`` itself, the training forward may be its ``torch.compile`` (``--compile``)."""
    spec = ModelSpec(depth=cfg["depth"], edge_convs=cfg["edge_convs"], edge_bits=cfg["edge_bits"],
                     shortcut=cfg["shortcut"], exits=tuple(ExitSpec(a, 0.0) for a in cfg["exits"]))
    model = HybridResNet(spec)
    if cfg["init"]:
        init_from(model, cfg["init"], log, fit_ranges=bool(cfg.get("fit_ranges", 0)),
                  edge_path=cfg.get("init_edge"))
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
    fwd = model
    if cfg["compile"]:  # same parameters and buffers, compiled on the first call
        fwd = torch.compile(fwd)
        teacher = None if teacher is None else torch.compile(teacher)
    log(f"data: {data.source}; {len(data.x_train)} train, {len(data.x_val)} validation images")
    return model, data, teacher, fwd


def plan_phases(cfg: dict) -> list:
    """The training phases as (name, epochs, loss weights per output, frozen, seconds): one
    ``joint`` (or ``plain``, without exits) phase, or ``hybrid`` then ``exits`` (frozen
    "convs") for the separate strategy. With ``--time-budget`` the clock, not an epoch count,
    ends a phase."""
    n_early = len(cfg["exits"])
    budget, timed = cfg["time_budget"], cfg["time_budget"] > 0
    many = 10 ** 9
    if cfg["strategy"] == "joint" or not n_early:
        return [("joint" if n_early else "plain", many if timed else cfg["epochs"],
                 cfg["exit_weights"] + [cfg["head_weight"]], "", budget)]
    frac = cfg["exit_budget_frac"]
    return [("hybrid", many if timed else cfg["epochs"], [0.0] * n_early + [1.0], "",
             budget * (1 - frac)),
            ("exits", many if timed else cfg["exit_epochs"], [1.0] * n_early + [0.0], "convs",
             budget * frac)]


def optimizer_for(model: HybridResNet, cfg: dict, frozen: str, epochs: int, steps: int,
                  seconds: float):
    """(optimizer, schedule) of one phase: every parameter, or only the exits when the convs are
    ``frozen`` ("convs", phase 2 of the separate strategy)."""
    for prm in model.parameters():
        prm.requires_grad_(frozen != "convs")
    if frozen == "convs":
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


def train_epoch(model, data, opt, sched, cfg, gen, weights, log, epoch, total_epochs,
                frozen="", teacher=None, fwd=None, after_step=None):
    """One pass over the shuffled training images (fewer steps with --max-steps, or when a
    --time-budget runs out). Running loss and accuracy stay on the device between log lines, so
    a GPU is never made to wait for the host. ``fwd`` (default ``model``) is the callable that
    runs the training forward, e.g. ``torch.compile(model)``; ``teacher`` may be compiled too.
    ``frozen``: "" trains everything, "convs" only the exits (separate, phase 2).
    ``after_step()``, if given, runs after every optimizer step.
    Returns (mean loss, seconds, steps done)."""
    fwd = model if fwd is None else fwd
    model.train()
    if frozen == "convs":  # separate optimisation, phase 2: BN in inference mode, convs frozen
        model.eval()
    steps = data.steps_per_epoch(cfg["batch"])
    if cfg["max_steps"]:
        steps = min(steps, cfg["max_steps"])
    timed = isinstance(sched, TimeSched)
    t0 = time.time()
    dev = cfg["device"]
    tot_loss = torch.zeros((), dtype=torch.float64, device=dev)
    tot_correct = torch.zeros(len(weights), dtype=torch.int64, device=dev)
    seen = done = 0
    of = "?" if timed else str(total_epochs)
    trained = [q for g in opt.param_groups for q in g["params"] if q.requires_grad]
    for step, (xb, yb) in enumerate(data.batches(cfg["batch"], gen)):
        if step >= steps or (timed and sched.done()):
            break
        xb, yb = xb.to(dev), yb.to(dev)
        if frozen:
            with torch.no_grad():
                feats = model.features(model.prepare(xb), max(model.exit_after))
            logits = [model.exit_logits(k, feats[k]) for k in range(len(model.exits))]
        else:
            logits = fwd(xb) if weights[-1] > 0 else fwd(xb, with_head=False)
        soft = None
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(xb)[-1]
        loss = sum(w * distill_loss(l, yb, soft, cfg["kd_weight"], cfg["kd_temp"])
                   for w, l in zip(weights, logits) if w > 0)
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
                f"lr {sched.get_last_lr()[0]:.3g} {el / (step + 1):.3f}s/step "
                f"epoch eta {el / (step + 1) * (steps - step - 1):.0f}s")
    return float(tot_loss) / max(1, seen), time.time() - t0, done


def load_checkpoint(ck_path: str, cfg: dict, model: HybridResNet, steps: int, log):
    """(state, checkpoint or None): the run's progress, restored into ``model`` from ``ck_path``
    when it exists and was made with the same configuration (:data:`RESUME_KEYS`). Only
    ``--epochs`` may change (before the last phase ends): the step schedule is then re-planned
    from the completed steps."""
    state = {"phase": 0, "epoch": 0, "wall": 0.0, "history": []}
    if not os.path.exists(ck_path):
        return state, None
    resume = torch.load(ck_path, map_location="cpu", weights_only=False)
    old = {**CHECKPOINT_DEFAULTS, **resume["cfg"]}
    diff = {k: (old.get(k), cfg[k]) for k in RESUME_KEYS if old.get(k) != cfg[k]}
    if diff:
        raise fail(f"{ck_path} was made with another configuration {diff}; use another "
                   "--ckpt-dir or delete it")
    model.load_state_dict(resume["model"])
    state = resume["state"]
    if resume["cfg"]["epochs"] != cfg["epochs"]:
        if state["phase"] > 0 or state["epoch"] > cfg["epochs"]:
            raise fail(f"{ck_path}: cannot change --epochs to {cfg['epochs']} after epoch "
                       f"{state['epoch']} of phase {state['phase']}")
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
