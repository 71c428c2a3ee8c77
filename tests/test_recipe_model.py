"""The recipe's parts, without a training run: augmentation, learning-rate curves, the loss,
weight averaging, epoch scores, export/import, the quantizer and its straight-through gradient,
threshold calibration, and the PyTorch mirror against the engine (weights/recipe/, PyTorch).

* export then load is lossless, array by array, and the quantizer forward equals xnorcdl.quant;
* the PyTorch model in eval mode and the engine's reference executor agree on one file:
  logits within 1e-4 except where float32 summation order flips an activation code, decisions
  on >= 95% of samples (see test_torch_model_matches_engine).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the training recipe needs torch (pip install -e .[train])")

import recipe_support  # noqa: E402,F401  (puts weights/recipe/ on sys.path)
from xnorcdl import engine  # noqa: E402
from xnorcdl import quant  # noqa: E402
from xnorcdl.backends.reference import ReferenceExecutor  # noqa: E402
from xnorcdl.format import load_weights, random_weights, save_weights  # noqa: E402
from xnorcdl.model import load_model  # noqa: E402
from xnorcdl.spec import ExitSpec, ModelSpec  # noqa: E402

import cifar_batches as B  # noqa: E402
import epoch_select as ES  # noqa: E402
import lr_schedule as S  # noqa: E402
import qat_resnet as Q  # noqa: E402
import train_export as X  # noqa: E402
import train_phases as P  # noqa: E402
import val_scoring as V  # noqa: E402
import weight_average as WA  # noqa: E402


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


def test_padding_is_zero_and_crops_cover_every_offset():
    d = B.Data(8, 40, 8, synthetic=True, seed=1)
    assert d.padded.shape == (40, 3, 40, 40)
    assert int(d.padded[:, :, :4].max()) == 0 and int(d.padded[:, :, :, 36:].max()) == 0
    torch.testing.assert_close(d.padded[:, :, 4:36, 4:36], d.x_train, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["onecycle", "cosine"])
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
        {"onecycle": lr / 1000, "cosine": 0.0}[kind])


def test_distillation_loss_is_the_weighted_sum_of_its_two_terms():
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(12, 10, generator=g, dtype=torch.float64), torch.randn(12, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (12,), generator=g)
    ce = torch.nn.functional.cross_entropy(z, y)
    assert torch.equal(P.distill_loss(z, y, None, 0.9, 4.0), ce)
    assert torch.equal(P.distill_loss(z, y, t, 0.0, 4.0), ce)
    # By hand: T^2 * mean over samples of sum_c p_t (log p_t - log p_s), at temperature T.
    for a, temp in [(0.5, 1.0), (0.9, 4.0), (1.0, 2.5)]:
        lt, ls = torch.log_softmax(t / temp, 1), torch.log_softmax(z / temp, 1)
        kl = (lt.exp() * (lt - ls)).sum(1).mean()
        want = (1 - a) * ce + a * temp ** 2 * kl
        assert torch.allclose(P.distill_loss(z, y, t, a, temp), want, rtol=1e-12, atol=0)
    # A student that already equals its teacher gets no gradient from the soft term.
    zs = t.clone().requires_grad_(True)
    P.distill_loss(zs, y, t, 1.0, 3.0).backward()
    assert float(zs.grad.abs().max()) < 1e-12


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


def test_validation_scope_names_the_held_out_images():
    """The end-of-run log line says which validation images chose the epoch and which are held
    out, so that its whole-split figures are not read as held-out ones."""
    cfg = {"select_by": "exits:59.3", "select_images": 2500}
    assert X.validation_scope(cfg, 5000) == (
        "all 5000 images: 0..2499 chose the epoch, 2500..4999 are held out; "
        "compare on those with tradeoff --calib-range 2500:")
    assert X.validation_scope({**cfg, "select_images": None}, 5000) == "all 5000 images"
    assert X.validation_scope({"select_by": None, "select_images": None}, 64) == "all 64 images"


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
