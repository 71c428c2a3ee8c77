"""The shipped weights files (weights/*.npz and the design-space grid, weights/grid/*.npz)
against the figures the ``figures.json`` beside them documents, through the engine alone (no
PyTorch: these run wherever the engine does).

* each file is the one the figures were measured on (sha256), and every shipped file has them;
* on the first N images of the CIFAR-10 test split the reference executor reproduces the
  documented correct predictions and exits per early exit exactly; on the whole split the fast
  backend reproduces the figures weights/README.md quotes (skipped when the data is not in the
  cache).

``python weights/recipe/evaluate.py weights/*.npz --write`` (and ``weights/grid/*.npz``)
measures and records the figures. Grid points still in training (``weights/grid/partial/``) are
not shipped files.
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
#: the folders of shipped files, each with its figures.json
FOLDERS = ("", "grid")


def _figures(folder):
    path = os.path.join(WEIGHTS, folder, "figures.json")
    if not os.path.exists(path):
        return {"subset": {"first_test_images": 0}, "files": {}}
    with open(path) as f:
        return json.load(f)


def _documented(folders=FOLDERS):
    return [os.path.join(folder, name) for folder in folders
            for name in sorted(_figures(folder)["files"])]


def _shipped(rel):
    """(documented figures, prepared model, test images, test labels) for a shipped file, after
    checking that the file is the one the figures were measured on; skips without the data."""
    from xnorcdl.data import DataError, load_cifar10
    folder, name = os.path.split(rel)
    want = _figures(folder)["files"][name]
    path = os.path.join(WEIGHTS, rel)
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


@pytest.mark.parametrize("name", _documented())
def test_shipped_weights_reproduce_documented_figures(name):
    """figures.json: accuracy and exit fraction of each file on the first N test images,
    measured by the engine (reference executor, Algorithm 1 with the file's thresholds)."""
    want, model, images, labels = _shipped(name)
    n = _figures(os.path.dirname(name))["subset"]["first_test_images"]
    res = engine.run(model, images[:n], ReferenceExecutor(model), batch_size=100)
    correct, exited = _counts(res, model, labels[:n])
    assert correct == want["correct"], f"{name}: {correct}/{n} correct, documented {want['correct']}"
    assert exited == want["exited"], f"{name}: exits {exited}, documented {want['exited']}"


@pytest.mark.parametrize("name", _documented(FOLDERS[:1]))
def test_shipped_weights_reproduce_full_test_figures_with_the_fast_backend(name):
    """The figures weights/README.md quotes: all 10000 test images through the fast backend.
    (The grid's files are checked on their documented subset only, to keep the suite short;
    their whole-test-set figures are what ``explore`` writes to docs/design-space/.)"""
    from xnorcdl.backends.fast import FastExecutor
    want, model, images, labels = _shipped(name)
    full = want.get("full_test")
    if full is None:
        pytest.skip(f"weights/figures.json has no whole-test-set figures for {name}")
    res = engine.run(model, images, FastExecutor(model), batch_size=500)
    correct, exited = _counts(res, model, labels)
    assert (correct, exited) == (full["correct"], full["exited"]), \
        f"{name}: {correct} correct and exits {exited} on the test set, documented {full}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_shipped_file_has_documented_figures(folder):
    shipped = sorted(os.path.basename(p)
                     for p in glob.glob(os.path.join(WEIGHTS, folder, "*.npz")))
    assert shipped == sorted(_figures(folder)["files"])
    assert shipped or folder, "weights/ ships no file"
