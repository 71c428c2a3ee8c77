"""Algorithm 1 semantics (entropy, strictness, thresholds) with both backends; whole networks
against the naive forward pass and against each other are in test_network_grid.py."""
import math

import numpy as np
import pytest

from conftest import make_spec, random_images
from xnorcdl import backends, engine
from xnorcdl.format import random_weights
from xnorcdl.model import build_model

each_backend = pytest.mark.parametrize("backend", list(backends.BACKENDS))


def test_entropy_of_uniform_is_log_c():
    for c in (2, 10, 100):
        assert engine.entropy(np.zeros((1, c), np.float32))[0] == pytest.approx(math.log(c), abs=1e-12)


def test_entropy_of_one_hot_is_zero_and_handles_huge_logits():
    h = engine.entropy(np.array([[1e4, 0, 0], [0, -1e30, 5]], np.float32))
    assert h[0] == 0.0
    assert h[1] == pytest.approx(-sum(p * math.log(p) for p in
                                      np.exp([0, 5]) / np.exp([0, 5]).sum()), rel=1e-9)


def test_entropy_does_not_depend_on_memory_layout():
    """Exit decisions compare H with a threshold to the last bit: a transposed or strided logits
    array must give the bits of its contiguous copy."""
    z = (np.random.default_rng(0).standard_normal((300, 100)) * 8).astype(np.float32)
    want = engine.entropy(z)
    assert np.array_equal(engine.entropy(np.asfortranarray(z)), want)
    assert np.array_equal(engine.entropy(np.ascontiguousarray(z.T).T), want)
    wide = np.zeros((300, 200), np.float32)
    wide[:, ::2] = z
    assert np.array_equal(engine.entropy(wide[:, ::2]), want)


def _model(thresholds, seed=0):
    spec = make_spec(edge_convs=6, exits=[(2, t) for t in thresholds[:1]] + [(6, t) for t in thresholds[1:]])
    return build_model(spec, random_weights(spec, seed))


@each_backend
def test_threshold_zero_means_no_exit(backend):
    m = _model([0.0, 0.0])
    res = engine.run(m, random_images(8), backends.get(backend)(m))
    assert (res.exit_index == engine.FINAL).all()
    assert not np.isnan(res.entropies).any()  # every exit was evaluated


@each_backend
def test_huge_threshold_exits_everything_at_first_exit(backend):
    m = _model([1e9, 1e9])
    res = engine.run(m, random_images(8), backends.get(backend)(m))
    assert (res.exit_index == 0).all()
    assert np.isnan(res.entropies[:, 1]).all()  # exit 1 never evaluated


@each_backend
def test_strict_inequality_at_equality(backend):
    m = _model([0.0, 0.0])
    images = random_images(4)
    h = engine.run(m, images, backends.get(backend)(m)).entropies[:, 0]
    at = engine.run(m, images, backends.get(backend)(m), thresholds=[float(h[0]), 0.0])
    assert at.exit_index[0] == engine.FINAL  # H == threshold does not exit
    above = engine.run(m, images, backends.get(backend)(m), thresholds=[float(np.nextafter(h[0], 10)), 0.0])
    assert above.exit_index[0] == 0


@each_backend
def test_wrong_number_of_thresholds(backend):
    m = _model([0.0, 0.0])
    with pytest.raises(ValueError, match="threshold"):
        engine.run(m, random_images(1), backends.get(backend)(m), thresholds=[1.0])
