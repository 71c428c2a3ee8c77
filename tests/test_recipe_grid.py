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


@pytest.mark.parametrize("budget", [2, 3])
@pytest.mark.parametrize("before, after, kept", [(90.3, 90.9, "run"), (90.3, 90.3, "run"),
                                                 (90.3, 89.7, "before")])
def test_a_later_run_replaces_the_file_only_when_validation_does_not_fall(folders, budget, before,
                                                                          after, kept):
    g = folders
    tag = grid.BUDGETS[budget]["name"]
    (g / tag).mkdir()
    sha1 = _trained(g / "r32_10E_4b.npz", before, seed=1)
    sha2 = _trained(grid.later_out("r32_10E_4b", budget), after, seed=2)
    assert not grid.settled("r32_10E_4b", budget)
    changed = grid.settle("r32_10E_4b", budget, lambda m: None)
    assert changed == (kept == "run")
    with open(g / "r32_10E_4b.npz", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == (sha2 if kept == "run" else sha1)
    assert os.listdir(g / tag) == []
    with open(g / "budgets.json") as f:
        book = json.load(f)
    assert set(book) == {"rule", tag}
    assert book[tag]["r32_10E_4b"] == {
        "epochs": grid.BUDGETS[budget]["epochs"]["r32_10E_4b"],
        "lr": float(grid.BUDGETS[budget]["lr"]), "before_sha256": sha1, "run_sha256": sha2,
        "val_no_exit_before": before, "val_no_exit_run": after, "kept": kept}
    assert grid.settled("r32_10E_4b", budget) and not grid.settled("r32_16E_4b", budget)
    other = 5 - budget  # the other budget's book is apart
    assert not grid.settled("r32_10E_4b", other)


def test_the_recorded_budgets_match_the_tables_and_the_files():
    """weights/grid/budgets.json: every settled run is one of its budget's table, and a point
    whose last run was kept has that run's file (its sha256), or that file with its thresholds
    recalibrated (``python -m xnorcdl.tradeoff --write`` records the source's sha256)."""
    from xnorcdl.files import sha256_of
    with open(os.path.join(grid.ROOT, "weights", "grid", "budgets.json")) as f:
        book = json.load(f)
    last = {}
    for budget, b in sorted(grid.BUDGETS.items()):
        for name, entry in book.get(b["name"], {}).items():
            assert name in b["epochs"] and entry["epochs"] == b["epochs"][name]
            assert entry["lr"] == float(b["lr"])
            last[name] = entry["run_sha256"] if entry["kept"] == "run" else entry["before_sha256"]
    assert "second" in book
    for name, sha in last.items():
        path = os.path.join(grid.ROOT, "weights", "grid", name + ".npz")
        assert sha in {sha256_of(path)} | set(_recalibrated_from(path)), name


def _recalibrated_from(path):
    from xnorcdl.format import load_weights
    spec, _ = load_weights(path)
    return [r["source_sha256"] for r in spec.provenance.get("recalibrations", [])]


def test_every_grid_file_has_thresholds_of_the_grid_rule():
    """One threshold rule for all points (RULE): each file's stored thresholds come from it, by
    the file's last recalibration or, without one, by its training run's calibration."""
    from xnorcdl.format import load_weights
    folder = os.path.join(grid.ROOT, "weights", "grid")
    names = [p["name"] for p in grid.points()]
    for name in names:
        spec, _ = load_weights(os.path.join(folder, name + ".npz"))
        prov = spec.provenance
        if prov.get("recalibrations"):
            last = prov["recalibrations"][-1]
            rule, thresholds = last["rule"], last["thresholds"]
        else:
            val = prov["validation"]
            rule, thresholds = val["threshold_rule"], val["thresholds"]
        assert rule == grid.RULE, name
        assert [e.threshold for e in spec.exits] == pytest.approx(thresholds), name


def first_cmd_of(name):
    return grid.command(next(p for p in grid.points() if p["name"] == name))


@pytest.mark.parametrize("budget", sorted(grid.BUDGETS))
def test_later_runs_start_from_the_final_file_at_their_rate(folders, budget):
    b = grid.BUDGETS[budget]
    runs = {p["name"]: p for p in grid.later_points(budget)}
    assert set(runs) == set(b["epochs"])
    name = sorted(b["epochs"])[0]
    cmd = grid.command(runs[name], threads=1)
    assert cmd[cmd.index("--init") + 1] == grid.final_path(b.get("start", {}).get(name, name))
    assert cmd.count("--lr") == 1 and cmd[cmd.index("--lr") + 1] == b["lr"]
    assert cmd[cmd.index("--epochs") + 1] == str(b["epochs"][name])
    assert cmd[cmd.index("--out") + 1] == grid.later_out(name, budget)
    assert cmd[cmd.index("--partial") + 1] == os.path.join(grid.PARTIAL, b["name"])
    assert "--fit-ranges" not in cmd and "--init-edge" not in cmd
    # another out name than the first run's and every other budget's, so another checkpoint
    # folder (train.py's default)
    out = cmd[cmd.index("--out") + 1]
    assert os.path.basename(out) == f"{name}_{b['name']}.npz"
    first = first_cmd_of(name)
    outs = {os.path.basename(first[first.index("--out") + 1])} | {
        os.path.basename(grid.later_out(name, k)) for k in grid.BUDGETS}
    assert len(outs) == 1 + len(grid.BUDGETS)
    model = ["--edge-convs", "--edge-bits", "--exits", "--exit-weights"]
    assert [cmd[cmd.index(k) + 1] for k in model] == [first[first.index(k) + 1] for k in model]


def test_a_budget_starts_a_point_only_from_its_twin_of_more_bits():
    """A budget's ``"start"``: another point with the same edge and exit, more bits (the 2-bit
    points from their 4-bit twins); the file a run may replace is still the point's own."""
    for budget, b in grid.BUDGETS.items():
        for name, twin in b.get("start", {}).items():
            assert name in b["epochs"], (budget, name)
            m, bits = name.split("_")[1], int(name.split("_")[2][:-1])
            assert twin == f"r32_{m}_{4}b" and bits < 4, (budget, name, twin)
    assert grid.BUDGETS[19]["start"]


def test_a_run_from_a_twin_records_its_start(folders):
    g = folders
    tag = grid.BUDGETS[19]["name"]
    (g / tag).mkdir()
    sha1 = _trained(g / "r32_20E_2b.npz", 85.3, seed=1)
    _trained(g / "r32_20E_4b.npz", 89.3, seed=3)
    sha2 = _trained(grid.later_out("r32_20E_2b", 19), 87.0, seed=2)
    assert grid.settle("r32_20E_2b", 19, lambda m: None)
    with open(g / "budgets.json") as f:
        entry = json.load(f)[tag]["r32_20E_2b"]
    assert entry["start"] == "r32_20E_4b.npz"
    assert (entry["before_sha256"], entry["run_sha256"], entry["kept"]) == (sha1, sha2, "run")
