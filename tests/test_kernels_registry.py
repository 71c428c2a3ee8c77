"""The kernels of the registry that are not convs (the exit and the input normalization) against
the NumPy reference, bit for bit; a check that the kernel tests cover every registered kernel
(a kernel added to the registry without a test of its kind fails here); and that the kernel
package imports nothing from the rest of xnorcdl."""
import ast
import pathlib

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import test_kernels_cloud
import test_kernels_conv
import xnorcdl.kernels
from xnorcdl.kernels import reference as ref
from xnorcdl.kernels.registry import KERNELS, KINDS, of_kind

SLOW = numba.config.DISABLE_JIT
SETTINGS = settings(max_examples=8 if SLOW else 40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
EXIT_KERNELS = of_kind("pooled_linear")
NORMALIZE_KERNELS = of_kind("normalize")


@pytest.mark.parametrize("name", list(EXIT_KERNELS))
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 40), h=st.integers(1, 20),
       w=st.integers(1, 20), o=st.integers(1, 40), n=st.integers(1, 3), pool=st.integers(1, 5))
def test_pooled_linear_exact(name, seed, c, h, w, o, n, pool):
    rng = np.random.default_rng(seed)
    h, w = max(h, pool), max(w, pool)               # at least one window
    x = (rng.standard_normal((n, c, h, w)) * 10.0 ** rng.integers(-2, 3, (n, c, h, w)))
    x = x.astype(np.float32)
    k = c * (h // pool) * (w // pool)
    weight = rng.standard_normal((o, k)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    got = EXIT_KERNELS[name].build(weight, bias, pool)(x)
    want = ref.ordered_linear(ref.avg_pool(x, pool).reshape(n, -1), weight, bias)
    assert got.dtype == np.float32 and got.shape == (n, o)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("name", list(EXIT_KERNELS))
def test_pooled_linear_rejects_a_mismatched_input(name):
    exit_ = EXIT_KERNELS[name].build(np.ones((2, 16), np.float32), np.zeros(2, np.float32), 3)
    assert exit_(np.ones((1, 4, 7, 7), np.float32)).tolist() == [[16.0, 16.0]]  # 4 x 2 x 2
    for side in (5, 9):                                 # 4 x 1 x 1 and 4 x 3 x 3 features
        with pytest.raises(ValueError, match="features"):
            exit_(np.ones((1, 4, side, side), np.float32))


@pytest.mark.parametrize("name", list(NORMALIZE_KERNELS))
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 3), h=st.integers(1, 12),
       w=st.integers(1, 12), pad=st.integers(0, 2))
def test_normalize_exact(name, seed, n, h, w, pad):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8)
    images[0, 0, 0, 0], images[-1, -1, -1, -1] = 0, 255
    mean = rng.random(3).astype(np.float32)
    std = (rng.random(3) + 0.1).astype(np.float32)
    got = NORMALIZE_KERNELS[name].build(mean, std)(images, pad)
    want = np.pad(ref.normalize(images, mean, std), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    assert got.dtype == np.float32
    assert np.array_equal(got, want)


@pytest.mark.parametrize("name", list(NORMALIZE_KERNELS))
def test_normalize_rejects_float_images(name):
    norm = NORMALIZE_KERNELS[name].build(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="uint8"):
        norm(np.zeros((1, 3, 4, 4), np.float32))


def test_every_registered_kernel_is_tested():
    """The names each kind's tests are parametrized over cover the whole registry."""
    tested = {
        "quant_conv": {name for name, _ in test_kernels_conv.QUANT_CASES},
        "float_conv": set(test_kernels_conv.FLOAT_KERNELS),
        "binary_block": set(test_kernels_conv.BLOCK_KERNELS),
        "cloud_block": set(test_kernels_cloud.CLOUD_KERNELS),
        "pooled_linear": set(EXIT_KERNELS),
        "normalize": set(NORMALIZE_KERNELS),
    }
    assert set(tested) == set(KINDS)
    assert set().union(*tested.values()) == set(KERNELS)
    for name, k in KERNELS.items():
        assert name in tested[k.kind], f"{name} ({k.kind}) is registered but not tested"
    for name, k in test_kernels_conv.QUANT_KERNELS.items():      # every precision it takes
        assert {b for n, b in test_kernels_conv.QUANT_CASES if n == name} == set(k.bits)


def test_kernels_are_a_leaf_package():
    """No kernel module imports the rest of xnorcdl (absolutely, or relatively from above)."""
    files = sorted(pathlib.Path(xnorcdl.kernels.__path__[0]).glob("*.py"))
    assert len(files) > 5
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name}: from {'.' * node.level}{node.module}"
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            bad = [n for n in names if n.split(".")[0] == "xnorcdl"]
            assert not bad, f"{path.name} imports {bad}"
