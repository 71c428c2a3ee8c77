"""A run's progress kept in the repository (``--partial DIR``), so that training can span
interruptions that lose every cache and checkpoint.

After every completed epoch the run writes two files beside each other:

* ``DIR/<name>.npz``: the model as it stands, an ordinary weights file (docs/FORMAT.md, latent
  weights of the quantized convs included, exit thresholds calibrated on the validation split
  with ``--threshold-rule``), loadable by the engine as a provisional point;
* ``DIR/<name>.json``: the schedule state: format tag and version, the configuration keys a
  resume must share (``RESUME_KEYS`` of train.py), the phase and epoch reached, seconds spent,
  the per-epoch history, the learning rate at the stop and the sha256 of the ``.npz``.

A run started with the same configuration and ``--partial DIR``, and without a newer cache
checkpoint, continues from them: the arrays are copied into the model, the step schedule is
replayed to the epoch reached, the optimizer's momentum starts again from zero, and the data
order of each later epoch comes from a generator seeded by (seed, phase, epoch). ``<name>`` is
the stem of ``--out``. Both files are removed once the run has written ``--out``.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from xnorcdl.format import load_weights

from run_records import sha256_of

FORMAT = "xnorcdl-partial-run"
VERSION = 1


def paths(directory: str, out: str):
    """(npz, json) paths of the run writing ``out``."""
    stem = os.path.splitext(os.path.basename(out))[0]
    return os.path.join(directory, stem + ".npz"), os.path.join(directory, stem + ".json")


def epoch_generator(seed: int, phase: int, epoch: int) -> torch.Generator:
    """The data-order generator of an epoch resumed from a partial state."""
    return torch.Generator().manual_seed(seed * 1000 + phase + 7919 * (epoch + 1))


def save(directory: str, cfg: dict, keys, state: dict, lr: float, write_npz) -> None:
    """Write the partial state: ``write_npz(path)`` exports the model to the ``.npz``, then the
    ``.json`` is written; each via a temporary file and a rename."""
    npz, js = paths(directory, cfg["out"])
    os.makedirs(directory, exist_ok=True)
    tmp = npz[:-4] + ".tmp.npz"
    write_npz(tmp)
    os.replace(tmp, npz)
    record = {"format": FORMAT, "version": VERSION, "weights": os.path.basename(npz),
              "sha256": sha256_of(npz), "config": {k: cfg.get(k) for k in keys},
              "epochs": cfg["epochs"], "exit_epochs": cfg.get("exit_epochs", 0),
              "lr_at_stop": lr, "state": state}
    with open(js + ".tmp", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(js + ".tmp", js)


def load(directory: str, cfg: dict, keys, named_tensors, defaults=None) -> Optional[dict]:
    """The saved state, with the arrays copied into ``named_tensors`` (name -> tensor), or None
    when there is none; ``defaults``: the values of keys a state written before they existed
    held implicitly. A state made with another configuration, or whose ``.npz`` is not the
    one it names, is an error."""
    npz, js = paths(directory, cfg["out"])
    if not os.path.exists(js):
        return None
    with open(js) as f:
        record = json.load(f)
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise SystemExit(f"error: {js}: not a {FORMAT} version {VERSION} file")
    saved = {**(defaults or {}), **record["config"]}
    diff = {k: (saved.get(k), cfg.get(k)) for k in keys if saved.get(k) != cfg.get(k)}
    if diff:
        raise SystemExit(f"error: {js} was made with another configuration {diff}")
    if not os.path.exists(npz) or sha256_of(npz) != record["sha256"]:
        raise SystemExit(f"error: {npz} is missing or is not the file {js} names "
                         f"(sha256 {record['sha256'][:12]}...)")
    _, arrays = load_weights(npz)
    with torch.no_grad():
        for name, t in named_tensors.items():
            t.copy_(torch.from_numpy(np.asarray(arrays[name])))
    return record


def remove(directory: str, out: str) -> None:
    """Delete the partial state of the run writing ``out`` (its point is final)."""
    for p in paths(directory, out):
        if os.path.exists(p):
            os.remove(p)
