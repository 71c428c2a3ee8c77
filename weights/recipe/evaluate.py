#!/usr/bin/env python
"""Test figures of shipped weights files: ``python weights/recipe/evaluate.py weights/*.npz``
(or ``weights/grid/*.npz``: the files of one call share a folder).

For each file:

* the whole CIFAR-10 test split (10000 images) through the PyTorch mirror of the network
  (qat_resnet.py, eval mode) with Algorithm 1 applied to its logits: accuracy and exit fractions at
  the file's thresholds and at the paper's fixed 0.5;
* the first ``--subset`` test images through the engine (xnorcdl reference executor, Algorithm 1):
  accuracy and exit counts; the engine and PyTorch decisions on the subset are compared;
* the whole test split through the engine's fast backend (the figures weights/README.md
  quotes): correct predictions and exit counts.

``--write`` records the engine figures in ``figures.json`` beside the files (``weights/`` and
``weights/grid/``), which tests/test_shipped_weights.py checks. ``--skip-torch`` measures the
engine figures alone (no PyTorch import).

The test split is read here only, after training and threshold calibration are final.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the recipe's own modules

from xnorcdl import engine  # noqa: E402
from xnorcdl.files import atomic_write, sha256_of  # noqa: E402
from xnorcdl.data import load_cifar10  # noqa: E402
from xnorcdl.backends.reference import ReferenceExecutor  # noqa: E402
from xnorcdl.backends.fast import FastExecutor  # noqa: E402
from xnorcdl.model import load_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--subset", type=int, default=500, help="first N test images for the engine")
    ap.add_argument("--write", action="store_true", help="update weights/figures.json")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    folders = {os.path.dirname(os.path.abspath(p)) for p in args.files}
    if len(folders) != 1:
        ap.error("the files of one call must share a folder (its figures.json)")
    if not args.skip_torch:
        import torch
        from qat_resnet import model_from_file
        from val_scoring import conditional, decide, predict
        torch.set_num_threads(args.threads)
    x, y = load_cifar10("test")
    x = np.ascontiguousarray(x)
    fig_path = os.path.join(folders.pop(), "figures.json")
    figs = {"subset": {"first_test_images": args.subset, "split": "CIFAR-10 test_batch.bin",
                       "executor": "reference"}, "files": {}}
    if os.path.exists(fig_path):
        with open(fig_path) as f:
            old = json.load(f)
        if old.get("subset", {}).get("first_test_images") == args.subset:
            figs["files"].update(old.get("files", {}))
    report = {}
    for path in args.files:
        name = os.path.basename(path)
        r = {"sha256": sha256_of(path)}
        if not args.skip_torch:
            model_t = model_from_file(path)
            thr = [e.threshold for e in model_t.spec.exits]
            t0 = time.time()
            logits = predict(model_t, torch.from_numpy(x))
            acc, fr = conditional(logits, y, thr)
            r["torch_full_test"] = {
                "images": len(y), "seconds": round(time.time() - t0, 1),
                "no_exit_acc": round(float((logits[-1].argmax(1).numpy() == y).mean()) * 100, 2),
                "acc": round(acc * 100, 2), "exit_fraction": [round(f * 100, 2) for f in fr]}
            if thr:
                acc05, fr05 = conditional(logits, y, [0.5] * len(thr))
                r["torch_full_test"].update(
                    exit_acc=[round(float((l.argmax(1).numpy() == y).mean()) * 100, 2)
                              for l in logits[:-1]],
                    acc_at_0_5=round(acc05 * 100, 2),
                    exit_fraction_at_0_5=[round(f * 100, 2) for f in fr05])
            print(name, json.dumps(r["torch_full_test"]), flush=True)
        n = args.subset
        model = load_model(path)
        t0 = time.time()
        res = engine.run(model, x[:n], ReferenceExecutor(model), batch_size=100)
        correct = int((res.predictions == y[:n]).sum())
        exited = [int((res.exit_index == k).sum()) for k in range(len(model.exits))]
        r["engine_subset"] = {"images": n, "correct": correct, "exited": exited,
                              "acc": round(correct / n * 100, 2),
                              "exit_fraction": [round(e / n * 100, 2) for e in exited],
                              "seconds": round(time.time() - t0, 1)}
        print(name, json.dumps(r["engine_subset"]), flush=True)
        if not args.skip_torch:
            sub = predict(model_t, torch.from_numpy(x[:n]))
            pred_t, exit_t = decide(sub, thr)
            r["engine_vs_torch_subset"] = {
                "same_prediction": int((pred_t == res.predictions).sum()),
                "same_exit": int((exit_t == res.exit_index).sum())}
            print(name, json.dumps(r["engine_vs_torch_subset"]), flush=True)
        t0 = time.time()
        with threadpool_limits(1):
            full = engine.run(model, x, FastExecutor(model), batch_size=500)
        full_correct = int((full.predictions == y).sum())
        full_exited = [int((full.exit_index == k).sum()) for k in range(len(model.exits))]
        r["engine_full_test"] = {"images": len(y), "correct": full_correct, "exited": full_exited,
                                 "acc": round(full_correct / len(y) * 100, 2),
                                 "exit_fraction": [round(e / len(y) * 100, 2) for e in full_exited],
                                 "seconds": round(time.time() - t0, 1)}
        print(name, json.dumps(r["engine_full_test"]), flush=True)
        figs["files"][name] = {"sha256": r["sha256"], "correct": correct, "exited": exited,
                               "full_test": {"correct": full_correct, "exited": full_exited}}
        report[name] = r
    if args.write:
        with atomic_write(fig_path, "w") as f:
            json.dump(figs, f, indent=1)
            f.write("\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
