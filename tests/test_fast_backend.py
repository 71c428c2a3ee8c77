"""FastExecutor against ReferenceExecutor: same predictions, same exits, same edge activations.

Depth-32 networks (20 edge convs, one exit after conv 20) with random weights
(xnorcdl.format.random_weights) and random images. The exit threshold is set to the median exit
entropy, so about half of the samples leave at the edge and half continue through the cloud.
"""
import numba
import numpy as np
import pytest

from conftest import random_images
from xnorcdl import engine
from xnorcdl.backends.reference import ReferenceExecutor
from xnorcdl.format import random_weights
from xnorcdl.backends.fast import FastExecutor
from xnorcdl.model import build_model
from xnorcdl.spec import ExitSpec, ModelSpec

# With NUMBA_DISABLE_JIT=1 the kernels run as Python: a depth-8 network and a few samples.
SLOW = numba.config.DISABLE_JIT
SAMPLES, DEPTH, EDGE = (4, 8, 4) if SLOW else (300, 32, 20)
CASES = [
    dict(edge_bits=1, shortcut="zero_pad"),
    dict(edge_bits=2, shortcut="conv1x1"),
    dict(edge_bits=4, shortcut="zero_pad"),
]
# Cloud layers fold BN into the GEMM: float32 results differ from the reference by a few
# roundings per layer (relative ~1e-6 per conv, FloatGemmConv); over up to 10 cloud convs and the
# head, logits of size O(1..10) agree to ~1e-4.
LOGIT_ATOL = 2e-4


def make_model(edge_bits, shortcut, edge_convs=EDGE, seed=1):
    spec = ModelSpec(depth=DEPTH, edge_convs=edge_convs, edge_bits=edge_bits, shortcut=shortcut,
                     exits=(ExitSpec(edge_convs, 0.0),))
    spec.validate()
    return build_model(spec, random_weights(spec, seed))


@pytest.mark.parametrize("case", CASES, ids=[f"{c['edge_bits']}bit-{c['shortcut']}" for c in CASES])
def test_predictions_and_exits_agree(case):
    model = make_model(**case)
    images = random_images(SAMPLES, seed=2)
    fast = FastExecutor(model)
    h = engine.run(model, images, fast).entropies[:, 0]
    thr = [float(np.median(h))]
    want = engine.run(model, images, ReferenceExecutor(model), thr, batch_size=100)
    got = engine.run(model, images, fast, thr, batch_size=100)
    took = want.exit_index == 0
    assert 0.25 < took.mean() < 0.75                     # both paths are exercised
    assert np.array_equal(got.exit_index, want.exit_index)
    assert np.array_equal(got.predictions, want.predictions)
    # exit logits and entropies come from the edge, which is bit-identical
    assert np.array_equal(got.logits[took], want.logits[took])
    assert np.array_equal(np.isnan(got.entropies), np.isnan(want.entropies))
    assert np.array_equal(got.entropies[~np.isnan(want.entropies)],
                          want.entropies[~np.isnan(want.entropies)])
    np.testing.assert_allclose(got.logits[~took], want.logits[~took], rtol=0, atol=LOGIT_ATOL)


@pytest.mark.parametrize("case", CASES, ids=[f"{c['edge_bits']}bit-{c['shortcut']}" for c in CASES])
def test_edge_layers_bit_identical(case):
    model = make_model(**case)
    images = random_images(2 if SLOW else 4, seed=3)
    ref, fast = ReferenceExecutor(model), FastExecutor(model)
    x = ref.stem(images)
    assert np.array_equal(fast.stem(images), x)
    for b, blk in enumerate(model.blocks):
        want = ref.block(b, x)
        got = fast.block(b, x)
        if blk.edge:
            assert np.array_equal(got, want), f"edge block {b}"
        else:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        x = want
    np.testing.assert_allclose(fast.head(x), ref.head(x), rtol=0, atol=LOGIT_ATOL)


def test_batch_size_one_matches_batched():
    model = make_model(edge_bits=1, shortcut="zero_pad", edge_convs=EDGE // 2)
    images = random_images(3 if SLOW else 12, seed=4)
    fast = FastExecutor(model)
    a = engine.run(model, images, fast, [0.8], batch_size=1)
    b = engine.run(model, images, fast, [0.8], batch_size=5)
    assert np.array_equal(a.exit_index, b.exit_index)
    assert np.array_equal(a.predictions, b.predictions)


def test_rejects_bad_images():
    fast = FastExecutor(make_model(edge_bits=1, shortcut="zero_pad", edge_convs=2))
    with pytest.raises(ValueError, match="uint8"):
        fast.stem(np.zeros((1, 3, 32, 32), np.float32))
