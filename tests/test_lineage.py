"""weights/lineage.py: the lineage of a weights file from its stored provenance.

* weights/LINEAGE.md holds, between marker comments, exactly what the script prints with
  ``--markdown`` for each shipped file (so the document cannot drift from the files);
* on a synthetic chain written with the project's writer (a run from scratch, a run from its
  file, a threshold recalibration), the steps come first run first, numbered 1..3, each with
  the sha256 of what it started from and gave;
* a provenance that cannot be read as a chain is refused with one ``error:`` line, status 2.

Engine-only: nothing here needs PyTorch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import re

import pytest

from xnorcdl.format import load_weights, random_weights, save_weights

from conftest import make_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "weights")
SHIPPED = ("r32_fp.npz", "r32_20E.npz", "r32_20E_separate.npz")


def _load_script():
    spec = importlib.util.spec_from_file_location("lineage", os.path.join(WEIGHTS, "lineage.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


L = _load_script()


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _readme_block(name: str) -> str:
    with open(os.path.join(WEIGHTS, "LINEAGE.md"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(rf"<!-- lineage weights/{re.escape(name)} begin -->\n(.*?)"
                  rf"<!-- lineage weights/{re.escape(name)} end -->", text, re.S)
    assert m, f"weights/LINEAGE.md has no lineage block for weights/{name}"
    return m.group(1)


@pytest.mark.parametrize("name", SHIPPED)
def test_readme_lineage_is_the_scripts_output(name):
    path = os.path.join(WEIGHTS, name)
    want = L.render(path, markdown=True, label=f"weights/{name}")
    assert _readme_block(name) == want, (
        f"weights/LINEAGE.md's lineage of {name} differs from "
        f"`python weights/lineage.py weights/{name} --markdown`; paste the script's output")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_lineage_ends_at_the_file(name):
    path = os.path.join(WEIGHTS, name)
    spec, _ = load_weights(path)
    steps = L.lineage(spec.provenance, _sha(path))
    assert [s["n"] for s in steps] == list(range(1, len(steps) + 1))
    assert steps[0]["kind"] == "train" and steps[0]["from"] is None  # from scratch
    assert steps[-1]["gave"] == _sha(path)
    for prev, s in zip(steps, steps[1:]):  # each step starts from what the one before gave
        start = s["from"]["sha256"] if s["kind"] == "train" else s["source_sha256"]
        assert start == prev["gave"]


def _run(command: str, init: str = None, **extra) -> dict:
    prov = {"command": command, "strategy": "joint", "epochs": 3, "exit_epochs": 0,
            "steps": 30, "wall_time_s": 12.5, "machine": "test machine", "date": "2026-01-01T00:00:00Z"}
    if init is not None:
        spec, _ = load_weights(init)
        prov.update(init=init, init_sha256=_sha(init), init_provenance=spec.provenance)
    prov.update(extra)
    return prov


@pytest.fixture
def chain(tmp_path):
    """first.npz (from scratch) -> second.npz (from first.npz, a teacher, then recalibrated)."""
    spec = make_spec(edge_convs=2, exits=[(2, 0.5)])
    first, second = str(tmp_path / "first.npz"), str(tmp_path / "second.npz")
    save_weights(first, dataclasses.replace(spec, provenance=_run("train first")),
                 random_weights(spec, 0))
    teacher = {"path": first, "sha256": _sha(first), "kd_weight": 0.9, "kd_temp": 4.0}
    trained = str(tmp_path / "trained.npz")
    prov = _run("train second", init=first, teacher=teacher,
                selected={"by": "exits:50", "phase": "joint", "epoch": 2})
    save_weights(trained, dataclasses.replace(spec, provenance=prov), random_weights(spec, 1))
    recal = {"rule": "accuracy:80", "calibration": "calib.bin", "samples": 100,
             "source_sha256": _sha(trained), "previous": [0.5], "thresholds": [0.25]}
    prov = dict(prov, recalibrations=[recal])
    save_weights(second, dataclasses.replace(spec.with_thresholds([0.25]), provenance=prov),
                 random_weights(spec, 1))
    return first, trained, second


def test_synthetic_chain_is_numbered_first_run_first(chain):
    first, trained, second = chain
    spec, _ = load_weights(second)
    steps = L.lineage(spec.provenance, _sha(second))
    assert [(s["n"], s["kind"]) for s in steps] == [(1, "train"), (2, "train"), (3, "recalibration")]
    assert steps[0]["command"] == "train first" and steps[0]["from"] is None
    assert steps[1]["command"] == "train second"
    assert steps[1]["from"] == {"path": first, "sha256": _sha(first)}
    assert steps[1]["teacher"]["step"] == 1  # the teacher is the output of step 1
    assert [s["gave"] for s in steps] == [_sha(first), _sha(trained), _sha(second)]
    assert steps[1]["exported"].startswith("epoch 2")


def test_synthetic_chain_text_and_markdown(chain, capsys):
    first, trained, second = chain
    assert L.main([second]) == 0
    text = capsys.readouterr().out
    numbered = [ln for ln in text.splitlines() if re.match(r"\s*\d+\. ", ln)]
    assert [ln.split(".")[0].strip() for ln in numbered] == ["1", "2", "3"]
    assert numbered[0].endswith("train first") and numbered[1].endswith("train second")
    assert "--rules accuracy:80 --write" in numbered[2]
    assert f"from {first} (sha256 {_sha(first)[:8]})" in text
    assert f"gave sha256 {_sha(second)[:8]}" in text.splitlines()[-1]
    md = L.render(second, markdown=True)
    items = re.findall(r"^(\d+)\. ", md, re.M)
    assert items == ["1", "2", "3"]
    assert md.index("train first") < md.index("train second") < md.index("accuracy:80 --write")
    assert md.rstrip().endswith(f"sha256 `{_sha(second)}`.")


def test_bad_provenance_is_one_error_line(tmp_path, capsys):
    spec = make_spec()
    path = str(tmp_path / "broken.npz")
    prov = {"command": "train", "init": "gone.npz"}  # names a source but not its sha256
    save_weights(path, dataclasses.replace(spec, provenance=prov), random_weights(spec))
    assert L.main([path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "init_sha256" in err[0]
    bare = str(tmp_path / "bare.npz")
    save_weights(bare, spec, random_weights(spec))
    assert L.main([bare]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bare}: provenance: missing")
    assert L.main([str(tmp_path / "none.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
