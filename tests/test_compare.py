"""xnorcdl.compare: paired comparison of two weights files on the same images.

* McNemar's exact p-value equals the two-sided binomial test on the discordant counts;
* the paired counts partition the samples and are those of the outcomes given;
* the command's rows are those of Algorithm 1 replayed with each file's own thresholds,
  calibrated on the compared images; a file against itself has no discordant sample, and
  swapping A and B swaps the counts;
* bad options and files give one error line naming what is wrong.
"""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats as scipy_stats  # the test extra's oracle for McNemar's exact p

from conftest import make_spec, random_images
from test_infer import write_cifar10
from xnorcdl import calibrate, compare, engine
from xnorcdl.backends.reference import ReferenceExecutor
from xnorcdl.model import load_model


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 400), st.integers(0, 400))
def test_mcnemar_exact_is_the_two_sided_binomial_test(a, b):
    want = 1.0 if a + b == 0 else scipy_stats.binomtest(a, a + b, 0.5).pvalue
    assert compare.mcnemar_exact(a, b) == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert compare.mcnemar_exact(a, b) == compare.mcnemar_exact(b, a)


@pytest.mark.parametrize("a, b", [(4900, 5100), (5000, 5000), (30, 9000)])
def test_mcnemar_exact_at_test_set_sizes(a, b):
    """Exact at the sizes of whole test sets, in well under a second each."""
    assert compare.mcnemar_exact(a, b) == pytest.approx(scipy_stats.binomtest(a, a + b).pvalue,
                                                        rel=1e-9, abs=1e-300)


def test_mcnemar_small_cases_by_hand_and_large_counts():
    assert compare.mcnemar_exact(0, 0) == 1.0
    assert compare.mcnemar_exact(3, 3) == 1.0
    assert compare.mcnemar_exact(0, 5) == pytest.approx(2 / 32)      # 2 * C(5,0) / 2^5
    assert compare.mcnemar_exact(1, 5) == pytest.approx(2 * 7 / 64)  # (C(6,0)+C(6,1)) / 2^6
    assert 0.0 <= compare.mcnemar_exact(1000, 1300) < 1e-9           # no float overflow
    with pytest.raises(ValueError):
        compare.mcnemar_exact(-1, 2)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=50))
def test_paired_counts_partition_the_samples(pairs):
    a = np.array([p[0] for p in pairs], bool)
    b = np.array([p[1] for p in pairs], bool)
    c = compare.paired(a, b)
    assert c["both"] + c["only_a"] + c["only_b"] + c["neither"] == len(pairs)
    assert c["both"] + c["only_a"] == a.sum() and c["both"] + c["only_b"] == b.sum()
    assert c["p_value"] == compare.mcnemar_exact(c["only_a"], c["only_b"])


@pytest.fixture
def files(tmp_path, weights_file):
    spec = make_spec(edge_convs=4, exits=[(4, 0.5)])
    a, b = weights_file(spec, seed=2, name="a.npz"), weights_file(spec, seed=5, name="b.npz")
    labels = np.arange(40) % 10
    ims = write_cifar10(tmp_path / "ims.bin", random_images(40, seed=3), labels)
    return a, b, ims, labels, tmp_path


def run(args, capsys):
    code = compare.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_command_rows_replay_algorithm_1_with_each_files_thresholds(files, capsys):
    a, b, ims, labels, _ = files
    rules = "within:1,exits:50"
    code, out, err = run(["--weights", a, b, "--images", ims, "--range", "5:35", "--rules", rules,
                          "--backend", "reference", "--json", "-", "--no-progress"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert "only A" in err and doc["samples"] == 30 and doc["images"].endswith("ims.bin[5:35]")
    assert doc["calibration"] is None and "calibrated per file on them" in err
    x, y = random_images(40, seed=3)[5:35], labels[5:35]
    outs = {}
    for tag, path in (("a", a), ("b", b)):
        m = load_model(path)
        outs[tag] = engine.outputs(m, x, ReferenceExecutor(m))
    assert [r["rule"] for r in doc["rules"]] == [compare.NO_EXIT] + rules.split(",")
    for r in doc["rules"]:
        verdict = {}
        for tag in "ab":
            thr = ([0.0] if r["rule"] == compare.NO_EXIT
                   else calibrate.calibrate(outs[tag], y, r["rule"]))
            assert r[tag]["thresholds"] == thr
            pred, where = calibrate.decide(outs[tag], thr)
            verdict[tag] = (pred == y, where != engine.FINAL)
            assert r[tag]["accuracy"] == pytest.approx(verdict[tag][0].mean())
        assert r["correct"] == compare.paired(verdict["a"][0], verdict["b"][0])
        assert r["edge"] == compare.paired(verdict["a"][1], verdict["b"][1])
    assert doc["rules"][0]["edge"]["both"] == 0  # no exit: nobody leaves
    assert doc["rules"][2]["a"]["edge_fraction"] <= 0.5


def test_held_out_calibration_takes_the_thresholds_from_the_calibration_set(files, capsys):
    """--calib FILE --calib-range: each file's thresholds are those calibrate() picks on the
    calibration records, and the compared images are scored with them."""
    a, b, ims, labels, tmp = files
    cal = write_cifar10(tmp / "cal.bin", random_images(30, seed=9), (np.arange(30) * 7) % 10)
    code, out, err = run(["--weights", a, b, "--images", ims, "--calib", cal, "--calib-range",
                          "4:26", "--rules", "within:1,exits:40", "--backend", "reference",
                          "--json", "-", "--no-progress"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["calibration"]["samples"] == 22 and doc["calibration"]["images"].endswith("[4:26]")
    assert "cal.bin[4:26] (22)" in err
    cx, cy = random_images(30, seed=9)[4:26], ((np.arange(30) * 7) % 10)[4:26]
    x = random_images(40, seed=3)
    for tag, path in (("a", a), ("b", b)):
        m = load_model(path)
        c_out = engine.outputs(m, cx, ReferenceExecutor(m))
        e_out = engine.outputs(m, x, ReferenceExecutor(m))
        for r in doc["rules"][1:]:
            thr = calibrate.calibrate(c_out, cy, r["rule"])
            assert r[tag]["thresholds"] == thr
            acc, fr = calibrate.conditional(e_out, labels, thr)
            assert r[tag]["accuracy"] == pytest.approx(acc)
            assert r[tag]["edge_fraction"] == pytest.approx(sum(fr))


def test_a_file_against_itself_and_swapped_files(files, capsys):
    a, b, ims, _, _ = files
    common = ["--images", ims, "--backend", "reference", "--json", "-", "--no-progress",
              "--rules", "within:2,exits:30"]
    code, out, err = run(["--weights", a, a] + common, capsys)
    assert code == 0, err
    for r in json.loads(out)["rules"]:
        for what in ("correct", "edge"):
            assert r[what]["only_a"] == r[what]["only_b"] == 0 and r[what]["p_value"] == 1.0
    docs = []
    for pair in ((a, b), (b, a)):
        code, out, err = run(["--weights", *pair] + common, capsys)
        assert code == 0, err
        docs.append(json.loads(out))
    for r, s in zip(*(d["rules"] for d in docs)):
        assert (r["a"], r["b"]) == (s["b"], s["a"])
        for what in ("correct", "edge"):
            assert (r[what]["only_a"], r[what]["only_b"]) == (s[what]["only_b"], s[what]["only_a"])
            assert r[what]["p_value"] == s[what]["p_value"]


@pytest.mark.parametrize("extra, message", [
    (["--rules", "within:x"], "--rules"),
    (["--rules", ","], "at least one rule"),
    (["--batch-size", "0"], "--batch-size"),
    (["--threads", "0"], "--threads"),
    (["--range", "30:10"], "--range 30:10: expected 0 <= A < B <= 40"),
    (["--range", "7"], "--range: expected A:B"),
    (["--calib-range", "0:10"], "needs --calib validation or a file"),
])
def test_option_errors(files, capsys, extra, message):
    a, b, ims, _, _ = files
    code, out, err = run(["--weights", a, b, "--images", ims, "--backend", "reference",
                          "--no-progress"] + extra, capsys)
    assert code == 2 and err.startswith("error:") and message in err and out == "", err


def test_file_errors(files, capsys, weights_file, tmp_path):
    a, b, ims, _, _ = files
    cut = tmp_path / "cut.bin"
    cut.write_bytes(open(ims, "rb").read()[:5000])
    code, _, err = run(["--weights", a, b, "--images", str(cut), "--no-progress"], capsys)
    assert code == 2 and "cut.bin" in err, err
    two = weights_file(make_spec(edge_convs=4, exits=[(2, 0.5), (4, 0.5)]), name="two.npz")
    code, _, err = run(["--weights", a, two, "--images", ims, "--no-progress"], capsys)
    assert code == 2 and "not comparable" in err and "two.npz" in err, err
    code, _, err = run(["--weights", a, str(tmp_path / "none.npz"), "--images", ims], capsys)
    assert code == 2 and "none.npz" in err, err
    bad = str(tmp_path / "no" / "dir" / "c.json")
    code, out, err = run(["--weights", a, b, "--images", ims, "--json", bad], capsys)
    assert code == 2 and "--json" in err and out == "", err
