"""The shipped weights files (weights/*.npz) against the figures weights/figures.json documents
for them, through the engine alone (no PyTorch: these run wherever the engine does).

* each file is the one the figures were measured on (sha256), and every shipped file has them;
* on the first N images of the CIFAR-10 test split the reference executor reproduces the
  documented correct predictions and exits per early exit exactly; on the whole split the fast
  backend reproduces the figures weights/README.md quotes (skipped when the data is not in the
  cache).

``python weights/recipe/evaluate.py weights/*.npz --write`` measures and records the figures.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os

import numpy as np
import pytest

from xnorcdl import engine
from xnorcdl.backends.reference import ReferenceExecutor
from xnorcdl.model import load_model

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")


def _figures():
    with open(os.path.join(WEIGHTS, "figures.json")) as f:
        return json.load(f)


def _shipped(name):
    """(documented figures, prepared model, test images, test labels) for a shipped file, after
    checking that the file is the one the figures were measured on; skips without the data."""
    from xnorcdl.data import DataError, load_cifar10
    want = _figures()["files"][name]
    path = os.path.join(WEIGHTS, name)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == want["sha256"], f"{name} changed since weights/figures.json was written"
    try:
        images, labels = load_cifar10("test", fetch=False)
    except DataError as exc:
        pytest.skip(f"CIFAR-10 is not in the cache ({exc})")
    return want, load_model(path), np.ascontiguousarray(images), labels


def _counts(res, model, labels):
    """(correct predictions, samples per early exit) of an engine run."""
    return (int((res.predictions == labels).sum()),
            [int((res.exit_index == k).sum()) for k in range(len(model.exits))])


@pytest.mark.parametrize("name", sorted(_figures()["files"]))
def test_shipped_weights_reproduce_documented_figures(name):
    """weights/figures.json: accuracy and exit fraction of each file on the first N test images,
    measured by the engine (reference executor, Algorithm 1 with the file's thresholds)."""
    want, model, images, labels = _shipped(name)
    n = _figures()["subset"]["first_test_images"]
    res = engine.run(model, images[:n], ReferenceExecutor(model), batch_size=100)
    correct, exited = _counts(res, model, labels[:n])
    assert correct == want["correct"], f"{name}: {correct}/{n} correct, documented {want['correct']}"
    assert exited == want["exited"], f"{name}: exits {exited}, documented {want['exited']}"


@pytest.mark.parametrize("name", sorted(_figures()["files"]))
def test_shipped_weights_reproduce_full_test_figures_with_the_fast_backend(name):
    """The figures weights/README.md quotes: all 10000 test images through the fast backend."""
    from xnorcdl.backends.fast import FastExecutor
    want, model, images, labels = _shipped(name)
    full = want.get("full_test")
    if full is None:
        pytest.skip(f"weights/figures.json has no whole-test-set figures for {name}")
    res = engine.run(model, images, FastExecutor(model), batch_size=500)
    correct, exited = _counts(res, model, labels)
    assert (correct, exited) == (full["correct"], full["exited"]), \
        f"{name}: {correct} correct and exits {exited} on the test set, documented {full}"


def test_every_shipped_file_has_documented_figures():
    shipped = sorted(os.path.basename(p) for p in glob.glob(os.path.join(WEIGHTS, "*.npz")))
    assert shipped and shipped == sorted(_figures()["files"])
