"""The training recipe (weights/recipe/train.py) and the shipped weights files (weights/*.npz).

* a tiny training run (depth 8, a few steps on synthetic images) exports a loadable file, for
  both strategies of section II.B, and a rerun resumes from its checkpoint;
* ``--cloud-only`` trains what follows the last exit and keeps every exit decision;
* ``--select-by`` exports the validated epoch with the best operating point (the score is what
  the rule leaves free), and keeps it across a resume;
* export then load is lossless, array by array, and the quantizer forward equals xnorcdl.quant;
* the PyTorch model in eval mode and the engine's reference executor agree on one file:
  logits within 1e-4 except where float32 summation order flips an activation code, decisions
  on >= 95% of samples (see test_torch_model_matches_engine);
* each shipped file reproduces the figures documented in weights/figures.json on a fixed subset
  of the CIFAR-10 test split through the engine (skipped when the data is not in the cache).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the training recipe needs torch (pip install -e .[train])")

from xnorcdl import engine  # noqa: E402
from xnorcdl.backends.reference import ReferenceExecutor  # noqa: E402
from xnorcdl.format import load_weights, random_weights, save_weights  # noqa: E402
from xnorcdl.model import load_model  # noqa: E402
from xnorcdl import quant  # noqa: E402
from xnorcdl.spec import ExitSpec, ModelSpec  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "weights")


def _load_recipe(name="train"):
    spec = importlib.util.spec_from_file_location(
        f"xnorcdl_recipe_{name}", os.path.join(WEIGHTS, "recipe", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


T = _load_recipe()  # puts the recipe's directory on sys.path for its own modules
import cifar_batches as B  # noqa: E402
import lr_schedule as S  # noqa: E402
import epoch_select as ES  # noqa: E402
import qat_resnet as Q  # noqa: E402
import val_scoring as V  # noqa: E402


def _tiny_args(tmp_path, *extra):
    return ["--depth", "8", "--edge-convs", "2", "--edge-bits", "1", "--exits", "2",
            "--exit-weights", "0.6", "--epochs", "1", "--synthetic", "--limit-train", "64",
            "--limit-val", "32", "--batch", "16", "--max-steps", "2", "--threads", "1",
            "--seed", "3", "--out", str(tmp_path / "tiny.npz"),
            "--ckpt-dir", str(tmp_path / "ckpt"), *extra]


@pytest.mark.parametrize("strategy", ["joint", "separate"])
def test_tiny_run_exports_loadable_file(tmp_path, strategy):
    args = _tiny_args(tmp_path, "--strategy", strategy)
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
    assert T.main(_tiny_args(tmp_path)) == 0
    with pytest.raises(SystemExit, match="another configuration"):
        T.main(_tiny_args(tmp_path, "--lr", "0.05"))


def test_uncropped_run_trains_differently_and_is_a_resume_key(tmp_path):
    """--uncropped reaches the batches (other weights after the same steps), is refused outside
    [0, 1], and a checkpoint of one value does not resume under another."""
    base = tmp_path / "base"
    assert T.main(_tiny_args(base)) == 0
    assert T.main(_tiny_args(tmp_path, "--uncropped", "1")) == 0
    _, a = load_weights(str(base / "tiny.npz"))
    _, b = load_weights(str(tmp_path / "tiny.npz"))
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="another configuration"):
        T.main(_tiny_args(tmp_path, "--uncropped", "0.5"))
    with pytest.raises(SystemExit, match="--uncropped"):
        T.main(_tiny_args(tmp_path / "bad", "--uncropped", "1.5"))


def test_batched_augmentation_equals_per_image_crops_and_flips():
    """Data.batches gathers the whole batch at once; it must equal cropping and flipping each
    image on its own with the same random draws (permutation, x/y offsets, flips)."""
    d = B.Data(8, 40, 8, synthetic=True, seed=5)
    batches = list(d.batches(16, torch.Generator().manual_seed(11)))
    gen = torch.Generator().manual_seed(11)
    perm = torch.randperm(40, generator=gen)
    assert len(batches) == 2
    for b, (imgs, labels) in enumerate(batches):
        idx = perm[16 * b:16 * (b + 1)]
        ox = torch.randint(0, 9, (16,), generator=gen)
        oy = torch.randint(0, 9, (16,), generator=gen)
        flip = torch.rand(16, generator=gen) < 0.5
        for r, i in enumerate(idx.tolist()):
            crop = d.padded[i, :, int(oy[r]):int(oy[r]) + 32, int(ox[r]):int(ox[r]) + 32]
            want = crop.flip(2) if flip[r] else crop
            assert torch.equal(imgs[r], want), (b, r)
        assert torch.equal(labels, d.y_train[idx])
    assert imgs.dtype == torch.uint8 and imgs.shape == (16, 3, 32, 32)


def test_uncropped_samples_are_the_image_itself_and_zero_changes_nothing():
    """--uncropped F: with F = 0 the batches are those drawn without the option (same stream);
    with F = 1 every sample is the image or its mirror; in between, the draws after the flips
    pick which samples are whole, and the others keep their random crops."""
    d = B.Data(8, 64, 8, synthetic=True, seed=3)
    plain = list(d.batches(32, torch.Generator().manual_seed(4)))
    same = list(d.batches(32, torch.Generator().manual_seed(4), 0.0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, same))
    for imgs, _ in d.batches(32, torch.Generator().manual_seed(4), 1.0):
        for r in range(len(imgs)):
            assert any(torch.equal(imgs[r], x) or torch.equal(imgs[r], x.flip(2))
                       for x in d.x_train), r
    gen = torch.Generator().manual_seed(9)
    half = list(d.batches(32, gen, 0.5))
    gen = torch.Generator().manual_seed(9)
    perm = torch.randperm(64, generator=gen)
    whole_count = 0
    for b, (imgs, _) in enumerate(half):
        idx = perm[32 * b:32 * (b + 1)]
        ox = torch.randint(0, 9, (32,), generator=gen)
        oy = torch.randint(0, 9, (32,), generator=gen)
        flip = torch.rand(32, generator=gen) < 0.5
        whole = torch.rand(32, generator=gen) < 0.5
        whole_count += int(whole.sum())
        for r, i in enumerate(idx.tolist()):
            y0, x0 = (4, 4) if whole[r] else (int(oy[r]), int(ox[r]))
            crop = d.padded[i, :, y0:y0 + 32, x0:x0 + 32]
            assert torch.equal(imgs[r], crop.flip(2) if flip[r] else crop), (b, r)
    assert 0 < whole_count < 64
    with pytest.raises(ValueError, match="uncropped"):
        next(d.batches(32, torch.Generator(), 1.5))


def test_padding_is_zero_and_crops_cover_every_offset():
    d = B.Data(8, 40, 8, synthetic=True, seed=1)
    assert d.padded.shape == (40, 3, 40, 40)
    assert int(d.padded[:, :, :4].max()) == 0 and int(d.padded[:, :, :, 36:].max()) == 0
    torch.testing.assert_close(d.padded[:, :, 4:36, 4:36], d.x_train, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["onecycle", "cosine", "constant"])
def test_time_schedule_has_the_shape_of_the_step_schedule(kind):
    """lr_at(p) is the curve the step-based schedulers follow, sampled at p = step / total."""
    total, lr, warm = 1000, 0.1, 0.15
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr, momentum=0.9)
    sched = S.make_sched(opt, kind, lr, total, warm)
    for step in range(total):
        got = opt.param_groups[0]["lr"]
        if kind == "onecycle":  # torch's OneCycleLR: phase 1 ends at step warm * total - 1
            e1 = warm * total - 1
            p = warm * step / e1 if step <= e1 else warm + (1 - warm) * (step - e1) / (total - 1 - e1)
        else:
            W = int(total * warm)
            p = (step + 1) / W * warm if step < W else warm + (step - W) / (total - W) * (1 - warm)
        np.testing.assert_allclose(S.lr_at(kind, lr, p, warm), got, rtol=1e-6, atol=1e-9,
                                   err_msg=f"step {step}")
        opt.step()
        sched.step()
    assert S.lr_at(kind, lr, 1.0, warm) == pytest.approx(
        {"onecycle": lr / 1000, "cosine": 0.0, "constant": lr}[kind])


def test_time_budget_run_stops_on_time_and_records_what_it_did(tmp_path):
    args = _tiny_args(tmp_path)
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
        T.main(_tiny_args(tmp_path, "--time-budget", "3"))


def test_budget_ending_at_an_epoch_boundary_still_validates_the_last_epoch(tmp_path,
                                                                         monkeypatch):
    """When the clock runs out exactly between two epochs (the next epoch gets no step), the
    epoch before is the last one: it is validated like any last epoch."""
    real, calls = T.train_epoch, []

    def one_epoch_then_out_of_time(*a, **k):
        calls.append(1)
        return real(*a, **k) if len(calls) == 1 else (0.0, 0.0, 0)

    monkeypatch.setattr(T, "train_epoch", one_epoch_then_out_of_time)
    args = _tiny_args(tmp_path)
    args[args.index("--epochs"):args.index("--epochs") + 2] = ["--time-budget", "600"]
    args += ["--eval-every", "1000"]
    assert T.main(args) == 0
    hist = load_weights(str(tmp_path / "tiny.npz"))[0].provenance["history"]
    assert len(calls) == 2 and len(hist) == 1 and hist[0]["steps"] > 0
    assert len(hist[0]["val_acc"]) == 2  # exit and head


def test_init_chain_is_recorded(tmp_path):
    assert T.main(_tiny_args(tmp_path)) == 0
    first = str(tmp_path / "tiny.npz")
    args = _tiny_args(tmp_path / "second", "--init", first)
    assert T.main(args) == 0
    spec, _ = load_weights(str(tmp_path / "second" / "tiny.npz"))
    prov = spec.provenance
    assert prov["init"] == first
    assert prov["init_sha256"] == hashlib.sha256(open(first, "rb").read()).hexdigest()
    assert prov["init_provenance"]["command"] == load_weights(first)[0].provenance["command"]


def test_exits_only_run_trains_the_exits_and_nothing_else(tmp_path):
    """separate, --epochs 0 --exit-epochs N --init FILE: phase 1 is skipped; every conv, BN and
    head array is exported exactly as in FILE, the exit's arrays are trained."""
    assert T.main(_tiny_args(tmp_path)) == 0
    first = str(tmp_path / "tiny.npz")
    _, before = load_weights(first)
    args = _tiny_args(tmp_path / "exits", "--init", first, "--strategy", "separate",
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


def test_cloud_only_run_keeps_every_exit_decision_and_trains_the_cloud(tmp_path):
    """--cloud-only --init FILE: the stem, the convs up to the last exit (BN statistics too) and
    the exit are exported exactly as in FILE, so the engine's exit logits are the same; the
    cloud convs and the head are trained; the focus is recorded."""
    assert T.main(_tiny_args(tmp_path)) == 0
    first = str(tmp_path / "tiny.npz")
    _, before = load_weights(first)
    args = _tiny_args(tmp_path / "cloud", "--init", first, "--cloud-only", "--cloud-focus",
                      "0.5:0.25", "--teacher", first)
    assert T.main(args) == 0
    out = str(tmp_path / "cloud" / "tiny.npz")
    spec, after = load_weights(out)
    frozen = [k for k in before if k.split(".")[0] in ("stem", "conv1", "conv2", "exit0")]
    trained = [k for k in before if k.split(".")[0] in ("conv3", "conv4", "conv5", "conv6", "head")]
    assert len(frozen) == 17 and len(trained) == 22 and len(frozen) + len(trained) == len(before)
    for k in frozen:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    for k in ("conv3.weight", "conv6.bn.mean", "head.weight"):  # weights and BN statistics
        assert not np.array_equal(before[k], after[k]), k
    assert spec.provenance["cloud_only"] == {"focus": [0.5, 0.25]}
    assert [h["phase"] for h in spec.provenance["history"]] == ["cloud"]
    x = np.random.default_rng(0).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    outs = [engine.outputs(m, x, ReferenceExecutor(m))
            for m in (load_model(first), load_model(out))]
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    assert not np.array_equal(outs[0][1], outs[1][1])


def test_cloud_only_and_focus_are_refused_where_they_mean_nothing(tmp_path):
    with pytest.raises(SystemExit, match="--cloud-only trains the cloud of an existing hybrid"):
        T.main(_tiny_args(tmp_path / "a", "--cloud-only"))
    with pytest.raises(SystemExit, match="weighs the head loss of --cloud-only"):
        T.main(_tiny_args(tmp_path / "b", "--cloud-focus", "0.5:0.2"))
    for bad in ("0.5", "x:1", "0:1", "0.5:-1", "1:2:3"):
        with pytest.raises(SystemExit, match="expected T:W"):
            T.main(_tiny_args(tmp_path / "c", "--init", "x.npz", "--cloud-only",
                              "--cloud-focus", bad))
    cfg = T.resolve(T.build_parser().parse_args(
        _tiny_args(tmp_path / "d", "--init", "x.npz", "--cloud-only")))
    assert T.plan_phases(cfg) == [("cloud", 1, [0.0, 1.0], "edge", 0.0)]


import feature_hint as FH  # noqa: E402


def test_hint_adapter_fit_recovers_a_linear_map_and_is_least_squares():
    """fit_least_squares on t = A s + c (1x1, any pooling commutes with it) recovers A, c and
    leaves no hint loss; on a non-linear target it leaves the smallest loss: any change of the
    fitted adapter raises it."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(12, 6, 16, 16, generator=g)
    a, c = torch.randn(5, 6, generator=g), torch.randn(5, generator=g)
    t = torch.einsum("oc,nchw->nohw", a, s) + c[None, :, None, None]
    hints = FH.Hints([6], [5])
    err = FH.fit_least_squares(hints, [s], [t])
    assert err[0] < 1e-12
    torch.testing.assert_close(hints.adapters[0].weight[:, :, 0, 0], a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hints.adapters[0].bias, c, rtol=1e-5, atol=1e-5)
    assert float(hints.loss([s], [t])) < 1e-10
    t = torch.relu(t) ** 2  # no adapter maps s onto this exactly
    err = FH.fit_least_squares(hints, [s], [t])
    best = float(hints.loss([s], [t]))
    assert best > 1e-3 and abs(best - err[0]) < 1e-5 * best
    with torch.no_grad():
        for prm in (hints.adapters[0].weight, hints.adapters[0].bias):
            prm.view(-1)[0] += 1e-2
            assert float(hints.loss([s], [t])) > best
            prm.view(-1)[0] -= 1e-2


def test_forward_tapped_returns_the_forward_logits_and_the_block_outputs():
    spec = ModelSpec(depth=8, edge_convs=2, edge_bits=1, exits=(ExitSpec(2, 0.0),))
    model = _random_model(spec)[0].eval()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        logits, taps = model.forward_tapped(x, (0, 2))
        plain = model(x)
        feats = model.features(model.normalize(x))
    assert len(logits) == len(plain) == 2 and len(taps) == 2
    for a, b in zip(logits, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(taps[0], feats[0], rtol=0, atol=0)  # the exit's block (0)
    assert taps[1].shape == (4, 64, 8, 8)


def test_hint_run_trains_the_features_and_exports_only_the_model(tmp_path):
    """--hint W: the adapters are fitted and trained but not exported (same arrays as a plain
    distillation run), the weights differ from that run's, and the run records the hint."""
    assert T.main(_tiny_args(tmp_path / "teacher", "--edge-convs", "0", "--exits", "", "--exit-weights", "")) == 0
    teacher = str(tmp_path / "teacher" / "tiny.npz")
    assert T.main(_tiny_args(tmp_path / "kd", "--teacher", teacher)) == 0
    assert T.main(_tiny_args(tmp_path / "hint", "--teacher", teacher, "--hint", "2")) == 0
    _, kd = load_weights(str(tmp_path / "kd" / "tiny.npz"))
    spec, hinted = load_weights(str(tmp_path / "hint" / "tiny.npz"))
    assert set(kd) == set(hinted)
    assert not np.array_equal(kd["conv1.weight"], hinted["conv1.weight"])
    assert spec.provenance["hint"] == {"weight": 2.0, "blocks": [0], "fit_images": 2048}
    load_model(str(tmp_path / "hint" / "tiny.npz"))
    log = open(tmp_path / "hint" / "ckpt" / "train.log").read()
    assert "--hint: adapters fitted on 64 training images" in log and " hint " in log
    with pytest.raises(SystemExit, match="another configuration"):  # a resume keeps the hint
        T.main(_tiny_args(tmp_path / "hint", "--teacher", teacher, "--hint", "1"))


def test_hint_is_refused_where_it_means_nothing(tmp_path):
    with pytest.raises(SystemExit, match="--hint compares the early exits' features"):
        T.main(_tiny_args(tmp_path / "a", "--hint", "1"))
    with pytest.raises(SystemExit, match="--hint compares the early exits' features"):
        T.main(_tiny_args(tmp_path / "b", "--hint", "1", "--teacher", "t.npz", "--init",
                          "x.npz", "--cloud-only"))
    with pytest.raises(SystemExit, match="--hint must be >= 0"):
        T.main(_tiny_args(tmp_path / "c", "--hint", "-1", "--teacher", "t.npz"))
    assert T.main(_tiny_args(tmp_path / "t8", "--edge-convs", "0", "--exits", "",
                             "--exit-weights", "")) == 0
    with pytest.raises(SystemExit, match="the teacher has no block 2 with the student's"):
        # depth 14: block 2 is 32x16x16; in the depth-8 teacher it is 64x8x8
        T.main(_tiny_args(tmp_path / "d", "--depth", "14", "--edge-convs", "6", "--exits", "6", "--hint", "1",
                          "--teacher", str(tmp_path / "t8" / "tiny.npz")))


def test_bn_restat_changes_only_the_running_statistics_to_their_cumulative_average(tmp_path):
    """bn_restat.py: only BN means and variances change; the stem BN's new mean is the mean of
    the stem conv's output over every pixel of the images (equal batches), its variance the
    mean of the per-batch unbiased variances; the provenance records the source."""
    assert T.main(_tiny_args(tmp_path)) == 0
    src, out = str(tmp_path / "tiny.npz"), str(tmp_path / "bn.npz")
    R = _load_recipe("bn_restat")
    assert R.main(["--weights", src, "--out", out, "--images", "40", "--batch", "20",
                   "--synthetic", "--threads", "1"]) == 0
    (spec0, before), (spec1, after) = load_weights(src), load_weights(out)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.endswith((".bn.mean", ".bn.var")) for k in changed)
    assert "stem.bn.mean" in changed and "conv1.bn.mean" in changed
    x = B.Data(B.VAL_SIZE, 40, None, synthetic=True).x_train[:40]
    model = Q.model_from_file(src)
    with torch.no_grad():
        y = model.stem_conv(model.normalize(x)).double()
    np.testing.assert_allclose(after["stem.bn.mean"], y.mean(dim=(0, 2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    per_batch = [y[i:i + 20].transpose(0, 1).reshape(y.shape[1], -1).var(dim=1) for i in (0, 20)]
    np.testing.assert_allclose(after["stem.bn.var"], (sum(per_batch) / 2).numpy(), rtol=1e-4)
    rec = spec1.provenance["bn_restat"]
    assert rec["source"] == src and rec["images"] == 40 and rec["batch_norms"] == 7
    assert [e.threshold for e in spec1.exits] == [e.threshold for e in spec0.exits]
    aug = str(tmp_path / "bn_aug.npz")  # augmented batches: other statistics, same arrays else
    assert R.main(["--weights", src, "--out", aug, "--images", "40", "--batch", "20",
                   "--synthetic", "--threads", "1", "--augment", "2", "--seed", "4"]) == 0
    spec2, augd = load_weights(aug)
    assert {k for k in before if not np.array_equal(before[k], augd[k])} <= changed
    assert not np.array_equal(augd["stem.bn.mean"], after["stem.bn.mean"])
    assert spec2.provenance["bn_restat"]["augment"] == 2
    with pytest.raises(SystemExit, match="--out must differ"):
        R.main(["--weights", src, "--out", src, "--synthetic"])


def test_weight_soup_is_the_mean_of_the_files_with_bn_recomputed_for_it(tmp_path):
    """weight_soup.py: every array but the BN running statistics is the mean of the files
    (exactly, in float64 then rounded once); the running statistics are those bn_restat.py
    computes for a file holding that mean; files of another network, fewer than two files
    and --out equal to a source are refused, nothing written."""
    S, R = _load_recipe("weight_soup"), _load_recipe("bn_restat")
    spec = ModelSpec(depth=8, edge_convs=2, edge_bits=1, exits=(ExitSpec(2, 0.3),))
    paths = []
    for seed in (1, 2, 3):
        paths.append(str(tmp_path / f"w{seed}.npz"))
        save_weights(paths[-1], spec if seed == 1 else spec.with_thresholds([0.1 * seed]),
                     random_weights(spec, seed))
    out = str(tmp_path / "soup.npz")
    common = ["--images", "40", "--batch", "20", "--synthetic", "--threads", "1"]
    assert S.main(["--weights", *paths, "--out", out, *common, "--augment", "2"]) == 0
    src = [load_weights(p)[1] for p in paths]
    spec_s, soup = load_weights(out)
    for k in soup:
        if not k.endswith((".bn.mean", ".bn.var")):
            want = (sum(a[k].astype(np.float64) for a in src) / 3).astype(np.float32)
            np.testing.assert_array_equal(soup[k], want, err_msg=k)
    mean_file = str(tmp_path / "mean.npz")
    save_weights(mean_file, spec, {k: (soup[k] if not k.endswith((".bn.mean", ".bn.var"))
                                       else src[0][k]) for k in soup})
    ref = str(tmp_path / "ref.npz")
    assert R.main(["--weights", mean_file, "--out", ref, *common, "--augment", "2"]) == 0
    _, want = load_weights(ref)
    assert not np.array_equal(soup["conv1.bn.mean"], src[0]["conv1.bn.mean"])
    for k in soup:
        np.testing.assert_allclose(soup[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert [e.threshold for e in spec_s.exits] == [0.3]
    rec = spec_s.provenance["weight_soup"]
    assert [s["path"] for s in rec["sources"]] == paths and rec["augment"] == 2
    other = str(tmp_path / "other.npz")
    spec2 = ModelSpec(depth=8, edge_convs=2, edge_bits=2, exits=(ExitSpec(2, 0.3),))
    save_weights(other, spec2, random_weights(spec2, 4))
    bad = str(tmp_path / "bad.npz")
    with pytest.raises(SystemExit, match="other.npz: describes another network.*edge_bits"):
        S.main(["--weights", paths[0], other, "--out", bad, *common])
    with pytest.raises(SystemExit, match="at least two"):
        S.main(["--weights", paths[0], "--out", bad, *common])
    with pytest.raises(SystemExit, match="--out must differ"):
        S.main(["--weights", *paths, "--out", paths[1], *common])
    assert not os.path.exists(bad)


import weight_average as WA  # noqa: E402


def test_averager_takes_the_mean_of_every_nth_step_after_the_start_and_restats_bn():
    """theta_swa = (1/n) sum of the snapshots (steps with progress > start, every N-th); BN
    buffers are not averaged but recomputed by finish() as cumulative batch averages."""
    torch.manual_seed(0)
    spec = ModelSpec(depth=8, edge_convs=2, edge_bits=1, exits=(ExitSpec(2, 0.0),))
    # progress 0.5 is not past the start: the eligible steps are 3, 4, 5 (0-based)
    for every, taken in ((1, [3, 4, 5]), (2, [4])):
        model = Q.HybridResNet(spec)
        avg = WA.Averager(model, 0.5, every)
        seen = []
        for i, p in enumerate([0.2, 0.4, 0.5, 0.7, 0.8, 1.0]):
            with torch.no_grad():
                for q in model.parameters():
                    q.copy_(torch.randn_like(q))
            seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
            avg.after_step(model, p)
        assert avg.snapshots == len(taken)
        got = dict(avg.avg.module.named_parameters())
        for k in got:
            want = sum(seen[t][k].double() for t in taken) / len(taken)
            np.testing.assert_allclose(got[k].detach().double().numpy(), want.numpy(),
                                       rtol=1e-5, atol=1e-6, err_msg=k)
    x = B.Data(B.VAL_SIZE, 40, None, synthetic=True).x_train[:40]
    kept = model.stem_bn.running_mean.clone()
    out = avg.finish([x[:20], x[20:]])
    assert not out.training and torch.equal(model.stem_bn.running_mean, kept)
    with torch.no_grad():
        y = out.stem_conv(out.normalize(x)).double()
    np.testing.assert_allclose(out.stem_bn.running_mean.double().numpy(),
                               y.mean(dim=(0, 2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no snapshot"):
        WA.Averager(model, 0.9, 1).finish([x])


def test_swa_run_exports_the_average_and_resumes_to_the_same_file(tmp_path, monkeypatch):
    """--swa-every 1 --swa-start 0.4 over 2 epochs x 3 steps averages steps 3..6 and writes
    <out>_swa.npz (same arrays as --out, other values); a run interrupted after epoch 1 (one
    snapshot taken) and resumed writes the same averaged file as the uninterrupted run."""
    def args(d):
        a = _tiny_args(d, "--swa-every", "1", "--swa-start", "0.4", "--sched", "constant")
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

    real = T.validate_epoch

    def crash_in_epoch_2(model, data, cfg, state, entry, best_path):
        if entry["epoch"] == 2:
            raise KeyboardInterrupt
        return real(model, data, cfg, state, entry, best_path)
    monkeypatch.setattr(T, "validate_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        T.main(args(tmp_path / "b"))
    monkeypatch.setattr(T, "validate_epoch", real)
    assert T.main(args(tmp_path / "b")) == 0
    _, resumed = load_weights(str(tmp_path / "b" / "tiny_swa.npz"))
    for k in avg:
        np.testing.assert_array_equal(avg[k], resumed[k], err_msg=k)
    with pytest.raises(SystemExit, match="--swa-every averages one joint phase"):
        T.main(_tiny_args(tmp_path / "c", "--swa-every", "1", "--strategy", "separate"))
    with pytest.raises(SystemExit, match="--swa-start lie in"):
        T.main(_tiny_args(tmp_path / "c", "--swa-every", "1", "--swa-start", "1"))


def test_weighted_distillation_loss_is_the_weighted_mean_of_per_sample_losses():
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(9, 10, generator=g, dtype=torch.float64), torch.randn(9, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (9,), generator=g)
    ones = torch.ones(9, dtype=torch.float64)
    for teacher, a in ((None, 0.9), (t, 0.0), (t, 0.7), (t, 1.0)):
        plain = T.distill_loss(z, y, teacher, a, 3.0)
        assert torch.allclose(T.distill_loss(z, y, teacher, a, 3.0, ones), plain, rtol=1e-12, atol=0)
    w = torch.rand(9, generator=g, dtype=torch.float64)
    per = torch.stack([T.distill_loss(z[i:i + 1], y[i:i + 1], t[i:i + 1], 0.7, 3.0) for i in range(9)])
    assert torch.allclose(T.distill_loss(z, y, t, 0.7, 3.0, w), (w * per).sum() / w.sum(),
                          rtol=1e-12, atol=0)
    # A sample of weight 0 gets no gradient at all.
    w[4] = 0.0
    zs = z.clone().requires_grad_(True)
    T.distill_loss(zs, y, t, 0.7, 3.0, w).backward()
    assert float(zs.grad[4].abs().max()) == 0.0 and float(zs.grad.abs().sum()) > 0


def test_focus_weights_follow_algorithm_1_entropies():
    rng = np.random.default_rng(2)
    early = [torch.from_numpy(rng.normal(0, s, (200, 10)).astype(np.float32)) for s in (3.0, 5.0)]
    h = np.stack([V.entropy(l) for l in early])
    thr = float(np.median(h))
    w = T.focus_weights(early, thr, 0.3).numpy()
    easy = (h < thr).any(0)
    assert 0 < easy.sum() < 200 and easy.sum() > (h[0] < thr).sum()  # the second exit counts too
    np.testing.assert_array_equal(w, np.where(easy, 0.3, 1.0))


def _noisy_logits(seed, n=300, c=10):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    outs = []
    for boost in (4.0, 2.0):  # head, then exit; returned as [exit, head]
        z = rng.normal(0, 1, (n, c)).astype(np.float32)
        z[np.arange(n), labels] += rng.uniform(0, boost, n).astype(np.float32)
        outs.append(z)
    return [outs[1], outs[0]], labels


@pytest.mark.parametrize("rule", ["accuracy:60", "within:1", "exits:40", "fixed:0.5"])
def test_operating_point_scores_what_the_rule_leaves_free(rule):
    """The score is the figure the rule does not fix: the edge fraction for accuracy/within
    rules, the accuracy for exits/fixed, each from Algorithm 1 with the rule's thresholds."""
    logits, labels = _noisy_logits(1)
    point = ES.operating_point(logits, labels, rule)
    thresholds = V.calibrate_fast([torch.from_numpy(l) for l in logits], labels, rule)
    assert point["thresholds"] == thresholds
    acc, fr = V.conditional(logits, labels, thresholds)
    free_edge = rule.split(":")[0] in ("accuracy", "within")
    assert point["score"] == ([sum(fr), acc] if free_edge else [acc, sum(fr)])
    assert (point["acc"], point["edge"]) == (round(acc * 100, 2), round(sum(fr) * 100, 2))
    if rule == "exits:40":
        assert sum(fr) <= 0.4
    if rule == "accuracy:60":
        assert acc >= 0.6 and sum(fr) > 0


def test_selection_keeps_the_earlier_of_equal_scores():
    a, b = {"score": [0.5, 0.9]}, {"score": [0.5, 0.9]}
    assert ES.better(a, None) and not ES.better(b, a)
    assert ES.better({"score": [0.5, 0.91]}, a) and not ES.better({"score": [0.49, 1.0]}, a)
    assert ES.default_out("weights/r32_20E.npz") == "weights/r32_20E_best.npz"
    with pytest.raises(ValueError, match="early exit"):
        ES.operating_point([np.zeros((3, 10))], np.zeros(3, int), "accuracy:50")


def test_select_by_exports_the_best_validated_epoch(tmp_path):
    """--select-by scores every validated epoch; the chosen file is the epoch with the highest
    score (earliest among equals), and recalibrating it by the same rule at export gives the
    very figures it was chosen for (so it is that epoch's model, not the last one's)."""
    args = _tiny_args(tmp_path, "--select-by", "exits:50", "--threshold-rule", "exits:50",
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
    assert T.main(_tiny_args(tmp_path)) == 0
    first = str(tmp_path / "tiny.npz")
    args = _tiny_args(tmp_path / "second", "--init", first, "--select-by", "exits:50")
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
    assert T.main(_tiny_args(tmp_path)) == 0
    first = str(tmp_path / "tiny.npz")
    args = _tiny_args(tmp_path / "sel", "--init", first, "--select-by", "exits:50",
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
        T.main(_tiny_args(tmp_path / "a", "--select-images", "12"))
    with pytest.raises(SystemExit, match="leave some for the comparison"):
        T.main(_tiny_args(tmp_path / "b", "--select-by", "exits:50", "--select-images", "32"))


def test_validation_scope_names_the_held_out_images():
    """The end-of-run log line says which validation images chose the epoch and which are held
    out, so that its whole-split figures are not read as held-out ones."""
    cfg = {"select_by": "exits:59.3", "select_images": 2500}
    assert T.validation_scope(cfg, 5000) == (
        "all 5000 images: 0..2499 chose the epoch, 2500..4999 are held out; "
        "compare on those with tradeoff --calib-range 2500:")
    assert T.validation_scope({**cfg, "select_images": None}, 5000) == "all 5000 images"
    assert T.validation_scope({"select_by": None, "select_images": None}, 64) == "all 64 images"


def test_select_by_keeps_an_early_epoch_and_survives_a_resume(tmp_path, monkeypatch):
    """Scores falling epoch by epoch: epoch 1 is exported (its weights differ from the last
    epoch's), and a rerun of the finished command exports the same file again."""
    calls = []

    def falling(logits, labels, rule):
        calls.append(1)
        return {"rule": rule, "thresholds": [0.1], "acc": 50.0, "edge": 10.0,
                "score": [-float(len(calls)), 0.0]}

    monkeypatch.setattr(T, "operating_point", falling)
    args = _tiny_args(tmp_path, "--select-by", "accuracy:50", "--select-out",
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
        T.main(_tiny_args(tmp_path / "bad", "--select-by", "best:1"))
    with pytest.raises(SystemExit, match="--select-out must differ"):
        T.main(_tiny_args(tmp_path / "bad", "--select-by", "exits:50", "--select-out",
                          str(tmp_path / "bad" / "tiny.npz")))


def test_distillation_loss_is_the_weighted_sum_of_its_two_terms():
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(12, 10, generator=g, dtype=torch.float64), torch.randn(12, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (12,), generator=g)
    ce = torch.nn.functional.cross_entropy(z, y)
    assert torch.equal(T.distill_loss(z, y, None, 0.9, 4.0), ce)
    assert torch.equal(T.distill_loss(z, y, t, 0.0, 4.0), ce)
    # By hand: T^2 * mean over samples of sum_c p_t (log p_t - log p_s), at temperature T.
    for a, temp in [(0.5, 1.0), (0.9, 4.0), (1.0, 2.5)]:
        lt, ls = torch.log_softmax(t / temp, 1), torch.log_softmax(z / temp, 1)
        kl = (lt.exp() * (lt - ls)).sum(1).mean()
        want = (1 - a) * ce + a * temp ** 2 * kl
        assert torch.allclose(T.distill_loss(z, y, t, a, temp), want, rtol=1e-12, atol=0)
    # A student that already equals its teacher gets no gradient from the soft term.
    zs = t.clone().requires_grad_(True)
    T.distill_loss(zs, y, t, 1.0, 3.0).backward()
    assert float(zs.grad.abs().max()) < 1e-12


def test_distillation_run_records_its_teacher_and_changes_only_the_loss(tmp_path):
    assert T.main(_tiny_args(tmp_path / "teacher")) == 0
    teacher = str(tmp_path / "teacher" / "tiny.npz")
    assert T.main(_tiny_args(tmp_path / "plain")) == 0
    assert T.main(_tiny_args(tmp_path / "zero", "--teacher", teacher, "--kd-weight", "0")) == 0
    assert T.main(_tiny_args(tmp_path / "kd", "--teacher", teacher, "--kd-weight", "0.9")) == 0
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
        T.main(_tiny_args(tmp_path / "kd", "--teacher", teacher, "--kd-weight", "0.5"))
    with pytest.raises(SystemExit, match="--kd-weight"):
        T.main(_tiny_args(tmp_path / "bad", "--teacher", teacher, "--kd-weight", "1.5"))


def test_gradient_clipping_bounds_the_step(tmp_path):
    # With the global gradient norm clipped to ~0 and no weight decay, the learning rate no
    # longer matters: two runs at different rates end where they started (same seed).
    outs = {}
    for lr, clip in (("0.1", "1e-12"), ("0.05", "1e-12"), ("0.1", "0")):
        d = tmp_path / f"{lr}-{clip}"
        assert T.main(_tiny_args(d, "--clip-grad", clip, "--wd", "0", "--lr", lr)) == 0
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
        assert T.main(_tiny_args(d, "--wd", "0", "--max-steps", "1", "--lr", "1", *extra)) == 0
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
    assert T.main(_tiny_args(tmp_path)) == 0
    with pytest.raises(SystemExit, match="another configuration.*optimizer"):
        T.main(_tiny_args(tmp_path, "--optimizer", "adam"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("edge_convs", [0, 2])
def test_cuda_graphs_train_as_the_ordinary_step(tmp_path, edge_convs):
    outs = {}
    for g in ("0", "1"):
        args = _tiny_args(tmp_path / g, "--device", "cuda", "--cuda-graphs", g)
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
    assert T.main(_tiny_args(tmp_path / "teacher")) == 0
    teacher = str(tmp_path / "teacher" / "tiny.npz")
    outs = {}
    for c in ("0", "1"):
        args = _tiny_args(tmp_path / c, "--compile", c, "--teacher", teacher, "--clip-grad", "5")
        args[args.index("--max-steps") + 1] = "4"
        assert T.main(args) == 0
        outs[c] = load_weights(str(tmp_path / c / "tiny.npz"))[1]
    for k in outs["0"]:
        np.testing.assert_allclose(outs["1"][k], outs["0"][k], rtol=0, atol=2e-3, err_msg=k)
    init = load_weights(teacher)[1]  # and the compiled run did train
    assert any(np.abs(outs["1"][k] - init[k]).max() > 1e-3 for k in init if k != "meta.json")
    with pytest.raises(SystemExit, match="alternatives"):
        T.main(_tiny_args(tmp_path / "both", "--compile", "1", "--cuda-graphs", "1"))


def _random_model(spec, seed=0):
    model = Q.HybridResNet(spec)
    arrays = random_weights(spec, seed)
    with torch.no_grad():
        for k, t in Q.named_tensors(model).items():
            t.copy_(torch.from_numpy(arrays[k]))
    return model, arrays


@pytest.mark.parametrize("edge_convs,bits,shortcut", [(0, 1, "zero_pad"), (8, 1, "zero_pad"),
                                                      (6, 2, "conv1x1"), (12, 4, "zero_pad")])
def test_export_load_round_trip_is_exact(tmp_path, edge_convs, bits, shortcut):
    exits = (ExitSpec(2, 0.0), ExitSpec(edge_convs, 0.0)) if edge_convs > 2 else ()
    spec = ModelSpec(depth=14, edge_convs=edge_convs, edge_bits=bits, shortcut=shortcut,
                     exits=exits)
    model, arrays = _random_model(spec)
    path = str(tmp_path / "w.npz")
    Q.export(model, path, [0.25 * (k + 1) for k in range(len(exits))], {"note": "test"})
    spec2, loaded = load_weights(path)
    assert [e.threshold for e in spec2.exits] == [0.25 * (k + 1) for k in range(len(exits))]
    assert spec2.provenance == {"note": "test"}
    assert set(loaded) == set(arrays)
    for k in arrays:
        assert loaded[k].dtype == np.float32
        np.testing.assert_array_equal(loaded[k], arrays[k], err_msg=k)
    again = Q.export_arrays(Q.model_from_file(path))
    for k in arrays:
        np.testing.assert_array_equal(again[k], arrays[k], err_msg=k)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantizer_forward_equals_engine_codes(bits):
    rng = np.random.default_rng(bits)
    y = np.concatenate([rng.normal(0, 1, 5000), [0.0, -0.0, 1.0, -1.0, 2.0, -2.0],
                        np.linspace(-1.2, 1.2, 241)]).astype(np.float32)
    got = Q.quant_codes(torch.from_numpy(y), bits, 1.0).numpy()
    np.testing.assert_array_equal(got, quant.codes(y, bits, 1.0).astype(np.float32))


def test_straight_through_gradient_is_clipped_identity():
    y = torch.tensor([-2.0, -0.5, 0.0, 0.7, 1.5], requires_grad=True)
    Q.quant_codes(y, 1, 1.0).sum().backward()
    np.testing.assert_array_equal(y.grad.numpy(), [0.0, 1.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize("bits,v0", [(1, 1.0), (2, 1.0), (2, 0.75), (4, 1.0), (4, 1.5)])
def test_custom_straight_through_function_equals_its_autograd_definition(bits, v0):
    """quant_codes (one custom autograd function) against quant_codes_autograd (clamp, where,
    detach): identical codes and identical gradients for any upstream gradient, boundaries
    |y| = 1 and |y| = v0 and y = +-0 included."""
    rng = np.random.default_rng(bits * 10 + int(v0 * 4))
    y0 = np.concatenate([rng.normal(0, 1.2, 3000), [0.0, -0.0, 1.0, -1.0, v0, -v0, 2.0, -2.0],
                         np.nextafter(np.float32([1.0, -1.0, v0, -v0]), np.float32(0))])
    g = torch.from_numpy(rng.normal(0, 1, len(y0)).astype(np.float32))
    outs = []
    for f in (Q.quant_codes, Q.quant_codes_autograd):
        y = torch.tensor(y0, dtype=torch.float32, requires_grad=True)
        u = f(y, bits, v0)
        (u * g).sum().backward()
        outs.append((u.detach().numpy(), y.grad.numpy()))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    assert set(np.unique(outs[0][0]).tolist()) <= set(range(-(1 << bits) + 1, 1 << bits, 2))


def test_threshold_calibration_stays_within_margin():
    rng = np.random.default_rng(0)
    n, c = 400, 10
    labels = rng.integers(0, c, n)
    head = torch.from_numpy(rng.normal(0, 1, (n, c)).astype(np.float32))
    head[torch.arange(n), torch.from_numpy(labels)] += 3.0
    early = torch.from_numpy(rng.normal(0, 1, (n, c)).astype(np.float32))
    early[torch.arange(n), torch.from_numpy(labels)] += torch.from_numpy(
        rng.uniform(0, 6, n).astype(np.float32))
    logits = [early, head]
    base = float((head.argmax(1).numpy() == labels).mean())
    t_fast = V.calibrate_fast(logits, labels, "within:0.5")
    t_slow = V.calibrate(logits, labels, "within:0.5")
    assert t_fast == pytest.approx(t_slow)
    acc, frac = V.conditional(logits, labels, t_fast)
    assert acc >= base - 0.005 - 1e-12 and frac[0] > 0
    assert V.calibrate(logits, labels, "fixed:0.5") == [0.5]


def _engine_outputs(path, images):
    """Per-exit and head logits of the reference executor, every sample through every layer."""
    model = load_model(path)
    return model, engine.outputs(model, images, ReferenceExecutor(model))


@pytest.mark.parametrize("edge_convs,bits,shortcut", [(8, 1, "zero_pad"), (8, 2, "conv1x1"),
                                                      (6, 4, "zero_pad")])
def test_torch_model_matches_engine(tmp_path, edge_convs, bits, shortcut):
    """Logits agree within 1e-4 on (almost) every sample; predictions and exits on >= 95%.

    The quantized convs compute the same numbers in both (integer codes, integer sums below
    2^24 in float32, one float32 scale per channel, BN as one float32 multiply-add from the same
    float32 scale and shift). The stem, cloud convs, 1x1 shortcuts, pooling and linear layers are
    float32 sums whose order differs between PyTorch and NumPy: a few float32 ulps of the
    accumulated values (about 1e-6 on these O(1..10) logits), hence 1e-4 with two orders of
    margin. Rarely such an ulp moves a BN output across a quantization boundary (0 for 1 bit,
    three boundaries for 2 bits, ...), which changes one activation code and that sample's
    logits by about 1e-2; those samples are counted, not hidden: at most 10% may differ, and
    the decisions (exit taken, class) must agree on at least 95% of the batch.
    """
    spec = ModelSpec(depth=14, edge_convs=edge_convs, edge_bits=bits, shortcut=shortcut,
                     exits=(ExitSpec(2, 1.2), ExitSpec(edge_convs, 0.9)))
    path = str(tmp_path / "w.npz")
    save_weights(path, spec, random_weights(spec, seed=edge_convs + bits))
    images = np.random.default_rng(7).integers(0, 256, (48, 3, 32, 32), dtype=np.uint8)
    model_t = Q.model_from_file(path)
    torch_logits = V.predict(model_t, torch.from_numpy(images))
    model, eng_logits = _engine_outputs(path, images)
    row_diff = np.max([np.abs(a.numpy() - b).max(axis=1)
                       for a, b in zip(torch_logits, eng_logits)], axis=0)
    assert np.median(row_diff) < 1e-5, row_diff
    assert (row_diff <= 1e-4).mean() >= 0.9, row_diff
    # thresholds at the median entropy of each exit, so that every path is exercised
    thr = [float(np.median(engine.entropy(l))) for l in eng_logits[:-1]]
    res = engine.run(model, images, ReferenceExecutor(model), thresholds=thr, batch_size=16)
    pred_t, exit_t = V.decide(torch_logits, thr)
    assert engine.FINAL == -1
    assert len(set(exit_t.tolist())) > 1, "the thresholds should split the batch"
    assert (res.exit_index == exit_t).mean() >= 0.95
    assert (res.predictions == pred_t).mean() >= 0.95
    close = row_diff <= 1e-4  # where no code flipped, the decisions are identical
    np.testing.assert_array_equal(res.exit_index[close], exit_t[close])
    np.testing.assert_array_equal(res.predictions[close], pred_t[close])


# ----------------------------------------------------------------------------- shipped files

def _figures():
    path = os.path.join(WEIGHTS, "figures.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _shipped(name):
    """(documented figures, prepared model, test images, test labels) for a shipped file, after
    checking that the file is the one the figures were measured on; skips without the data."""
    from xnorcdl.data import DataError, load_cifar10
    want = _figures()["files"][name]
    path = os.path.join(WEIGHTS, name)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert digest == want["sha256"], f"{name} changed since weights/figures.json was written"
    try:
        images, labels = load_cifar10("test", fetch=False)
    except DataError as exc:
        pytest.skip(f"CIFAR-10 is not in the cache ({exc})")
    return want, load_model(path), np.ascontiguousarray(images), labels


def _counts(res, model, labels):
    """(correct predictions, samples per early exit) of an engine run."""
    return (int((res.predictions == labels).sum()),
            [int((res.exit_index == k).sum()) for k in range(len(model.exits))])


@pytest.mark.parametrize("name", sorted(_figures().get("files", {})))
def test_shipped_weights_reproduce_documented_figures(name):
    """weights/figures.json: accuracy and exit fraction of each file on the first N test images,
    measured by the engine (reference executor, Algorithm 1 with the file's thresholds)."""
    want, model, images, labels = _shipped(name)
    n = _figures()["subset"]["first_test_images"]
    res = engine.run(model, images[:n], ReferenceExecutor(model), batch_size=100)
    correct, exited = _counts(res, model, labels[:n])
    assert correct == want["correct"], f"{name}: {correct}/{n} correct, documented {want['correct']}"
    assert exited == want["exited"], f"{name}: exits {exited}, documented {want['exited']}"


@pytest.mark.parametrize("name", sorted(_figures().get("files", {})))
def test_shipped_weights_reproduce_full_test_figures_with_the_fast_backend(name):
    """The figures weights/README.md quotes: all 10000 test images through the fast backend."""
    from xnorcdl.backends.fast import FastExecutor
    want, model, images, labels = _shipped(name)
    full = want.get("full_test")
    if full is None:
        pytest.skip(f"weights/figures.json has no whole-test-set figures for {name}")
    res = engine.run(model, images, FastExecutor(model), batch_size=500)
    correct, exited = _counts(res, model, labels)
    assert (correct, exited) == (full["correct"], full["exited"]), \
        f"{name}: {correct} correct and exits {exited} on the test set, documented {full}"
