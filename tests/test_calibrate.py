"""Threshold calibration and Algorithm 1 replayed on stored logits (xnorcdl.calibrate,
engine.outputs), and the tradeoff command end to end on small generated files."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import make_spec, random_images
from test_infer import write_cifar10
from xnorcdl import backends, calibrate, engine, tradeoff
from xnorcdl.backends.reference import ReferenceExecutor
from xnorcdl.format import load_weights
from xnorcdl.model import load_model


# ------------------------------------------------------------------ replay equals Algorithm 1

@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("exits", [[(4, 0.0)], [(2, 0.0), (4, 0.0)]])
def test_replay_on_outputs_equals_algorithm_1(weights_file, backend, exits):
    """decide(outputs(...), t) gives the predictions and exits of engine.run(..., t), for
    thresholds that split the batch at every exit, none, and all."""
    model = load_model(weights_file(make_spec(edge_convs=4, exits=exits), seed=len(exits)))
    images = random_images(40, seed=3)
    outs = engine.outputs(model, images, backends.get(backend)(model), batch_size=7)
    assert len(outs) == len(exits) + 1 and all(o.shape == (40, 10) for o in outs)
    med = [float(np.median(engine.entropy(o))) for o in outs[:-1]]
    for thr in (med, [0.0] * len(exits), [1e9] * len(exits)):
        res = engine.run(model, images, backends.get(backend)(model), thr, batch_size=5)
        pred, where = calibrate.decide(outs, thr)
        np.testing.assert_array_equal(where, res.exit_index)
        np.testing.assert_array_equal(pred, res.predictions)
    assert len(set(calibrate.decide(outs, med)[1].tolist())) > 1


def test_outputs_follow_the_executor_per_sample(weights_file):
    """Each row is the executor's logits for that sample alone, to float32 rounding (the BLAS
    of the float32 layers may block a batch of 9 differently from one of 1)."""
    model = load_model(weights_file(make_spec(edge_convs=4, exits=[(4, 0.5)])))
    images = random_images(9, seed=5)
    ex = ReferenceExecutor(model)
    got = engine.outputs(model, images, ex, batch_size=4)
    for i in range(len(images)):
        state = ex.block(0, ex.stem(images[i:i + 1]))
        state = ex.block(1, state)
        np.testing.assert_allclose(got[0][i], ex.exit(0, state)[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1][i], ex.head(ex.block(2, state))[0], rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------- calibration vs a scan

def scan(outputs, labels, rule):
    """Oracle: try every candidate threshold by replaying Algorithm 1 in full."""
    kind, value = calibrate.parse_rule(rule)
    n, k_exits = len(labels), len(outputs) - 1
    if kind == "fixed":
        return [value] * k_exits
    base = float((outputs[-1].argmax(1) == labels).mean())
    chosen = []
    for k in range(k_exits):
        undecided = calibrate.decide(outputs, chosen + [0.0] * (k_exits - k))[1] == engine.FINAL
        h = np.unique(engine.entropy(outputs[k])[undecided])
        if len(h) == 0:
            h = np.zeros(1)
        best = 0.0
        for t in np.concatenate([[0.0], (h[:-1] + h[1:]) / 2, [h[-1] + 1e-6]]):
            thr = chosen + [float(t)] + [0.0] * (k_exits - k - 1)
            acc, fr = calibrate.conditional(outputs, labels, thr)
            if kind == "within":
                ok = acc >= base - value / 100 - 1e-12
            elif kind == "accuracy":
                ok = acc >= value / 100 - 1e-12
            else:
                ok = sum(fr) <= value / 100 + 1e-12
            if ok:
                best = float(t)
        chosen.append(best)
    return chosen


@st.composite
def logits_sets(draw):
    n = draw(st.integers(1, 60))
    k = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    coarse = draw(st.booleans())  # small integer logits: many equal entropies (ties)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    outs = []
    for _ in range(k + 1):
        o = rng.integers(-2, 3, (n, 5)) if coarse else rng.normal(0, 2, (n, 5))
        o = o.astype(np.float32)
        o[np.arange(n), labels] += rng.uniform(0, 4, n).astype(np.float32) * (rng.random() < 0.8)
        outs.append(o)
    return outs, labels


@settings(max_examples=80, deadline=None)
@given(logits_sets(), st.sampled_from(["within:0", "within:0.5", "within:3", "within:100",
                                       "exits:0", "exits:30", "exits:59.3", "exits:100",
                                       "accuracy:0", "accuracy:40", "accuracy:75",
                                       "accuracy:100", "fixed:0.5"]))
def test_calibrate_equals_exhaustive_scan(data, rule):
    outs, labels = data
    got = calibrate.calibrate(outs, labels, rule)
    assert got == pytest.approx(scan(outs, labels, rule), abs=0, rel=0)
    acc, fr = calibrate.conditional(outs, labels, got)
    kind, value = calibrate.parse_rule(rule)
    if kind == "within":
        assert acc >= float((outs[-1].argmax(1) == labels).mean()) - value / 100 - 1e-12
    elif kind == "exits":
        assert sum(fr) <= value / 100 + 1e-12
    elif kind == "accuracy" and any(got):  # all 0: the target is out of reach (scan agrees)
        assert acc >= value / 100 - 1e-12


def test_calibrate_takes_the_largest_threshold_that_keeps_the_rule():
    # exit: samples 0..5 right and confident, 6..9 wrong and less confident; head always right
    n = 10
    labels = np.zeros(n, np.int64)
    head = np.tile(np.float32([5, 0, 0]), (n, 1))
    exit_ = np.zeros((n, 3), np.float32)
    exit_[:6, 0] = np.linspace(9, 4, 6)
    exit_[6:, 1] = np.linspace(3.5, 2, 4)
    h = engine.entropy(exit_)
    outs = [exit_, head]
    t = calibrate.calibrate(outs, labels, "within:0")[0]
    assert h[5] < t < h[6]           # all six right ones leave, no wrong one
    t10 = calibrate.calibrate(outs, labels, "within:10")[0]
    assert h[6] < t10 < h[7]         # one wrong sample (10 points) allowed
    t30 = calibrate.calibrate(outs, labels, "exits:30")[0]
    assert h[2] < t30 < h[3]         # three of ten leave
    assert calibrate.conditional(outs, labels, [t30])[1] == [0.3]
    t80 = calibrate.calibrate(outs, labels, "accuracy:80")[0]
    assert h[7] < t80 < h[8]         # two wrong samples leave: 80 % overall
    assert calibrate.conditional(outs, labels, [t80]) == (0.8, [0.8])
    assert calibrate.calibrate([exit_, exit_], labels, "accuracy:70")[0] == 0.0  # head at 60 %


@pytest.mark.parametrize("rule", ["within", "within:", "within:x", "within:-1", "exits:101",
                                  "accuracy:101", "accuracy:-1", "accuracy",
                                  "fixed:nan", "median:1", ""])
def test_bad_rules_are_refused(rule):
    with pytest.raises(ValueError, match="threshold rule"):
        calibrate.parse_rule(rule)


def test_mismatched_inputs_are_refused():
    o = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="labels"):
        calibrate.calibrate([o, o], np.zeros(5, np.int64), "within:1")
    with pytest.raises(ValueError, match="same N"):
        calibrate.decide([o, np.zeros((5, 3), np.float32)], [0.1])
    with pytest.raises(ValueError, match="threshold"):
        calibrate.decide([o, o], [0.1, 0.2])


# ------------------------------------------------------------------------ the command

@pytest.fixture
def files(tmp_path, weights_file):
    w = weights_file(make_spec(edge_convs=4, exits=[(4, 0.5)]), seed=2)
    cal = write_cifar10(tmp_path / "cal.bin", random_images(30, seed=1), np.arange(30) % 10)
    ev = write_cifar10(tmp_path / "ev.bin", random_images(20, seed=2), (np.arange(20) * 3) % 10)
    return w, cal, ev, tmp_path


def run(args, capsys):
    code = tradeoff.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_command_table_json_and_write(files, capsys):
    w, cal, ev, tmp = files
    out_w = str(tmp / "recal.npz")
    rules = "within:1,exits:50,fixed:0.5"
    code, out, err = run(["--weights", w, "--calib", cal, "--images", ev, "--rules", rules,
                          "--backend", "reference", "--json", "-", "--write", out_w,
                          "--no-progress"], capsys)
    assert code == 0, err
    doc = json.loads(out)                       # stdout holds only the JSON
    assert "within:1" in err and "wrote" in err  # the table went to stderr
    model = load_model(w)
    ex = ReferenceExecutor(model)
    c_lab, e_lab = np.arange(30) % 10, (np.arange(20) * 3) % 10
    c_out = engine.outputs(model, random_images(30, seed=1), ex)
    e_out = engine.outputs(model, random_images(20, seed=2), ex)
    assert [r["rule"] for r in doc["rules"]] == rules.split(",")
    for r in doc["rules"]:
        thr = calibrate.calibrate(c_out, c_lab, r["rule"])
        assert r["thresholds"] == thr
        for name, outs, lab in (("calibration", c_out, c_lab), ("evaluation", e_out, e_lab)):
            acc, fr = calibrate.conditional(outs, lab, thr)
            assert r[name]["accuracy"] == pytest.approx(acc)
            assert r[name]["edge_fraction"] == pytest.approx(sum(fr))
            assert r[name]["energy_pJ_per_sample"] > 0
    assert doc["rules"][1]["calibration"]["edge_fraction"] <= 0.5
    spec, arrays = load_weights(out_w)
    old_spec, old_arrays = load_weights(w)
    assert [e.threshold for e in spec.exits] == doc["rules"][0]["thresholds"]
    rec = spec.provenance["recalibrations"][-1]
    assert rec["rule"] == "within:1" and rec["previous"] == [0.5] and rec["samples"] == 30
    for k in old_arrays:
        np.testing.assert_array_equal(arrays[k], old_arrays[k])


def test_calib_range_calibrates_on_those_records_only(files, capsys):
    """--calib-range 10:25 gives the thresholds and calibration figures of a file holding only
    records 10..24, and names the range; the evaluation set is untouched."""
    w, cal, ev, tmp = files
    part = write_cifar10(tmp / "part.bin", random_images(30, seed=1)[10:25],
                         (np.arange(30) % 10)[10:25])
    docs = []
    for calib, extra in ((cal, ["--calib-range", "10:25"]), (part, [])):
        code, out, err = run(["--weights", w, "--calib", calib, "--images", ev, "--rules",
                              "within:1,exits:40", "--backend", "reference", "--json", "-",
                              "--no-progress"] + extra, capsys)
        assert code == 0, err
        docs.append(json.loads(out))
    ranged, whole = docs
    assert ranged["calibration"]["images"].endswith("cal.bin[10:25]")
    assert ranged["calibration"]["samples"] == 15
    assert ranged["rules"] == whole["rules"]


def test_command_table_columns_line_up_for_long_rules(files, capsys):
    w, cal, ev, tmp = files
    rules = "accuracy:12.345,within:1,exits:50"
    code, out, err = run(["--weights", w, "--calib", cal, "--images", ev, "--rules", rules,
                          "--backend", "reference", "--no-progress"], capsys)
    assert code == 0, err
    rows = [ln for ln in (out + err).splitlines() if ln.startswith(("rule ", "accuracy:", "within:",
                                                                   "exits:"))]
    assert len(rows) == 4
    assert len({ln.index("|") for ln in rows}) == 1         # every row's first bar in one column
    assert len({ln.rindex("|") for ln in rows}) == 1


@pytest.mark.parametrize("extra, message", [
    (["--rules", "within:x"], "--rules"),
    (["--rules", ","], "at least one rule"),
    (["--batch-size", "0"], "--batch-size"),
    (["--calib", "validation", "--format", "cifar100"], "cifar100"),
    (["--calib-range", "5"], "expected A:B"),
    (["--calib-range", "x:9"], "expected A:B"),
    (["--calib-range", "20:10"], "0 <= A < B <= 30"),
    (["--calib-range", "0:31"], "0 <= A < B <= 30"),
])
def test_command_option_errors(files, capsys, extra, message):
    w, cal, ev, _ = files
    code, _, err = run(["--weights", w, "--calib", cal, "--images", ev, "--backend", "reference",
                        "--no-progress"] + extra, capsys)
    assert code == 2 and err.startswith("error:") and message in err, err


def test_command_file_errors(files, capsys, weights_file, tmp_path):
    w, cal, ev, _ = files
    cut = tmp_path / "cut.bin"
    cut.write_bytes(open(cal, "rb").read()[:5000])
    code, _, err = run(["--weights", w, "--calib", str(cut), "--images", ev, "--no-progress"],
                       capsys)
    assert code == 2 and "cut.bin" in err, err
    no_exit = weights_file(make_spec(edge_convs=4), name="noexit.npz")
    code, _, err = run(["--weights", no_exit, "--calib", cal, "--images", ev], capsys)
    assert code == 2 and "no early exit" in err, err
    out_w = tmp_path / "never.npz"
    code, _, err = run(["--weights", w, "--calib", cal, "--images", str(tmp_path / "nope.bin"),
                        "--write", str(out_w)], capsys)
    assert code == 2 and "nope.bin" in err and not out_w.exists(), err


@pytest.mark.parametrize("command", ["infer", "tradeoff", "summary"])
def test_json_to_stdout_is_pure_and_unwritable_path_is_one_error(files, capsys, command):
    """--json - leaves only the JSON on stdout; a JSON path that cannot be written is refused
    before any work: one error line naming the option and the path, status 2, nothing printed
    or written (not even the --write copy of tradeoff)."""
    from xnorcdl import infer, summary
    w, cal, ev, tmp = files
    main, args = {"infer": (infer.main, ["--weights", w, "--images", ev, "--backend", "reference",
                                         "--no-progress"]),
                  "tradeoff": (tradeoff.main, ["--weights", w, "--calib", cal, "--images", ev,
                                               "--backend", "reference", "--no-progress"]),
                  "summary": (summary.main, ["--weights", w])}[command]
    assert main(args + ["--json", "-"]) == 0
    json.loads(capsys.readouterr().out)
    bad = str(tmp / "no" / "such" / "dir" / "out.json")
    extra = ["--write", str(tmp / "recal.npz")] if command == "tradeoff" else []
    assert main(args + extra + ["--json", bad]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err.strip().splitlines() == [
        f"error: --json {bad}: folder {tmp / 'no' / 'such' / 'dir'} does not exist"]
    assert not list(tmp.glob("**/.xnorcdl-*")) and not (tmp / "recal.npz").exists()
    assert main(args + ["--json", str(tmp)]) == 2
    assert "is a folder" in capsys.readouterr().err
    if command == "tradeoff":
        nowhere = str(tmp / "none" / "recal.npz")
        assert main(args + ["--write", nowhere]) == 2
        cap = capsys.readouterr()
        assert cap.out == "" and f"error: --write {nowhere}: folder" in cap.err
