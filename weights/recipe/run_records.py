"""What a training run records: its log, checkpoints, and the provenance of its inputs."""
from __future__ import annotations

import os
import platform
import time
from typing import Optional

import torch

from xnorcdl.files import sha256_of  # noqa: F401 (the recipe's scripts import it from here)
from xnorcdl.format import load_weights


class Logger:
    """Timestamped (UTC) log lines to stdout and, line-buffered, to ``path``."""

    def __init__(self, path: Optional[str]):
        self.f = open(path, "a", buffering=1) if path else None

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}Z] {msg}"
        print(line, flush=True)
        if self.f:
            self.f.write(line + "\n")


def atomic_save(obj, path: str) -> None:
    """torch.save to ``path`` via a temporary file and a rename: a crash leaves the previous
    checkpoint whole."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def machine() -> str:
    """CPU model, core and thread counts, OS, Python, torch and GPU, for the provenance."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}"
            + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))


def init_record(path: Optional[str]) -> dict:
    """What a run started from: the --init file's path, sha256 and its own provenance, so a
    file fine-tuned from another carries the whole chain."""
    if not path:
        return {"init": None}
    spec, _ = load_weights(path)
    return {"init": path, "init_sha256": sha256_of(path), "init_provenance": spec.provenance}


def init_edge_record(cfg: dict) -> dict:
    """The --init-edge file (path, sha256, its own provenance), when the run had one."""
    path = cfg.get("init_edge")
    if not path:
        return {}
    spec, _ = load_weights(path)
    return {"init_edge": {"path": path, "sha256": sha256_of(path),
                          "provenance": spec.provenance}}


def teacher_record(cfg: dict) -> dict:
    """The distillation teacher (--teacher): path, sha256, alpha, T and its own provenance."""
    if not cfg["teacher"]:
        return {"teacher": None}
    spec, _ = load_weights(cfg["teacher"])
    return {"teacher": {"path": cfg["teacher"], "sha256": sha256_of(cfg["teacher"]),
                        "kd_weight": cfg["kd_weight"], "kd_temp": cfg["kd_temp"],
                        "provenance": spec.provenance}}
