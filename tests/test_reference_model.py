"""The reference engine against tests/naive.py, an independent direct implementation."""
import numpy as np
import pytest

import naive
from conftest import make_spec, random_images
from xnorcdl import engine
from xnorcdl.backends.reference import ReferenceExecutor
from xnorcdl.format import random_weights
from xnorcdl.model import build_model

CASES = [
    dict(edge_convs=0),
    dict(edge_convs=0, shortcut="conv1x1"),
    dict(edge_convs=2, edge_bits=1, exits=[(2, 0.0)]),
    dict(edge_convs=4, edge_bits=1, shortcut="conv1x1", exits=[(2, 0.0), (4, 0.0)]),
    dict(edge_convs=6, edge_bits=1, exits=[(6, 0.0)]),
    dict(edge_convs=4, edge_bits=2, exits=[(4, 0.0)]),
    dict(edge_convs=6, edge_bits=4, shortcut="conv1x1", exits=[(2, 0.0)]),
    dict(edge_convs=4, edge_bits=4, v0=0.5, v1=1.0, exits=[(4, 0.0)]),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_reference_matches_naive(case):
    spec = make_spec(num_classes=7, **case)
    arrays = random_weights(spec, seed=3)
    model = build_model(spec, arrays)
    meta = spec.to_json_dict()
    images = random_images(3, seed=5)
    res = engine.run(model, images, ReferenceExecutor(model))
    for i, img in enumerate(images):
        logits, k, ent = naive.forward(meta, arrays, img)
        assert res.exit_index[i] == k == -1  # thresholds 0: nobody exits
        # float32 engine vs float64 naive over up to 8 layers: relative error ~1e-5
        np.testing.assert_allclose(res.logits[i], logits, rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(res.entropies[i], ent, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_exit_decisions_match_naive(bits):
    """With each threshold between the samples' entropies, both take the same exits."""
    spec0 = make_spec(edge_convs=6, edge_bits=bits, exits=[(2, 0.0), (6, 0.0)])
    arrays = random_weights(spec0, seed=bits)
    images = random_images(6, seed=bits)
    model0 = build_model(spec0, arrays)
    ent = engine.run(model0, images, ReferenceExecutor(model0)).entropies
    thr = [float(np.median(ent[:, 0])), float(np.median(ent[:, 1]))]
    spec = spec0.with_thresholds(thr)
    model = build_model(spec, arrays)
    res = engine.run(model, images, ReferenceExecutor(model), batch_size=4)
    for i, img in enumerate(images):
        logits, k, _ = naive.forward(spec.to_json_dict(), arrays, img)
        assert res.exit_index[i] == k
        assert res.predictions[i] == int(np.argmax(logits))
    assert set(res.exit_index) - {-1}, "the median threshold should let some samples exit"
