"""The Python API against the infer command, and the README's example run as written."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_spec, random_images
from test_infer import write_cifar10
import xnorcdl
from xnorcdl import errors, infer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "weights", "r32_20E.npz")


def cifar10_test_ready() -> bool:
    from xnorcdl.data import cifar10_dir
    try:
        cifar10_dir(fetch=False, need=["test_batch.bin"])
    except errors.DataError:
        return False
    return True


def infer_json(tmp_path, argv):
    out = tmp_path / "infer.json"
    code = infer.main(argv + ["--no-progress", "--json", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def exit_codes(doc):
    return np.array([xnorcdl.CLOUD if s["exit"] == "final" else int(s["exit"][4:])
                     for s in doc["samples"]])


@pytest.fixture
def small(tmp_path, weights_file):
    spec = make_spec(edge_convs=4, exits=[(2, 0.6), (4, 1.2)])
    images = random_images(24, seed=5)
    labels = np.arange(24) % 10
    return weights_file(spec), images, labels, write_cifar10(tmp_path / "i.bin", images, labels)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_api_matches_the_infer_command(small, tmp_path, backend, capsys):
    w, images, labels, path = small
    net = xnorcdl.load(w)
    h = net.run(images, backend="reference", thresholds=0).entropies  # every exit measured
    thr = [float(np.median(h[:, 0])), float(np.median(h[:, 1]))]  # some leave at each exit
    doc = infer_json(tmp_path, ["--weights", w, "--images", path, "--backend", backend,
                                "--threshold", ",".join(repr(t) for t in thr)])
    res = net.run(images, backend=backend, thresholds=thr)
    assert res.predictions.tolist() == [s["prediction"] for s in doc["samples"]]
    assert res.exits.tolist() == exit_codes(doc).tolist()
    assert set(res.exits.tolist()) == {0, 1, xnorcdl.CLOUD}  # every outcome, so it can fail
    got = [[None if np.isnan(h) else float(h) for h in row] for row in res.entropies]
    assert got == [s["entropies"] for s in doc["samples"]]  # the same float64, exactly
    assert res.energy.report["total_pJ"] == doc["summary"]["energy"]["total_pJ"]
    assert res.energy.per_sample["total_pJ"].tolist() == [
        s["energy"]["total_pJ"] for s in doc["samples"]]
    assert res.accuracy(labels) == pytest.approx(doc["summary"]["accuracy"])


def test_thresholds_argument(small):
    w, images, _, _ = small
    net = xnorcdl.load(w)
    everything = net.run(images, backend="reference", thresholds=1e9)
    assert (everything.exits == 0).all() and everything.thresholds == [1e9, 1e9]
    nobody = net.run(images, backend="reference", thresholds=[0, 0])
    assert (nobody.exits == xnorcdl.CLOUD).all() and not nobody.at_edge.any()
    assert np.isnan(nobody.entropies).sum() == 0  # every exit was reached and measured
    assert (np.isnan(everything.entropies[:, 1])).all()  # exit 1 never reached
    default = net.run(images, backend="reference")
    assert default.thresholds == net.thresholds == [0.6, 1.2]


def test_energy_split_adds_up(small):
    w, images, _, _ = small
    e = xnorcdl.load(w).run(images, backend="reference").energy
    ps = e.per_sample
    np.testing.assert_allclose(ps["edge_pJ"] + ps["cloud_pJ"], ps["total_pJ"], rtol=1e-12)
    np.testing.assert_allclose(ps["compute_pJ"] + ps["memory_pJ"], ps["total_pJ"], rtol=1e-12)
    for k in ("edge", "cloud", "total"):  # sums in another order: float64 rounding only
        assert e.total[k] == pytest.approx(ps[f"{k}_pJ"].sum(), rel=1e-12)
        assert e.mean[k] == pytest.approx(e.total[k] / len(images), rel=1e-12)
    assert e.reduction > 1


def test_bad_arguments_raise_project_errors(small):
    w, images, _, _ = small
    net = xnorcdl.load(w)
    with pytest.raises(xnorcdl.DataError, match=r"uint8 \[N, 3, 32, 32\]"):
        net.run(images.astype(np.float32), backend="reference")
    with pytest.raises(xnorcdl.DataError, match="uint8"):
        net.run(images[:, :, :16], backend="reference")
    with pytest.raises(xnorcdl.UsageError, match="3 value"):
        net.run(images, backend="reference", thresholds=[1, 2, 3])
    with pytest.raises(xnorcdl.UsageError, match="finite and >= 0"):
        net.run(images, backend="reference", thresholds=-1)
    with pytest.raises(xnorcdl.UsageError, match="expected one of fast, reference"):
        net.run(images, backend="gpu")
    with pytest.raises(xnorcdl.WeightsError, match="no such file"):
        xnorcdl.load(os.path.join(os.path.dirname(w), "missing.npz"))


def test_import_is_light():
    code = ("import sys, xnorcdl; assert 'numpy' not in sys.modules, 'numpy'; "
            "xnorcdl.load; assert 'numba' not in sys.modules, 'numba'; print(xnorcdl.CLOUD)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "-1", r.stderr


def readme_python_block() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_block_is_limited_and_uses_the_shipped_weights():
    block = readme_python_block()
    assert 'xnorcdl.load("weights/r32_20E.npz")' in block
    sizes = [int(n) for n in re.findall(r"images\[:(\d+)\]", block)]
    assert sizes and max(sizes) <= 1000  # keeps the run below half a minute


@pytest.mark.skipif(not cifar10_test_ready(), reason="CIFAR-10 test batch not in the data cache")
def test_readme_block_runs_and_agrees_with_infer(tmp_path):
    block = readme_python_block()
    r = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    n = int(re.findall(r"images\[:(\d+)\]", block)[0])
    acc = float(re.search(r"^accuracy (\S+)$", r.stdout, re.M).group(1))
    edge = float(re.search(r"^left at the edge (\S+)$", r.stdout, re.M).group(1))
    doc = infer_json(tmp_path, ["--weights", SHIPPED, "--images", "test_batch.bin",
                                "--limit", str(n)])
    assert acc == doc["summary"]["accuracy"]
    assert edge == doc["summary"]["exits"][0]["fraction"]
