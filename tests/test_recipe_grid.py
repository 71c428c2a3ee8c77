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


def _trained(path, val_no_exit, seed):
    from conftest import make_spec
    from xnorcdl.format import random_weights, save_weights
    spec = make_spec(edge_convs=2, exits=[(2, 0.5)],
                     provenance={"validation": {"val_no_exit_acc": val_no_exit}})
    save_weights(str(path), spec, random_weights(spec, seed=seed))
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("first, second, kept", [(90.3, 90.9, "second"), (90.3, 90.3, "second"),
                                                 (90.3, 89.7, "first")])
def test_a_second_run_replaces_the_file_only_when_validation_does_not_fall(folders, first, second,
                                                                           kept):
    g = folders
    (g / "second").mkdir()
    sha1 = _trained(g / "r32_10E_4b.npz", first, seed=1)
    sha2 = _trained(grid.second_out("r32_10E_4b"), second, seed=2)
    assert not grid.settled("r32_10E_4b")
    changed = grid.settle_second("r32_10E_4b", lambda m: None)
    assert changed == (kept == "second")
    with open(g / "r32_10E_4b.npz", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == (sha2 if kept == "second" else sha1)
    assert os.listdir(g / "second") == []
    with open(g / "budgets.json") as f:
        entry = json.load(f)["second"]["r32_10E_4b"]
    assert entry == {"epochs": grid.SECOND["r32_10E_4b"], "lr": float(grid.SECOND_LR),
                     "first_sha256": sha1, "second_sha256": sha2, "val_no_exit_first": first,
                     "val_no_exit_second": second, "kept": kept}
    assert grid.settled("r32_10E_4b") and not grid.settled("r32_16E_4b")


def first_cmd_of(name):
    return grid.command(next(p for p in grid.points() if p["name"] == name))


def test_second_runs_start_from_the_final_file_at_the_second_rate(folders):
    runs = {p["name"]: p for p in grid.second_points()}
    assert set(runs) == set(grid.SECOND)
    cmd = grid.command(runs["r32_10E_2b"], threads=1)
    assert cmd[cmd.index("--init") + 1] == grid.final_path("r32_10E_2b")
    assert cmd.count("--lr") == 1 and cmd[cmd.index("--lr") + 1] == grid.SECOND_LR
    assert cmd[cmd.index("--epochs") + 1] == str(grid.SECOND["r32_10E_2b"])
    assert cmd[cmd.index("--out") + 1] == grid.second_out("r32_10E_2b")
    assert cmd[cmd.index("--partial") + 1] == os.path.join(grid.PARTIAL, "second")
    assert "--fit-ranges" not in cmd and "--init-edge" not in cmd
    # another out name than the first run's, so another checkpoint folder (train.py's default)
    out = cmd[cmd.index("--out") + 1]
    assert os.path.basename(out) == "r32_10E_2b_second.npz" != os.path.basename(
        first_cmd_of("r32_10E_2b")[first_cmd_of("r32_10E_2b").index("--out") + 1])
    first = first_cmd_of("r32_10E_2b")
    model = ["--edge-convs", "--edge-bits", "--exits", "--exit-weights"]
    assert [cmd[cmd.index(k) + 1] for k in model] == [first[first.index(k) + 1] for k in model]
