"""Weights format: round trip, and each kind of corruption gives its own clear error."""
import json
import os

import numpy as np
import pytest

from conftest import make_spec
from xnorcdl.format import META_KEY, WeightsError, load_weights, random_weights, save_weights
from xnorcdl.spec import ModelSpec, SpecError, expected_arrays


@pytest.fixture
def good(tmp_path):
    spec = make_spec(edge_convs=4, edge_bits=2, shortcut="conv1x1", exits=[(2, 0.5), (4, 1.0)])
    arrays = random_weights(spec, 1)
    path = str(tmp_path / "good.npz")
    save_weights(path, spec, arrays)
    return path, spec, arrays


def rewrite(path, arrays, meta=None, **extra):
    with np.load(path, allow_pickle=False) as z:
        meta_bytes = z[META_KEY]
    if meta is not None:
        meta_bytes = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **{META_KEY: meta_bytes}, **arrays, **extra)


def test_round_trip_is_lossless(good):
    path, spec, arrays = good
    spec2, arrays2 = load_weights(path)
    assert spec2 == spec
    assert arrays2.keys() == arrays.keys()
    for k in arrays:
        assert np.array_equal(arrays[k], arrays2[k]) and arrays2[k].dtype == np.float32


def test_resnet32_array_list():
    spec = ModelSpec(depth=32, edge_convs=20, exits=())
    names = expected_arrays(spec)
    assert names["conv20.weight"][0] == (32, 32, 3, 3)
    assert names["conv21.weight"][0] == (64, 32, 3, 3)
    assert names["conv20.bn.gamma"][0] == (32,)   # edge: BN over input channels
    assert names["conv21.bn.gamma"][0] == (64,)   # cloud: BN over output channels
    assert len([k for k in names if k.endswith(".weight")]) == 1 + 30 + 1
    assert spec.exit_features(10) == 1600 and spec.exit_features(20) == 800 and spec.exit_features(30) == 256


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.pop("conv3.weight"), "missing array 'conv3.weight'"),
    (lambda a: a.__setitem__("conv3.extra", np.zeros(2, np.float32)), "unexpected array"),
    (lambda a: a.__setitem__("head.bias", a["head.bias"].astype(np.float64)), "'head.bias' has dtype float64"),
    (lambda a: a["exit1.weight"].__setitem__((0, 0), np.nan), "'exit1.weight' holds 1 NaN/inf"),
    (lambda a: a["stem.conv.weight"].__setitem__((0, 0, 0, 0), np.inf), "'stem.conv.weight' holds 1 NaN/inf"),
    (lambda a: a["conv1.bn.var"].__setitem__(0, -1.0), "negative variances"),
])
def test_array_corruptions(good, mutate, message):
    path, _, arrays = good
    arrays = {k: v.copy() for k, v in arrays.items()}
    mutate(arrays)
    rewrite(path, arrays)
    with pytest.raises(WeightsError, match=message) as e:
        load_weights(path)
    assert path in str(e.value)


def test_wrong_shape_names_expected(good):
    path, _, arrays = good
    arrays = dict(arrays, **{"conv3.weight": np.zeros((32, 16, 1, 1), np.float32)})
    rewrite(path, arrays)
    with pytest.raises(WeightsError, match=r"'conv3.weight' has shape \[32, 16, 1, 1\], expected \[32, 16, 3, 3\]"):
        load_weights(path)


@pytest.mark.parametrize("field, value, message", [
    ("version", 2, "field 'version': this engine reads version 1"),
    ("format", "other", "field 'format'"),
    ("edge_convs", 3, "field 'edge_convs'.*between residual blocks"),
    ("edge_convs", 8, "field 'edge_convs'"),
    ("edge_bits", 3, "field 'edge_bits'"),
    ("depth", 30, "field 'depth'"),
    ("shortcut", "B", "field 'shortcut'"),
    ("exits", [{"after_conv": 6, "threshold": 0.5}], r"exits\[0\].after_conv"),
    ("exits", [{"after_conv": 2, "threshold": -1}], r"exits\[0\].threshold"),
    ("quantizer", {"v0": 1.0, "v1": 3.0, "v2": 0.5}, "symmetric quantizer"),
    ("bn_eps", 0, "field 'bn_eps'"),
    ("surprise", 1, "unknown field"),
])
def test_description_errors(good, field, value, message):
    path, spec, arrays = good
    meta = spec.to_json_dict()
    meta[field] = value
    rewrite(path, arrays, meta=meta)
    with pytest.raises(WeightsError, match=message):
        load_weights(path)


def test_missing_field(good):
    path, spec, arrays = good
    meta = spec.to_json_dict()
    del meta["bn_eps"]
    rewrite(path, arrays, meta=meta)
    with pytest.raises(WeightsError, match="missing field"):
        load_weights(path)


def test_not_an_archive_and_truncated(tmp_path, good):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match="not a readable .npz"):
        load_weights(str(bad))
    path = good[0]
    data = open(path, "rb").read()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.npz"):
        load_weights(str(cut))
    with pytest.raises(WeightsError, match="no such file"):
        load_weights(str(tmp_path / "absent.npz"))


def test_pickled_object_array_is_refused(good):
    path, _, arrays = good
    rewrite(path, arrays, extra_obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(WeightsError, match="pickle"):
        load_weights(path)


def test_missing_or_bad_meta(tmp_path, good):
    _, _, arrays = good
    p = str(tmp_path / "nometa.npz")
    np.savez(p, **arrays)
    with pytest.raises(WeightsError, match="missing array 'meta.json'"):
        load_weights(p)
    np.savez(p, **{META_KEY: np.frombuffer(b"{oops", np.uint8)}, **arrays)
    with pytest.raises(WeightsError, match="not valid UTF-8 JSON"):
        load_weights(p)


def test_save_is_atomic(tmp_path, good):
    _, spec, arrays = good
    target = tmp_path / "out.npz"
    bad = dict(arrays)
    bad.pop("head.bias")
    with pytest.raises(WeightsError):
        save_weights(str(target), spec, bad)
    assert os.listdir(tmp_path) == ["good.npz"]  # nothing half-written


def test_with_thresholds_validates():
    spec = make_spec(edge_convs=2, exits=[(2, 0.5)])
    assert spec.with_thresholds([1.5]).exits[0].threshold == 1.5
    with pytest.raises(SpecError):
        spec.with_thresholds([1.0, 2.0])
    with pytest.raises(SpecError):
        spec.with_thresholds([-1.0])
