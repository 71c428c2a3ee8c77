"""Training runs of the recipe (weights/recipe/train.py, PyTorch), each a few steps of a depth-8
network on synthetic images:

* a tiny run exports a loadable file, for both strategies of section II.B, and a rerun resumes
  from its checkpoint; a checkpoint of another configuration is refused;
* ``--time-budget``, ``--init`` (recorded chain), ``--strategy separate --epochs 0`` (exits only),
  ``--swa-every``, ``--select-by`` (the validated epoch with the best operating point, kept
  across a resume), distillation, gradient clipping, Adam, CUDA graphs and ``--compile``.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the training recipe needs torch (pip install -e .[train])")

from recipe_support import T, tiny_args  # noqa: E402
from xnorcdl.format import load_weights  # noqa: E402
from xnorcdl.model import load_model  # noqa: E402

import cifar_batches as B  # noqa: E402
import epoch_select as ES  # noqa: E402
import qat_resnet as Q  # noqa: E402
import train_export as X  # noqa: E402
import train_phases as P  # noqa: E402
import val_scoring as V  # noqa: E402


@pytest.mark.parametrize("strategy", ["joint", "separate"])
def test_tiny_run_exports_loadable_file(tmp_path, strategy):
    args = tiny_args(tmp_path, "--strategy", strategy)
    assert T.main(args) == 0
    spec, arrays = load_weights(str(tmp_path / "tiny.npz"))
    assert (spec.depth, spec.edge_convs, spec.edge_bits) == (8, 2, 1)
    assert [e.after_conv for e in spec.exits] == [2]
    prov = spec.provenance
    assert prov["command"].startswith("python weights/recipe/train.py ")
    assert prov["strategy"] == strategy and prov["epochs"] == 1
    assert "val_acc" in prov["validation"] and prov["validation"]["thresholds"] == \
        [spec.exits[0].threshold]
    load_model(str(tmp_path / "tiny.npz"))  # the engine prepares it
    # A rerun finds the finished checkpoint, trains nothing and exports the same arrays.
    os.rename(tmp_path / "tiny.npz", tmp_path / "first.npz")
    assert T.main(args) == 0
    _, again = load_weights(str(tmp_path / "tiny.npz"))
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], again[k], err_msg=k)


def test_resume_refuses_other_configuration(tmp_path):
    assert T.main(tiny_args(tmp_path)) == 0
    with pytest.raises(SystemExit, match="another configuration"):
        T.main(tiny_args(tmp_path, "--lr", "0.05"))


def test_time_budget_run_stops_on_time_and_records_what_it_did(tmp_path):
    args = tiny_args(tmp_path)
    args[args.index("--epochs"):args.index("--epochs") + 2] = ["--time-budget", "3"]
    args[args.index("--max-steps"):args.index("--max-steps") + 2] = []
    args += ["--eval-every", "1000"]
    import time as _time
    t0 = _time.time()
    assert T.main(args) == 0
    assert _time.time() - t0 < 60
    spec, _ = load_weights(str(tmp_path / "tiny.npz"))
    prov = spec.provenance
    assert prov["time_budget_s"] == 3.0 and prov["epochs"] >= 1
    hist = prov["history"]
    assert len(hist) == prov["epochs"] and prov["steps"] == sum(h["steps"] for h in hist)
    assert all(h["steps"] > 0 for h in hist)
    assert "val_acc" in hist[-1]  # the last epoch is always validated
    with pytest.raises(SystemExit, match="exactly one of --epochs"):
        T.main(tiny_args(tmp_path, "--time-budget", "3"))


def test_budget_ending_at_an_epoch_boundary_still_validates_the_last_epoch(tmp_path,
                                                                         monkeypatch):
    """When the clock runs out exactly between two epochs (the next epoch gets no step), the
    epoch before is the last one: it is validated like any last epoch."""
    real, calls = P.train_epoch, []

    def one_epoch_then_out_of_time(*a, **k):
        calls.append(1)
        return real(*a, **k) if len(calls) == 1 else (0.0, 0.0, 0)

    monkeypatch.setattr(P, "train_epoch", one_epoch_then_out_of_time)
    args = tiny_args(tmp_path)
    args[args.index("--epochs"):args.index("--epochs") + 2] = ["--time-budget", "600"]
    args += ["--eval-every", "1000"]
    assert T.main(args) == 0
    hist = load_weights(str(tmp_path / "tiny.npz"))[0].provenance["history"]
    assert len(calls) == 2 and len(hist) == 1 and hist[0]["steps"] > 0
    assert len(hist[0]["val_acc"]) == 2  # exit and head


def test_init_chain_is_recorded(tmp_path):
    assert T.main(tiny_args(tmp_path)) == 0
    first = str(tmp_path / "tiny.npz")
    args = tiny_args(tmp_path / "second", "--init", first)
    assert T.main(args) == 0
    spec, _ = load_weights(str(tmp_path / "second" / "tiny.npz"))
    prov = spec.provenance
    assert prov["init"] == first
    assert prov["init_sha256"] == hashlib.sha256(open(first, "rb").read()).hexdigest()
    assert prov["init_provenance"]["command"] == load_weights(first)[0].provenance["command"]


def test_exits_only_run_trains_the_exits_and_nothing_else(tmp_path):
    """separate, --epochs 0 --exit-epochs N --init FILE: phase 1 is skipped; every conv, BN and
    head array is exported exactly as in FILE, the exit's arrays are trained."""
    assert T.main(tiny_args(tmp_path)) == 0
    first = str(tmp_path / "tiny.npz")
    _, before = load_weights(first)
    args = tiny_args(tmp_path / "exits", "--init", first, "--strategy", "separate",
                      "--exit-epochs", "2")
    args[args.index("--epochs") + 1] = "0"
    assert T.main(args) == 0
    spec, after = load_weights(str(tmp_path / "exits" / "tiny.npz"))
    assert sorted(after) == sorted(before)
    exit_keys = [k for k in before if k.startswith("exit")]
    assert exit_keys
    for k in before:
        if k in exit_keys:
            assert not np.array_equal(before[k], after[k]), k
        else:
            np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    prov = spec.provenance
    assert (prov["strategy"], prov["epochs"], prov["exit_epochs"]) == ("separate", 0, 2)
    assert [h["phase"] for h in prov["history"]] == ["exits", "exits"]
    no_init = [a for a in args if a not in ("--init", first)]
    with pytest.raises(SystemExit, match="existing hybrid"):
        T.main(no_init)


def test_swa_run_exports_the_average_and_resumes_to_the_same_file(tmp_path, monkeypatch):
    """--swa-every 1 --swa-start 0.4 over 2 epochs x 3 steps averages steps 3..6 and writes
    <out>_swa.npz (same arrays as --out, other values); a run interrupted after epoch 1 (one
    snapshot taken) and resumed writes the same averaged file as the uninterrupted run."""
    def args(d):
        a = tiny_args(d, "--swa-every", "1", "--swa-start", "0.4")
        a[a.index("--epochs") + 1] = "2"
        a[a.index("--max-steps") + 1] = "3"
        return a
    assert T.main(args(tmp_path / "a")) == 0
    _, last = load_weights(str(tmp_path / "a" / "tiny.npz"))
    spec, avg = load_weights(str(tmp_path / "a" / "tiny_swa.npz"))
    assert set(avg) == set(last)
    assert not np.array_equal(avg["conv1.weight"], last["conv1.weight"])
    assert spec.provenance["swa"] == {"every": 1, "start": 0.4, "snapshots": 4, "bn_passes": 1}
    load_model(str(tmp_path / "a" / "tiny_swa.npz"))
    assert "4 snapshots averaged" in open(tmp_path / "a" / "ckpt" / "train.log").read()

    real = X.validate_epoch

    def crash_in_epoch_2(model, data, cfg, state, entry, best_path):
        if entry["epoch"] == 2:
            raise KeyboardInterrupt
        return real(model, data, cfg, state, entry, best_path)
    monkeypatch.setattr(X, "validate_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        T.main(args(tmp_path / "b"))
    monkeypatch.setattr(X, "validate_epoch", real)
    assert T.main(args(tmp_path / "b")) == 0
    _, resumed = load_weights(str(tmp_path / "b" / "tiny_swa.npz"))
    for k in avg:
        np.testing.assert_array_equal(avg[k], resumed[k], err_msg=k)
    with pytest.raises(SystemExit, match="--swa-every averages one joint phase"):
        T.main(tiny_args(tmp_path / "c", "--swa-every", "1", "--strategy", "separate"))
    with pytest.raises(SystemExit, match="--swa-start lie in"):
        T.main(tiny_args(tmp_path / "c", "--swa-every", "1", "--swa-start", "1"))


def test_select_by_exports_the_best_validated_epoch(tmp_path):
    """--select-by scores every validated epoch; the chosen file is the epoch with the highest
    score (earliest among equals), and recalibrating it by the same rule at export gives the
    very figures it was chosen for (so it is that epoch's model, not the last one's)."""
    args = tiny_args(tmp_path, "--select-by", "exits:50", "--threshold-rule", "exits:50",
                      "--eval-every", "1")
    args[args.index("--epochs") + 1] = "3"
    assert T.main(args) == 0
    last = load_weights(str(tmp_path / "tiny.npz"))[0].provenance
    spec, _ = load_weights(str(tmp_path / "tiny_best.npz"))
    prov = spec.provenance
    hist = prov["history"]
    assert hist == last["history"] and all("select" in h for h in hist)
    scores = [(h["select"]["acc"], h["select"]["edge"]) for h in hist]
    want = max(range(len(hist)), key=lambda i: (scores[i], -i))
    sel = prov["selected"]
    assert (sel["by"], sel["epoch"], sel["phase"]) == ("exits:50", hist[want]["epoch"], "joint")
    assert (sel["val_acc"], sel["val_edge"]) == scores[want]
    assert prov["validation"]["val_acc"] == sel["val_acc"]
    assert round(sum(prov["validation"]["val_exit_fraction"]), 2) == sel["val_edge"]
    assert "selected" not in last
    load_model(str(tmp_path / "tiny_best.npz"))
    assert sel["init_point"] is None  # no --init


def test_select_by_scores_the_init_file_it_has_to_beat(tmp_path):
    assert T.main(tiny_args(tmp_path)) == 0
    first = str(tmp_path / "tiny.npz")
    args = tiny_args(tmp_path / "second", "--init", first, "--select-by", "exits:50")
    assert T.main(args) == 0
    sel = load_weights(str(tmp_path / "second" / "tiny_best.npz"))[0].provenance["selected"]
    model = Q.model_from_file(first)
    data = B.Data(B.VAL_SIZE, 64, 32, synthetic=True, seed=3)
    val = V.predict(model, data.x_val)
    want = ES.operating_point([l.numpy() for l in val], data.y_val.numpy(), "exits:50")
    assert sel["init_point"] == {"acc": want["acc"], "edge": want["edge"]}


def test_select_images_scores_on_the_first_images_only(tmp_path):
    """--select-images N: the init point and every epoch's score use validation images 0..N-1;
    the chosen file's recorded score is its operating point on those images, not on all."""
    assert T.main(tiny_args(tmp_path)) == 0
    first = str(tmp_path / "tiny.npz")
    args = tiny_args(tmp_path / "sel", "--init", first, "--select-by", "exits:50",
                      "--select-images", "12", "--eval-every", "1")
    args[args.index("--epochs") + 1] = "2"
    assert T.main(args) == 0
    prov = load_weights(str(tmp_path / "sel" / "tiny_best.npz"))[0].provenance
    sel = prov["selected"]
    assert sel["val_images"] == 12
    data = B.Data(B.VAL_SIZE, 64, 32, synthetic=True, seed=3)
    y = data.y_val.numpy()
    for path, got in ((first, sel["init_point"]),
                      (str(tmp_path / "sel" / "tiny_best.npz"),
                       {"acc": sel["val_acc"], "edge": sel["val_edge"]})):
        val = [l.numpy() for l in V.predict(Q.model_from_file(path), data.x_val)]
        want = ES.operating_point([l[:12] for l in val], y[:12], "exits:50")
        assert got == {"acc": want["acc"], "edge": want["edge"]}, path
        full = ES.operating_point(val, y, "exits:50")
        assert (full["acc"], full["edge"]) != (want["acc"], want["edge"])  # the subset matters
    with pytest.raises(SystemExit, match="give --select-by"):
        T.main(tiny_args(tmp_path / "a", "--select-images", "12"))
    with pytest.raises(SystemExit, match="leave some for the comparison"):
        T.main(tiny_args(tmp_path / "b", "--select-by", "exits:50", "--select-images", "32"))


def test_select_by_keeps_an_early_epoch_and_survives_a_resume(tmp_path, monkeypatch):
    """Scores falling epoch by epoch: epoch 1 is exported (its weights differ from the last
    epoch's), and a rerun of the finished command exports the same file again."""
    calls = []

    def falling(logits, labels, rule):
        calls.append(1)
        return {"rule": rule, "thresholds": [0.1], "acc": 50.0, "edge": 10.0,
                "score": [-float(len(calls)), 0.0]}

    monkeypatch.setattr(X, "operating_point", falling)
    args = tiny_args(tmp_path, "--select-by", "accuracy:50", "--select-out",
                      str(tmp_path / "chosen.npz"))
    args[args.index("--epochs") + 1] = "3"
    assert T.main(args) == 0
    assert len(calls) == 3
    _, last = load_weights(str(tmp_path / "tiny.npz"))
    spec, chosen = load_weights(str(tmp_path / "chosen.npz"))
    assert spec.provenance["selected"]["epoch"] == 1
    assert any(not np.array_equal(last[k], chosen[k]) for k in last if k.startswith("conv"))
    os.rename(tmp_path / "chosen.npz", tmp_path / "first.npz")
    assert T.main(args) == 0
    _, again = load_weights(str(tmp_path / "chosen.npz"))
    for k in chosen:
        np.testing.assert_array_equal(chosen[k], again[k], err_msg=k)
    with pytest.raises(SystemExit, match="--select-by"):
        T.main(tiny_args(tmp_path / "bad", "--select-by", "best:1"))
    with pytest.raises(SystemExit, match="--select-out must differ"):
        T.main(tiny_args(tmp_path / "bad", "--select-by", "exits:50", "--select-out",
                          str(tmp_path / "bad" / "tiny.npz")))


def test_distillation_run_records_its_teacher_and_changes_only_the_loss(tmp_path):
    assert T.main(tiny_args(tmp_path / "teacher")) == 0
    teacher = str(tmp_path / "teacher" / "tiny.npz")
    assert T.main(tiny_args(tmp_path / "plain")) == 0
    assert T.main(tiny_args(tmp_path / "zero", "--teacher", teacher, "--kd-weight", "0")) == 0
    assert T.main(tiny_args(tmp_path / "kd", "--teacher", teacher, "--kd-weight", "0.9")) == 0
    _, plain = load_weights(str(tmp_path / "plain" / "tiny.npz"))
    _, zero = load_weights(str(tmp_path / "zero" / "tiny.npz"))
    spec, kd = load_weights(str(tmp_path / "kd" / "tiny.npz"))
    # alpha = 0: the teacher's forward pass draws no random numbers and changes nothing.
    for k in plain:
        np.testing.assert_array_equal(plain[k], zero[k], err_msg=k)
    assert any(not np.array_equal(plain[k], kd[k]) for k in plain)
    rec = spec.provenance["teacher"]
    assert rec["path"] == teacher and (rec["kd_weight"], rec["kd_temp"]) == (0.9, 4.0)
    assert rec["sha256"] == hashlib.sha256(open(teacher, "rb").read()).hexdigest()
    assert load_weights(str(tmp_path / "plain" / "tiny.npz"))[0].provenance["teacher"] is None
    with pytest.raises(SystemExit, match="another configuration"):
        T.main(tiny_args(tmp_path / "kd", "--teacher", teacher, "--kd-weight", "0.5"))
    with pytest.raises(SystemExit, match="--kd-weight"):
        T.main(tiny_args(tmp_path / "bad", "--teacher", teacher, "--kd-weight", "1.5"))


def test_gradient_clipping_bounds_the_step(tmp_path):
    # With the global gradient norm clipped to ~0 and no weight decay, the learning rate no
    # longer matters: two runs at different rates end where they started (same seed).
    outs = {}
    for lr, clip in (("0.1", "1e-12"), ("0.05", "1e-12"), ("0.1", "0")):
        d = tmp_path / f"{lr}-{clip}"
        assert T.main(tiny_args(d, "--clip-grad", clip, "--wd", "0", "--lr", lr)) == 0
        spec, outs[lr, clip] = load_weights(str(d / "tiny.npz"))
        assert spec.provenance["clip_grad"] == (float(clip) or None)
    a, b, free = outs["0.1", "1e-12"], outs["0.05", "1e-12"], outs["0.1", "0"]
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)
    assert any(np.abs(free[k] - a[k]).max() > 1e-3 for k in free)  # unclipped, they move


def test_adam_first_step_moves_every_weight_by_the_learning_rate(tmp_path):
    # Adam's first update is lr * g / (|g| + eps): the same size for every element whatever its
    # gradient; SGD's is proportional to the gradient. --lr 0 gives the starting point (the
    # first step of a one-step schedule runs at lr / 1000: 1e-3, far above float32 rounding).
    moved = {}
    for name, extra in (("start", ("--lr", "0")), ("adam", ("--optimizer", "adam")),
                        ("sgd", ("--optimizer", "sgd"))):
        d = tmp_path / name
        assert T.main(tiny_args(d, "--wd", "0", "--max-steps", "1", "--lr", "1", *extra)) == 0
        spec, moved[name] = load_weights(str(d / "tiny.npz"))
        assert spec.provenance["optimizer"] == ("adam" if name == "adam" else "sgd")
    for k, w0 in moved["start"].items():
        if w0.ndim < 2:
            continue
        same = {}  # fraction of elements that moved by the largest step, within 1 %
        for opt in ("adam", "sgd"):
            step = np.abs(moved[opt][k] - w0)
            same[opt] = np.mean(np.abs(step / step.max() - 1.0) < 0.01)
        # (a few elements have |g| near Adam's eps = 1e-8 and move less)
        assert same["adam"] > 0.95 and same["sgd"] < 0.5, (k, same)


def test_resume_refuses_another_optimizer(tmp_path):
    assert T.main(tiny_args(tmp_path)) == 0
    with pytest.raises(SystemExit, match="another configuration.*optimizer"):
        T.main(tiny_args(tmp_path, "--optimizer", "adam"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("edge_convs", [0, 2])
def test_cuda_graphs_train_as_the_ordinary_step(tmp_path, edge_convs):
    outs = {}
    for g in ("0", "1"):
        args = tiny_args(tmp_path / g, "--device", "cuda", "--cuda-graphs", g)
        args[args.index("--edge-convs") + 1] = str(edge_convs)
        args[args.index("--max-steps") + 1] = "4"
        if edge_convs == 0:
            args[args.index("--exits"):args.index("--exits") + 4] = []
        assert T.main(args) == 0
        outs[g] = load_weights(str(tmp_path / g / "tiny.npz"))[1]
    for k in outs["0"]:  # same kernels; only cuDNN's algorithm choice may differ
        np.testing.assert_allclose(outs["1"][k], outs["0"][k], rtol=0, atol=2e-3, err_msg=k)


def test_compiled_training_follows_the_ordinary_step(tmp_path):
    # torch.compile (student forward/backward and teacher) changes the float summation order
    # only: after 4 steps with distillation, the exported arrays stay within float noise of the
    # eager run. Graphs and compile are alternatives.
    assert T.main(tiny_args(tmp_path / "teacher")) == 0
    teacher = str(tmp_path / "teacher" / "tiny.npz")
    outs = {}
    for c in ("0", "1"):
        args = tiny_args(tmp_path / c, "--compile", c, "--teacher", teacher, "--clip-grad", "5")
        args[args.index("--max-steps") + 1] = "4"
        assert T.main(args) == 0
        outs[c] = load_weights(str(tmp_path / c / "tiny.npz"))[1]
    for k in outs["0"]:
        np.testing.assert_allclose(outs["1"][k], outs["0"][k], rtol=0, atol=2e-3, err_msg=k)
    init = load_weights(teacher)[1]  # and the compiled run did train
    assert any(np.abs(outs["1"][k] - init[k]).max() > 1e-3 for k in init if k != "meta.json")
    with pytest.raises(SystemExit, match="alternatives"):
        T.main(tiny_args(tmp_path / "both", "--compile", "1", "--cuda-graphs", "1"))
