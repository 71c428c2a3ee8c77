"""What the recipe's tests share: the recipe's modules (weights/recipe/, PyTorch) and the
arguments of a tiny training run. Import it after ``pytest.importorskip("torch")``."""
from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "weights")
RECIPE = os.path.join(WEIGHTS, "recipe")


def load_recipe(name: str = "train"):
    """The recipe script ``weights/recipe/<name>.py`` as a module (``train`` puts the recipe's
    directory on sys.path, so its own modules import by their names)."""
    spec = importlib.util.spec_from_file_location(
        f"xnorcdl_recipe_{name}", os.path.join(RECIPE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


T = load_recipe()


def tiny_args(tmp_path, *extra):
    """A run of a few seconds: depth 8, one 1-bit edge block and its exit, 2 steps of 16
    synthetic images, checkpoints under ``tmp_path``."""
    return ["--depth", "8", "--edge-convs", "2", "--edge-bits", "1", "--exits", "2",
            "--exit-weights", "0.6", "--epochs", "1", "--synthetic", "--limit-train", "64",
            "--limit-val", "32", "--batch", "16", "--max-steps", "2", "--threads", "1",
            "--seed", "3", "--out", str(tmp_path / "tiny.npz"),
            "--ckpt-dir", str(tmp_path / "ckpt"), *extra]
