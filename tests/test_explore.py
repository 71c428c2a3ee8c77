"""The design-space command (python -m xnorcdl explore) end to end on a tiny grid of random
files: the JSON it writes, Fig. 4 as a PNG that opens, Tables II-IV whose energies are the
counter's, the Pareto front, and its refusals."""
import json
import os

import numpy as np
import pytest

from conftest import make_spec, random_images
from xnorcdl import calibrate, design_space, engine, explore
from xnorcdl.energy import energy_summary, load_energy_table
from xnorcdl.format import random_weights, save_weights
from xnorcdl.api import make_executor
from xnorcdl.model import load_model
from xnorcdl.records import pack_records

pytest.importorskip("matplotlib")

#: a tiny grid with the roles of the real one: joint single-exit points of two bit depths, a
#: separate-optimization point and a two-exit point (depth 8: three blocks of two convs)
GRID = {
    "r8_2E_1b.npz": dict(edge_convs=2, edge_bits=1, exits=[(2, 0.6)]),
    "r8_4E_1b.npz": dict(edge_convs=4, edge_bits=1, exits=[(4, 0.5)]),
    "r8_2E_2b.npz": dict(edge_convs=2, edge_bits=2, exits=[(2, 0.6)]),
    "r8_4E_2b.npz": dict(edge_convs=4, edge_bits=2, exits=[(4, 0.6)]),
    "r8_4E_1b_2exits.npz": dict(edge_convs=4, edge_bits=1, exits=[(2, 0.4), (4, 0.5)]),
    "r8_2E_1b_separate.npz": dict(edge_convs=2, edge_bits=1, exits=[(2, 0.6)],
                                  provenance={"strategy": "separate"}),
}
N_EVAL, N_CAL = 120, 150


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    folder = root / "grid"
    os.makedirs(folder / "partial")
    for k, (name, kw) in enumerate(GRID.items()):
        spec = make_spec(**kw)
        save_weights(str(folder / name), spec, random_weights(spec, seed=k))
    # a file in a sub-folder is not a point of the grid
    spec = make_spec(edge_convs=2, exits=[(2, 0.5)])
    save_weights(str(folder / "partial" / "ignored.npz"), spec, random_weights(spec, seed=99))
    fp = make_spec()
    save_weights(str(root / "fp.npz"), fp, random_weights(fp, seed=7))
    rng = np.random.default_rng(0)
    for name, n, seed in (("eval.bin", N_EVAL, 1), ("calib.bin", N_CAL, 2)):
        pack_records(random_images(n, seed), rng.integers(0, 10, n)).tofile(str(root / name))
    return root


@pytest.fixture(scope="module")
def result(grid):
    out = grid / "out"
    argv = ["--weights-dir", str(grid / "grid"), "--images", str(grid / "eval.bin"),
            "--calib", str(grid / "calib.bin"), "--rules", "stored,within:1",
            "--baseline", str(grid / "fp.npz"), "--out", str(out), "--no-progress",
            "--backend", "reference", "--batch-size", "32"]
    assert explore.main(argv) == 0
    with open(out / "design_space.json") as f:
        return grid, out, json.load(f)


def test_json_holds_every_point_with_its_figures(result):
    grid, _, doc = result
    assert doc["format"] == design_space.FORMAT and doc["version"] == design_space.VERSION
    assert [p["file"] for p in doc["points"]] == sorted(GRID)
    assert doc["evaluation"]["samples"] == N_EVAL and doc["calibration"]["samples"] == N_CAL
    assert set(doc["energy_tables"]) == {"default", "paper"}
    for p in doc["points"]:
        kw = GRID[p["file"]]
        assert p["edge_convs"] == kw["edge_convs"] and p["edge_bits"] == kw["edge_bits"]
        assert p["exits_after_conv"] == [a for a, _ in kw["exits"]]
        assert p["config"] == f"{kw['edge_convs']}E+{6 - kw['edge_convs']}C"
        assert p["final"] is True
        assert p["strategy"] == kw.get("provenance", {}).get("strategy", "joint")
        assert set(p["rules"]) == {"stored", "within:1"}
        assert p["rules"]["stored"]["thresholds"] == [t for _, t in kw["exits"]]
        for row in [p["no_exit"]] + list(p["rules"].values()):
            assert 0 <= row["accuracy"] <= 1 and 0 <= row["edge_fraction"] <= 1
            assert sum(row["exit_fractions"]) == pytest.approx(row["edge_fraction"])
            for t in ("default", "paper"):
                e = row["energy"][t]
                assert e["total_pJ"] == pytest.approx(e["edge_pJ"] + e["cloud_pJ"])
                assert row["vs_baseline"]["energy_ratio"][t] == pytest.approx(
                    doc["baseline"]["no_exit"]["energy"][t]["total_pJ"] / e["total_pJ"])
        assert p["no_exit"]["edge_fraction"] == 0.0


def test_figures_are_algorithm_1_replayed_and_priced_by_the_counter(result):
    """Each point's accuracy, exits and energies equal Algorithm 1 run by the engine with the
    same thresholds and priced by energy_summary (exact: the same counts and table)."""
    grid, _, doc = result
    from xnorcdl.records import read_records
    x, y = read_records(str(grid / "eval.bin"))
    xc, yc = read_records(str(grid / "calib.bin"))
    tables = {"default": load_energy_table(None), "paper": load_energy_table(explore.PAPER_TABLE)}
    for p in doc["points"]:
        model = load_model(str(grid / "grid" / p["file"]))
        ex = make_executor(model, "reference")
        thr = calibrate.calibrate(engine.outputs(model, xc, ex), yc, "within:1")
        assert p["rules"]["within:1"]["thresholds"] == pytest.approx(thr)
        for rule, t in (("within:1", thr), ("stored", [e.threshold for e in model.spec.exits])):
            res = engine.run(model, x, make_executor(model, "reference"), t)
            row = p["rules"][rule]
            assert row["accuracy"] == float((res.predictions == y).mean())
            assert row["edge_fraction"] == float((res.exit_index != engine.FINAL).mean())
            for name, table in tables.items():
                mean = energy_summary(model, res.exit_index, table)["mean_pJ_per_sample"]
                assert row["energy"][name]["edge_pJ"] == mean["edge"]
                assert row["energy"][name]["cloud_pJ"] == mean["cloud"]


def test_twins_are_compared_paired_sample_by_sample(result):
    """The joint/separate and one/two-exit twins get McNemar's exact test on the per-sample
    correctness of Algorithm 1 run by the engine with each file's thresholds."""
    grid, out, doc = result
    from xnorcdl.compare import mcnemar_exact
    from xnorcdl.records import read_records
    assert {(r["role"], r["a"], r["b"]) for r in doc["paired"]} == {
        ("joint vs separate", "r8_2E_1b.npz", "r8_2E_1b_separate.npz"),
        ("one vs more exits", "r8_4E_1b.npz", "r8_4E_1b_2exits.npz")}
    x, y = read_records(str(grid / "eval.bin"))
    points = {p["file"]: p for p in doc["points"]}
    for row in doc["paired"]:
        right = {}
        for name in (row["a"], row["b"]):
            model = load_model(str(grid / "grid" / name))
            p = points[name]
            right[name] = {}
            for rule, rec in [("no exit", p["no_exit"])] + list(p["rules"].items()):
                res = engine.run(model, x, make_executor(model, "reference"), rec["thresholds"])
                right[name][rule] = res.predictions == y
        assert set(row["correct"]) == {"no exit", "stored", "within:1"}
        for rule, c in row["correct"].items():
            a, b = right[row["a"]][rule], right[row["b"]][rule]
            assert (c["both"], c["only_a"], c["only_b"], c["neither"]) == (
                int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()),
                int((~a & ~b).sum()))
            assert c["p_value"] == mcnemar_exact(c["only_a"], c["only_b"])
    text = open(out / "tables.md").read()
    assert "McNemar" not in text   # the tables' rows are the 16E / 20E points, absent here
    from xnorcdl import paper_tables
    doc2 = json.loads(json.dumps(doc))
    for q in doc2["points"]:
        if q["file"] in ("r8_2E_1b.npz", "r8_2E_1b_separate.npz"):
            q["edge_convs"] = 16
    c = next(r for r in doc2["paired"] if r["role"] == "joint vs separate")["correct"]["stored"]
    note = paper_tables.table_ii(doc2, "stored").splitlines()[-1]
    assert "McNemar" in note and f"only with joint on {c['only_a']} images" in note
    assert f"only with separate on {c['only_b']}, p = {c['p_value']:.2g}" in note


def test_tables_show_the_counters_energies(result):
    """Table III's cells are the per-sample edge and cloud energies of the JSON, in uJ; Table IV
    has the one- and two-exit points of the 20E row (absent here: dashes)."""
    _, out, doc = result
    text = open(out / "tables.md").read()
    assert "### Table II" in text and "### Table III" in text and "### Table IV" in text
    assert "| CIFAR-10, paper | 24.1 | 52.8 | 88.72 | 89.16 |" in text
    doc2 = json.loads(json.dumps(doc))
    # put a grid point where Table III looks (16E, 1 bit) and check the cell is its energy
    p = next(q for q in doc2["points"] if q["file"] == "r8_4E_1b.npz")
    p["edge_convs"] = 16
    from xnorcdl import paper_tables
    table = paper_tables.table_iii(doc2, "stored")
    e = p["rules"]["stored"]["energy"]["default"]
    row = [ln for ln in table.splitlines() if ln.startswith("| 16E+14C")][1]
    assert f"| {e['edge_pJ'] / 1e6:.1f} | {e['cloud_pJ'] / 1e6:.1f} |" in row


def test_png_opens_and_svg_is_written(result):
    _, out, _ = result
    from PIL import Image
    with Image.open(out / "fig4_cifar10.png") as im:
        im.verify()
        assert im.size[0] > 400 and im.size[1] > 300
    assert open(out / "fig4_cifar10.svg").read().lstrip().startswith("<?xml")
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary file left


def test_pareto_front_is_the_non_dominated_set(result):
    _, _, doc = result
    pts = [(p["file"], p["rules"]["stored"]["accuracy"],
            p["rules"]["stored"]["energy"]["default"]["total_pJ"]) for p in doc["points"]]
    front = doc["pareto"]["default"]["with_exits"]
    for name, acc, en in pts:
        beaten = any(a >= acc and e <= en and (a > acc or e < en) for _, a, e in pts)
        assert (name in front) == (not beaten)
    assert design_space.pareto([("a", 0.9, 10.0), ("b", 0.8, 5.0), ("c", 0.8, 20.0),
                                ("d", 0.9, 10.0)]) == ["b", "a", "d"]


@pytest.mark.parametrize("argv,needle", [
    (["--rules", "sometimes"], "--rules"),
    (["--batch-size", "0"], "--batch-size"),
    (["--limit", "0"], "--limit"),
])
def test_bad_options_give_one_error_line(result, capsys, argv, needle):
    grid, _, _ = result
    base = ["--weights-dir", str(grid / "grid"), "--images", str(grid / "eval.bin"),
            "--baseline", "", "--out", str(grid / "bad")]
    assert explore.main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and "Traceback" not in err
    assert not os.path.exists(grid / "bad")


def test_partial_points_are_taken_only_where_no_final_file_exists(tmp_path):
    spec = make_spec(edge_convs=2, exits=[(2, 0.5)])
    os.makedirs(tmp_path / "partial")
    for path in ("a.npz", "partial/a.npz", "partial/b.npz", "partial/b.tmp.npz"):
        save_weights(str(tmp_path / path), spec, random_weights(spec))
    assert design_space.grid_files(str(tmp_path)) == [str(tmp_path / "a.npz")]
    assert design_space.grid_files(str(tmp_path), include_partial=True) == [
        str(tmp_path / "a.npz"), str(tmp_path / "partial" / "b.npz")]


def test_empty_folder_is_refused(tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    assert explore.main(["--weights-dir", str(tmp_path / "empty"), "--out",
                         str(tmp_path / "o")]) == 2
    assert "holds no .npz file" in capsys.readouterr().err


def test_workers_give_the_same_document(result):
    grid, out, doc = result
    argv = ["--weights-dir", str(grid / "grid"), "--images", str(grid / "eval.bin"),
            "--calib", str(grid / "calib.bin"), "--rules", "stored,within:1",
            "--baseline", str(grid / "fp.npz"), "--out", str(grid / "out2"), "--no-progress",
            "--backend", "reference", "--batch-size", "32", "--workers", "3"]
    assert explore.main(argv) == 0
    with open(grid / "out2" / "design_space.json") as f:
        doc2 = json.load(f)
    assert doc2.pop("seconds") >= 0 and doc.get("seconds") is not None
    assert doc2 == {k: v for k, v in doc.items() if k != "seconds"}
