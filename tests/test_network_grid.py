"""Whole networks of the grid (tests/network_grid.py) through both backends.

* **Decisions against the naive forward pass** (tests/naive.py, float64, written from
  docs/FORMAT.md alone): every sample takes the same exit and gets the same prediction, at batch
  size 1 and batched; logits and entropies agree to float32-vs-float64 rounding.
* **Fast against reference, bit for bit at the edge**: stem, every edge block (run as a chain,
  so the edge output itself), every exit's logits, hence entropies and exit decisions; cloud
  blocks and the head within float32 rounding.

Thresholds are placed in wide gaps between the samples' exit entropies, so that a sample's side
of a threshold is a property of the network and not of the last bits of H.
"""
import functools

import numpy as np
import pytest

import naive
from conftest import random_images
from network_grid import GRID, SAMPLES, SAMPLES_EDGE
from xnorcdl import backends, engine
from xnorcdl.backends.fast import FastExecutor
from xnorcdl.backends.reference import ReferenceExecutor

NETS = [pytest.param(net, id=net.id) for net in GRID]
# float32 engine vs float64 naive pass over up to 14 layers: relative error ~1e-5 per layer
NAIVE_RTOL, NAIVE_ATOL, ENTROPY_ATOL = 2e-4, 2e-4, 1e-5
# Cloud layers fold BN into the GEMM: float32 results differ from the reference by a few
# roundings per layer (relative ~1e-6 per conv, FloatGemmConv); over up to 12 cloud convs and
# the head, logits of size O(1..10) agree to ~1e-4.
CLOUD_TOL = 1e-4
LOGIT_ATOL = 2e-4
# the naive pass's entropies are within ~1e-5 of the engine's: a threshold with at least this
# margin on both sides puts each sample on the same side in both
MARGIN = 1e-4


def split_thresholds(entropies, margin):
    """Thresholds that let about 1/(K+1) of the samples leave at each of the K exits: for exit k
    the midpoint of the widest gap near that quantile of the entropies of the samples that get
    there, at least ``2 margin`` wide. ``entropies`` is ``[N, K]`` with every exit evaluated."""
    n, n_exits = entropies.shape
    reach = np.ones(n, bool)
    thr = []
    for k in range(n_exits):
        h = np.sort(entropies[reach, k])
        if len(h) < 2:
            thr.append(0.0)
            continue
        want = max(1, len(h) // (n_exits + 1 - k))
        m = max(range(max(1, want // 2), min(len(h) - 1, want + want // 2) + 1),
                key=lambda i: h[i] - h[i - 1])
        assert h[m] - h[m - 1] > 2 * margin, "entropies too close to place a threshold"
        thr.append(float((h[m - 1] + h[m]) / 2))
        reach &= ~(entropies[:, k] < thr[-1])
    return thr


@functools.lru_cache(maxsize=None)
def grid_case(net, n, seed, margin):
    """The net with thresholds split on its ``n`` images (of ``seed``), and those images."""
    images = random_images(n, seed=seed)
    if not net.exits:
        return net.model(), images
    model = net.model()
    outs = engine.outputs(model, images, ReferenceExecutor(model))
    ent = np.stack([engine.entropy(o) for o in outs[:-1]], axis=1)
    return net.model(split_thresholds(ent, margin)), images


@functools.lru_cache(maxsize=None)
def naive_outcomes(net):
    """The model with thresholds, its images and naive.forward of each image."""
    model, images = grid_case(net, SAMPLES, net.seed + 100, MARGIN)
    meta, arrays = model.spec.to_json_dict(), net.arrays()
    return model, images, [naive.forward(meta, arrays, img) for img in images]


@pytest.mark.parametrize("backend", list(backends.BACKENDS))
@pytest.mark.parametrize("net", NETS)
def test_decisions_match_naive(net, backend):
    model, images, want = naive_outcomes(net)
    ex = backends.get(backend)(model)
    one = engine.run(model, images, ex, batch_size=1)
    many = engine.run(model, images, ex, batch_size=3)
    for res in (one, many):
        for i, (logits, k, ent) in enumerate(want):
            assert res.exit_index[i] == k, f"sample {i}"
            assert res.predictions[i] == int(np.argmax(logits)), f"sample {i}"
            np.testing.assert_allclose(res.logits[i], logits, rtol=NAIVE_RTOL, atol=NAIVE_ATOL)
            np.testing.assert_allclose(res.entropies[i, :len(ent)], ent, rtol=NAIVE_RTOL,
                                       atol=ENTROPY_ATOL)
            assert np.isnan(res.entropies[i, len(ent):]).all()    # exits after it not run
    # the edge is computed sample by sample: batching changes no bit of an entropy
    assert np.array_equal(one.entropies, many.entropies, equal_nan=True)
    assert np.array_equal(one.exit_index, many.exit_index)
    if net.exits:
        assert len(set(one.exit_index.tolist())) > 1, "the thresholds should split the samples"


@pytest.mark.parametrize("net", NETS)
def test_cloud_program_gives_the_per_block_bits(net):
    """The fast backend's cloud program (all cloud blocks and the head in one jitted call) gives
    the bits of its blocks called one by one, and the head within float32 rounding of NumPy's;
    Algorithm 1 takes the same decisions either way."""
    model, images = grid_case(net, SAMPLES_EDGE, net.seed + 200, 0.0)
    fast = FastExecutor(model)
    c0 = fast._first_cloud
    if fast.cloud is None:
        from xnorcdl.kernels import blas
        assert c0 == len(model.blocks) or blas.sgemm() is None
        pytest.skip("no cloud program here")
    x, _ = fast.segment(images, None, 0, c0, None)
    want = x
    for b in range(c0, len(model.blocks)):
        want = fast.block(b, want)
    got, logits = fast.cloud.run(0, len(model.blocks) - c0, x, head=True)
    assert np.array_equal(got, want)
    np.testing.assert_allclose(logits, fast.head(want), rtol=0, atol=LOGIT_ATOL)
    per_block = FastExecutor(model)
    per_block.cloud = None
    for batch in (1, 5):
        a = engine.run(model, images, fast, batch_size=batch)
        b = engine.run(model, images, per_block, batch_size=batch)
        assert np.array_equal(a.exit_index, b.exit_index)
        assert np.array_equal(a.predictions, b.predictions)
        np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=LOGIT_ATOL)


@pytest.mark.parametrize("net", NETS)
def test_fast_equals_reference_at_the_edge(net):
    # both backends compute the same entropies to the last bit: no margin is needed
    model, images = grid_case(net, SAMPLES_EDGE, net.seed + 200, 0.0)
    ref, fast = ReferenceExecutor(model), FastExecutor(model)
    xr, xf = ref.stem(images), fast.stem(images)
    assert np.array_equal(xf, xr), "stem"
    for b, blk in enumerate(model.blocks):
        if blk.edge:                       # a chain: the edge output itself is compared
            xr, xf = ref.block(b, xr), fast.block(b, xf)
            assert np.array_equal(xf, xr), f"edge block {b}"
        else:                              # one cloud block at a time, on the reference input
            got, xr = fast.block(b, xr), ref.block(b, xr)
            np.testing.assert_allclose(got, xr, rtol=CLOUD_TOL, atol=CLOUD_TOL)
        for k, e in enumerate(model.exits):
            if e.after_block == b:
                assert np.array_equal(fast.exit(k, xf), ref.exit(k, xr)), f"exit {k}"
    np.testing.assert_allclose(fast.head(xr), ref.head(xr), rtol=0, atol=LOGIT_ATOL)

    want = engine.run(model, images, ref, batch_size=16)
    got = engine.run(model, images, fast, batch_size=5)
    took = want.exit_index != engine.FINAL
    assert np.array_equal(got.exit_index, want.exit_index)
    assert np.array_equal(got.predictions, want.predictions)
    assert np.array_equal(got.entropies, want.entropies, equal_nan=True)
    assert np.array_equal(got.logits[took], want.logits[took])
    np.testing.assert_allclose(got.logits[~took], want.logits[~took], rtol=0, atol=LOGIT_ATOL)
    if net.exits:
        assert 0 < took.mean() < 1, "both the edge and the cloud should be exercised"


def test_fast_rejects_bad_images():
    fast = FastExecutor(GRID[2].model())
    with pytest.raises(ValueError, match="uint8"):
        fast.stem(np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.parametrize("net", NETS)
def test_edge_program_equals_reference(net):
    """The fast backend's edge program (one jitted call per segment) against the reference's
    layers, bit for bit: the whole edge from the images, a segment from a mid-edge state, and
    the exit logits it computes on the way."""
    model, images = grid_case(net, SAMPLES, net.seed + 300, 0.0)
    ref, fast = ReferenceExecutor(model), FastExecutor(model)
    n_edge = model.edge_blocks
    states = [ref.stem(images)]
    for b in range(n_edge):
        states.append(ref.block(b, states[-1]))
    got, logits = fast.segment(images, None, 0, n_edge, None)
    assert logits is None and np.array_equal(got, states[-1])
    for k, e in enumerate(model.exits):
        first = model.exits[k - 1].after_block + 1 if k else 0
        start = None if first == 0 else states[first]
        got, logits = fast.segment(images, start, first, e.after_block + 1, k)
        assert np.array_equal(got, states[e.after_block + 1]), f"segment to exit {k}"
        assert np.array_equal(logits, ref.exit(k, states[e.after_block + 1])), f"exit {k}"
