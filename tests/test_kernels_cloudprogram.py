"""The cloud program (kernels/cloudprogram.py): a chain of cloud blocks and the head in one
jitted call gives the bits of the same blocks called one by one, for every chunk split of a
batch, and the bits of the reference's pooled fixed-order linear as its head (within float32
rounding of the float64 head)."""
import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from test_kernels_cloud import conv
from xnorcdl.kernels import blas
from xnorcdl.kernels import reference as ref
from xnorcdl.kernels.cloudprogram import CloudProgram, head_into
from xnorcdl.kernels.ordered import pad_classes
from xnorcdl.kernels.registry import of_kind

SLOW = numba.config.DISABLE_JIT
SETTINGS = settings(max_examples=4 if SLOW else 20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
CLOUD_KERNELS = of_kind("cloud_block")
U = 2.0 ** -24

needs_sgemm = pytest.mark.skipif(blas.sgemm() is None,
                                 reason="no NumPy OpenBLAS: the program needs sgemm")


def chain(rng, name, c, kinds):
    """Blocks of kinds in order from c channels: identity keeps them, the others double them at
    stride 2 (zero-pad or 1x1-conv shortcut), as in ResNet-32."""
    blocks = []
    for kind in kinds:
        o, stride = (c, 1) if kind == "identity" else (2 * c, 2)
        c1, c2 = conv(rng, o, c, 3, stride, 1), conv(rng, o, o, 3, 1, 1)
        sc = conv(rng, o, c, 1, 2, 0) if kind == "conv1x1" else None
        blocks.append(CLOUD_KERNELS[name].build(c1, c2, kind, c // 2 if kind == "zero_pad"
                                                else 0, sc))
        c = o
    return blocks, c


def head_bound(a, weight, bias):
    """|error| of a float32 mean over H W terms, then a float32 dot product over C terms plus
    the bias, each summed in some order: gamma_{HW+1} on the means carried through |W|, and
    gamma_{C+1} on the dot product, doubled for second-order terms."""
    hw, c_n = a.shape[2] * a.shape[3], a.shape[1]
    f = a.astype(np.float64).mean(axis=(2, 3))
    mag = np.abs(f) @ np.abs(weight.astype(np.float64)).T + np.abs(bias)
    return 2 * ((hw + 1) + (c_n + 1)) * U * (mag + 1e-30)


@needs_sgemm
@pytest.mark.parametrize("name", list(CLOUD_KERNELS))
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 8), side=st.integers(2, 12),
       n=st.integers(1, 9),
       kinds=st.lists(st.sampled_from(["identity", "zero_pad", "conv1x1"]), min_size=1,
                      max_size=4))
@example(seed=1, c=4, side=16, n=5, kinds=["zero_pad", "identity"])   # ResNet-32's 32 -> 64
def test_program_gives_the_blocks_bits(name, seed, c, side, n, kinds):
    rng = np.random.default_rng(seed)
    blocks, c_out = chain(rng, name, c, kinds)
    weight = rng.standard_normal((10, c_out)).astype(np.float32)
    bias = rng.standard_normal(10).astype(np.float32)
    x = np.maximum(rng.standard_normal((n, c, side, side)), 0).astype(np.float32)
    prog = CloudProgram(blocks, weight, bias, (c, side, side))
    want = [x]
    for blk in blocks:
        want.append(blk(want[-1]))
    got, logits = prog.run(0, len(blocks), x, head=True)
    np.testing.assert_array_equal(got, want[-1])
    exact = want[-1].astype(np.float64).mean(axis=(2, 3)) @ weight.T.astype(np.float64) + bias
    assert logits.shape == (n, 10) and logits.dtype == np.float32
    assert (np.abs(logits - exact) <= head_bound(want[-1], weight, bias)).all()
    np.testing.assert_array_equal(logits, ref.ordered_linear(window_mean(want[-1]), weight,
                                                             bias))
    # a sub-range without the head; the work pools kept from the first call are reused
    a = len(blocks) // 2
    got, none = prog.run(a, len(blocks), want[a])
    assert none is None
    np.testing.assert_array_equal(got, want[-1])
    np.testing.assert_array_equal(prog.run(0, len(blocks), x, head=True)[1], logits)


def window_mean(a):
    """The global average pool of ``[N, C, H, H]`` in float32, each row's pixels summed left to
    right, then the row sums top to bottom, then one division (avg_pool_flat's order, which is
    NumPy's only for windows under 8 wide), ``[N, C]``."""
    n, c, h, w = a.shape
    out = np.empty((n, c), np.float32)
    for i in range(n):
        for j in range(c):
            total = np.float32(0)
            for y in range(h):
                row = np.float32(0)
                for v in a[i, j, y]:
                    row = np.float32(row + v)
                total = np.float32(total + row)
            out[i, j] = np.float32(total / np.float32(h * w))
    return out


def test_head_is_the_pooled_ordered_linear():
    """head_into: the exits' pool over one window and their fixed-order linear: the bits of the
    window-order mean followed by the reference's ``ordered_linear`` (classes padded as the
    program pads them), at a side where NumPy's own sum would pair terms (8)."""
    rng = np.random.default_rng(3)
    for side in (4, 8):
        a = rng.standard_normal((3, 5, side, side)).astype(np.float32)
        w = rng.standard_normal((7, 5)).astype(np.float32)
        b = rng.standard_normal(7).astype(np.float32)
        got = head_into(a, pad_classes(np.ascontiguousarray(w.T)), b,
                        np.empty((3, 7), np.float32))
        np.testing.assert_array_equal(got, ref.ordered_linear(window_mean(a), w, b))


@needs_sgemm
def test_bad_shapes_are_one_clear_error():
    rng = np.random.default_rng(0)
    blocks, c_out = chain(rng, "cloud_block_direct", 4, ["identity", "zero_pad"])
    w, b = np.zeros((10, c_out), np.float32), np.zeros(10, np.float32)
    prog = CloudProgram(blocks, w, b, (4, 8, 8))
    with pytest.raises(ValueError, match=r"x: expected float32 \[N, 4, 8, 8\]"):
        prog.run(0, 2, np.zeros((1, 4, 6, 6), np.float32))
    with pytest.raises(ValueError, match="head_weight"):
        CloudProgram(blocks, np.zeros((10, 3), np.float32), b, (4, 8, 8))
    with pytest.raises(ValueError, match="square"):
        CloudProgram(blocks, w, b, (4, 8, 6))
    with pytest.raises(ValueError, match="input channels"):
        CloudProgram(blocks[::-1], w, b, (4, 8, 8))
    with pytest.raises(ValueError, match="CloudBlock"):
        CloudProgram([], w, b, (4, 8, 8))
