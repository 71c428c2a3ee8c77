"""The grid driver's bookkeeping (weights/recipe/grid.py): which points are final, and what a
point that becomes final gets (its figures recorded, its partial state removed)."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

pytest.importorskip("torch")

import recipe_support  # noqa: E402

grid = recipe_support.load_recipe("grid")


@pytest.fixture
def folders(tmp_path, monkeypatch):
    g = tmp_path / "grid"
    (g / "partial").mkdir(parents=True)
    monkeypatch.setattr(grid, "GRID", str(g))
    monkeypatch.setattr(grid, "PARTIAL", str(g / "partial"))
    return g


def _figures(g, name, sha):
    with open(g / "figures.json", "w") as f:
        json.dump({"subset": {"first_test_images": 200}, "files": {name + ".npz": {"sha256": sha}}},
                  f)


def test_a_point_needs_finalizing_until_its_figures_match_and_its_partial_state_is_gone(folders):
    g = folders
    assert not grid.needs_finalizing("r32_10E_4b")              # no final file yet
    (g / "partial" / "r32_10E_4b.json").write_text("{}")
    assert not grid.needs_finalizing("r32_10E_4b")              # in training
    (g / "r32_10E_4b.npz").write_bytes(b"final weights")
    sha = hashlib.sha256(b"final weights").hexdigest()
    _figures(g, "r32_10E_4b", sha)
    assert grid.needs_finalizing("r32_10E_4b")                  # partial entry left behind
    os.remove(g / "partial" / "r32_10E_4b.json")
    assert not grid.needs_finalizing("r32_10E_4b")
    _figures(g, "r32_10E_4b", "0" * 64)
    assert grid.needs_finalizing("r32_10E_4b")                  # figures of another file
    os.remove(g / "figures.json")
    assert grid.needs_finalizing("r32_10E_4b")                  # no figures at all


def test_finalize_records_figures_then_removes_the_partial_state(folders):
    g = folders
    (g / "r32_16E_4b.npz").write_bytes(b"w")
    for ext in (".npz", ".json"):
        (g / "partial" / ("r32_16E_4b" + ext)).write_bytes(b"p")
    calls = []

    def run(cmd, **kw):
        assert all(os.path.exists(g / "partial" / ("r32_16E_4b" + e)) for e in (".npz", ".json"))
        calls.append((cmd, kw))

    grid.finalize("r32_16E_4b", lambda m: None, run=run)
    (cmd, kw), = calls
    assert cmd[1].endswith(os.path.join("weights", "recipe", "evaluate.py"))
    assert cmd[2] == str(g / "r32_16E_4b.npz")
    assert cmd[3:] == ["--subset", "200", "--skip-torch", "--threads", "1", "--write"]
    assert kw["check"] is True
    assert sorted(os.listdir(g / "partial")) == []


def test_a_failed_evaluation_keeps_the_partial_state(folders):
    g = folders
    (g / "r32_16E_4b.npz").write_bytes(b"w")
    (g / "partial" / "r32_16E_4b.json").write_bytes(b"p")

    def run(cmd, **kw):
        raise grid.subprocess.CalledProcessError(2, cmd)

    with pytest.raises(grid.subprocess.CalledProcessError):
        grid.finalize("r32_16E_4b", lambda m: None, run=run)
    assert os.listdir(g / "partial") == ["r32_16E_4b.json"]
