"""The cloud block kernels against the reference's cloud block (xnorcdl/backends/reference.py):
``relu(BN2(conv2(relu(BN1(conv1(x))))) + shortcut(x))`` within the float32 bound of its folded
GEMMs, for every shortcut and batch sizes above one (each sample's GEMM is its own)."""
import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from test_kernels_conv import float_bound
from xnorcdl.kernels import reference as ref
from xnorcdl.kernels.registry import of_kind
from xnorcdl.model import FloatConv

SLOW = numba.config.DISABLE_JIT
SETTINGS = settings(max_examples=4 if SLOW else 25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
CLOUD_KERNELS = of_kind("cloud_block")
U = 2.0 ** -24


def conv(rng, o, c, k, stride, pad):
    w = (rng.standard_normal((o, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
    return FloatConv("c", w, rng.uniform(0.5, 1.5, o).astype(np.float32),
                     rng.normal(0, 0.3, o).astype(np.float32), stride, pad, False)


def reference(x, c1, c2, kind, pad_channels, sc):
    t = np.maximum(ref.float_conv_bn(x, c1.weight, c1.bn_scale, c1.bn_shift, c1.stride, 1), 0)
    t2 = ref.float_conv_bn(t, c2.weight, c2.bn_scale, c2.bn_shift, 1, 1)
    if kind == "identity":
        s = x
    elif kind == "zero_pad":
        p = pad_channels
        s = np.pad(x[:, :, ::2, ::2], ((0, 0), (p, t2.shape[1] - p - x.shape[1]), (0, 0), (0, 0)))
    else:
        s = ref.float_conv_bn(x, sc.weight, sc.bn_scale, sc.bn_shift, 2, 0)
    return np.maximum(t2 + s, 0), t, s


def bound(x, c1, c2, t, s, kind, sc):
    """Error of conv1 (float_bound) carried through conv2 (at most |scale2| sum |W2| e1 per
    output, ReLU being 1-Lipschitz), plus conv2's own bound and the shortcut conv's, plus one
    rounding of the residual sum; all doubled for the second-order terms (products of two
    roundings, and conv2's bound taken on the reference's input rather than the kernel's)."""
    e1 = float_bound(x, c1.weight, c1.bn_scale, c1.bn_shift, c1.stride, 1)
    carried = np.abs(c2.bn_scale)[None, :, None, None] * ref.conv2d(
        e1, np.abs(c2.weight).astype(np.float64), 1, 1)
    e = carried + float_bound(t, c2.weight, c2.bn_scale, c2.bn_shift, 1, 1)
    if kind == "conv1x1":
        e = e + float_bound(x, sc.weight, sc.bn_scale, sc.bn_shift, 2, 0)
    return 2 * (e + U * (np.abs(s) + np.abs(e) + 1e-30))


@pytest.mark.parametrize("name", list(CLOUD_KERNELS))
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 40), h=st.integers(1, 12),
       w=st.integers(1, 12), n=st.integers(1, 3),
       kind=st.sampled_from(["identity", "zero_pad", "conv1x1"]))
def test_cloud_block_within_bound(name, seed, c, h, w, n, kind):
    rng = np.random.default_rng(seed)
    stride = 1 if kind == "identity" else 2
    o = c if kind == "identity" else 2 * c
    x = np.maximum(rng.standard_normal((n, c, h, w)), 0).astype(np.float32)  # a block output
    c1, c2 = conv(rng, o, c, 3, stride, 1), conv(rng, o, o, 3, 1, 1)
    sc = conv(rng, o, c, 1, 2, 0) if kind == "conv1x1" else None
    pad_channels = c // 2 if kind == "zero_pad" else 0
    block = CLOUD_KERNELS[name].build(c1, c2, kind, pad_channels, sc)
    got = block(x)
    want, t, s = reference(x, c1, c2, kind, pad_channels, sc)
    assert got.shape == want.shape and got.dtype == np.float32
    err = np.abs(got.astype(np.float64) - want)
    assert (err <= bound(x, c1, c2, t, s, kind, sc)).all()
    # buffers are kept per shape: a second call on other data does not see the first
    x2 = np.maximum(rng.standard_normal(x.shape), 0).astype(np.float32)
    assert np.array_equal(block(x2), CLOUD_KERNELS[name].build(c1, c2, kind, pad_channels,
                                                               sc)(x2))
    assert np.array_equal(block(x), got)


def test_numpy_openblas_sgemm_is_found():
    """The wheels this project installs ship NumPy's OpenBLAS in numpy.libs: the jitted block
    path must be the one that runs (XNORCDL_JIT_SGEMM=0 turns it off on purpose)."""
    import os
    from xnorcdl.kernels import blas
    if os.environ.get("XNORCDL_JIT_SGEMM") == "0":
        pytest.skip("XNORCDL_JIT_SGEMM=0")
    assert blas.sgemm() is not None, blas._libraries()


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 40), h=st.integers(1, 12),
       w=st.integers(1, 12), n=st.integers(1, 6),
       kind=st.sampled_from(["identity", "zero_pad", "conv1x1"]))
@example(seed=0, c=2, h=1, w=1, n=5, kind="zero_pad")   # chunks of 4 + 1 one-column sample
def test_jitted_sgemm_block_equals_the_numpy_path(seed, c, h, w, n, kind):
    """One jitted call per chunk (sgemm called from jitted code) gives the very bits of the
    same block run with np.matmul between the jitted passes, wherever np.matmul itself calls
    sgemm (both sides of every product wider than one, in every chunk of samples)."""
    from xnorcdl.kernels import blas
    if blas.sgemm() is None:
        pytest.skip("no NumPy OpenBLAS found: only the np.matmul path exists")
    rng = np.random.default_rng(seed)
    stride = 1 if kind == "identity" else 2
    o = c if kind == "identity" else 2 * c
    x = np.maximum(rng.standard_normal((n, c, h, w)), 0).astype(np.float32)
    c1, c2 = conv(rng, o, c, 3, stride, 1), conv(rng, o, o, 3, 1, 1)
    sc = conv(rng, o, c, 1, 2, 0) if kind == "conv1x1" else None
    kernel = CLOUD_KERNELS["cloud_block_folded"]
    jitted = kernel.build(c1, c2, kind, c // 2 if kind == "zero_pad" else 0, sc)
    plain = kernel.build(c1, c2, kind, c // 2 if kind == "zero_pad" else 0, sc)
    plain._sgemm = None
    got, want = jitted(x), plain(x)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    # the block multiplies chunks of up to CHUNK samples: the last one may hold fewer columns
    from xnorcdl.kernels.cloudblock import CHUNK
    narrowest = min(CHUNK, n - (n - 1) // CHUNK * CHUNK) * ho * wo
    if o > 1 and narrowest > 1:
        np.testing.assert_array_equal(got, want)
    else:       # np.matmul takes gemv for a one-row or one-column product: another sum order
        ref_out, t, s = reference(x, c1, c2, kind, c // 2 if kind == "zero_pad" else 0, sc)
        assert (np.abs(got.astype(np.float64) - ref_out) <= bound(x, c1, c2, t, s, kind, sc)).all()
