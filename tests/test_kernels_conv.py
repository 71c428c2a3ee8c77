"""Every registered conv and block kernel against the NumPy reference (kernels/reference.py).

Quantized kernels must be bit-identical to ``reference.quant_conv``; float kernels must stay
within the float32 error bound derived in ``FloatGemmConv`` (or be bit-identical where the
registry says so); binary block kernels must equal two reference convs plus the shortcut.
Inputs are generated from a drawn seed so hypothesis can shrink shapes.
"""
import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from xnorcdl import quant
from xnorcdl.kernels import reference as ref
from xnorcdl.kernels.binaryblock import sign_intervals
from xnorcdl.kernels.bitconv import BitConv
from xnorcdl.kernels.registry import FLOAT_KERNELS, QUANT_KERNELS, of_kind

SLOW = numba.config.DISABLE_JIT          # kernels run as plain Python: fewer, smaller cases
MAX_C, MAX_HW = (70, 9) if SLOW else (130, 17)
EXAMPLES = 4 if SLOW else 25
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

QUANT_CASES = [(name, bits) for name, k in QUANT_KERNELS.items() for bits in k.bits]
BLOCK_KERNELS = of_kind("binary_block")


def bn_inputs(rng, n, c, h, w):
    """x, bn_scale, bn_shift with exact zeros after BN and values on quantizer boundaries.

    * For about a third of the channels, ``shift = -fl(x0 * scale)`` and a fifth of the pixels
      are x0: then ``y = fl(fl(x0 * scale) + shift) = 0`` exactly, so sign(0) = +1 is exercised.
      A fused multiply-add would instead give the rounding error of x0 * scale, often negative,
      so these pixels also catch an FMA contraction.
    * Some channels have scale 0 (y = shift everywhere) or scale 0 and shift 0 (y = 0).
    * Pixels of +-0.0 and values beyond +-1 (clipped by the k-bit quantizer) are included.
    """
    x = (rng.standard_normal((n, c, h, w)) * rng.choice([0.5, 1.0, 2.0])).astype(np.float32)
    scale = rng.standard_normal(c).astype(np.float32)
    shift = (rng.standard_normal(c) * 0.5).astype(np.float32)
    x0 = rng.standard_normal(c).astype(np.float32)
    zero_ch = rng.random(c) < 0.35
    shift[zero_ch] = -(x0 * scale)[zero_ch]
    pick = (rng.random((n, c, h, w)) < 0.2) & zero_ch[None, :, None, None]
    x[pick] = np.broadcast_to(x0[None, :, None, None], x.shape)[pick]
    flat = rng.random(c) < 0.1
    scale[flat] = 0.0
    shift[flat & (rng.random(c) < 0.5)] = 0.0
    x[rng.random(x.shape) < 0.03] = 0.0
    x[rng.random(x.shape) < 0.03] = -0.0
    return x, scale, shift


def quant_case(seed, bits, n, c, o, h, w):
    rng = np.random.default_rng(seed)
    x, scale, shift = bn_inputs(rng, n, c, h, w)
    v0 = float(rng.choice([1.0, 0.5, 2.0])) if bits > 1 else 1.0
    w_codes = quant.codes(rng.standard_normal((o, c, 3, 3)).astype(np.float32), bits, v0)
    out_scale = (rng.random(o) + 0.1).astype(np.float32)
    return x, scale, shift, w_codes, out_scale, v0


def check_quant(name, bits, seed, n, c, o, h, w, stride):
    x, scale, shift, w_codes, out_scale, v0 = quant_case(seed, bits, n, c, o, h, w)
    conv = QUANT_KERNELS[name].build(w_codes, out_scale, scale, shift, bits, v0, stride)
    got = conv(x)
    want = ref.quant_conv(x, scale, shift, w_codes, out_scale, bits, v0, stride, 1)
    assert got.shape == want.shape and got.dtype == np.float32
    bad = np.argwhere(got != want)
    assert len(bad) == 0, f"{len(bad)} mismatches, first at {bad[0].tolist()}: " \
                          f"{got[tuple(bad[0])]} != {want[tuple(bad[0])]}"


@pytest.mark.parametrize("name,bits", QUANT_CASES)
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1),
       c=st.one_of(st.sampled_from([1, 63, 64, 65, MAX_C]), st.integers(1, MAX_C)),
       o=st.integers(1, 9), h=st.integers(1, MAX_HW), w=st.integers(1, MAX_HW),
       stride=st.sampled_from([1, 2]), n=st.integers(1, 2))
def test_quant_kernel_exact(name, bits, seed, c, o, h, w, stride, n):
    check_quant(name, bits, seed, n, c, o, h, w, stride)


@pytest.mark.parametrize("name,bits", QUANT_CASES)
@pytest.mark.parametrize("c", [63, 64, 65])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (7, 8)])
def test_quant_kernel_word_boundaries(name, bits, c, stride, hw):
    check_quant(name, bits, 7 * c + stride, 1, c, 3, hw[0], hw[1], stride)


@pytest.mark.parametrize("name,bits", QUANT_CASES)
def test_resnet_shapes_exact(name, bits):
    for c, o, hw, stride in [(16, 16, 32, 1), (16, 32, 32, 2), (32, 64, 16, 2), (64, 64, 8, 1)]:
        check_quant(name, bits, c + o + hw, 1, c, o, hw, hw, stride)


def test_inputs_hit_zero_and_would_catch_fma():
    """The generated inputs give exact zeros after BN, and an FMA-contracted BN (one rounding)
    would change the sign of some of them: so a contracting kernel fails the tests above."""
    x, scale, shift = bn_inputs(np.random.default_rng(3), 1, 64, 8, 8)
    y = x * scale[None, :, None, None] + shift[None, :, None, None]
    fused = (x.astype(np.float64) * scale[None, :, None, None] + shift[None, :, None, None])
    fused = fused.astype(np.float32)     # exact product, one rounding: what an FMA gives
    assert (y == 0).sum() > 50
    assert (quant.sign_codes(fused) != quant.sign_codes(y)).any()


def test_padding_correction_is_needed():
    """Without the zero-padding correction the border outputs are wrong: the tests can fail."""
    x, scale, shift, w_codes, out_scale, v0 = quant_case(11, 1, 1, 16, 4, 5, 5)
    want = ref.quant_conv(x, scale, shift, w_codes, out_scale, 1, v0, 1, 1)
    assert np.array_equal(BitConv(w_codes, out_scale, scale, shift, 1, v0, 1)(x), want)
    conv = BitConv(w_codes, out_scale, scale, shift, 1, v0, 1)
    conv.corr[:] = 0                                  # before the first call builds base planes
    got = conv(x)
    assert not np.array_equal(got, want)
    assert np.array_equal(got[:, :, 1:-1, 1:-1], want[:, :, 1:-1, 1:-1])   # interior unaffected


def test_bitconv_rejects_bad_arguments():
    w = np.ones((2, 3, 3, 3), np.int8)
    s = np.ones(2, np.float32)
    c = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="stride"):
        BitConv(w, s, c, c, 1, 1.0, 3)
    with pytest.raises(ValueError, match="w_codes"):
        BitConv(w[:, :, :2], s, c, c, 1, 1.0, 1)
    with pytest.raises(ValueError, match="bn_scale"):
        BitConv(w, s, s, c, 1, 1.0, 1)
    with pytest.raises(ValueError, match="x: expected"):
        BitConv(w, s, c, c, 1, 1.0, 1)(np.zeros((1, 4, 5, 5), np.float32))


def float_bound(x, weight, scale, shift, stride, pad):
    """2 gamma_{K+2} (|scale| sum|W||x| + |shift|): the largest distance between two float32
    evaluations of BN(conv) that sum in different orders (derivation in FloatGemmConv)."""
    k = weight[0].size
    u = 2.0 ** -24
    gamma = (k + 2) * u / (1 - (k + 2) * u)
    mag = ref.conv2d(np.abs(x).astype(np.float64), np.abs(weight).astype(np.float64), stride, pad)
    return 2 * gamma * (np.abs(scale)[None, :, None, None] * mag
                        + np.abs(shift)[None, :, None, None])


@pytest.mark.parametrize("name", list(FLOAT_KERNELS))
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 70), o=st.integers(1, 9),
       h=st.integers(1, MAX_HW), w=st.integers(1, MAX_HW), n=st.integers(1, 2),
       geometry=st.sampled_from([(3, 1, 1), (3, 2, 1), (1, 2, 0), (1, 1, 0)]))
def test_float_kernel_within_bound(name, seed, c, o, h, w, n, geometry):
    k, stride, pad = geometry
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((o, c, k, k)).astype(np.float32)
    scale = rng.standard_normal(o).astype(np.float32)
    shift = rng.standard_normal(o).astype(np.float32)
    kernel = FLOAT_KERNELS[name]
    got = kernel.build(weight, scale, shift, stride, pad)(x)
    want = ref.float_conv_bn(x, weight, scale, shift, stride, pad, ordered=kernel.exact)
    assert got.shape == want.shape and got.dtype == np.float32
    if kernel.exact:
        assert np.array_equal(got, want)
    else:
        err = np.abs(got.astype(np.float64) - want)
        assert (err <= float_bound(x, weight, scale, shift, stride, pad)).all()


def test_float_kernel_buffers_reused_and_relu():
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    scale, shift = np.ones(4, np.float32), rng.standard_normal(4).astype(np.float32)
    conv = FLOAT_KERNELS["gemm_ordered_unfolded"].build(weight, scale, shift, 1, 1)
    x1, x2 = (rng.standard_normal((1, 3, 6, 6)).astype(np.float32) for _ in range(2))
    y1 = conv(x1).copy()
    y2 = conv(x2, relu=True)
    assert len(conv._buffers) == 1                  # one scratch set for the one input shape
    assert np.array_equal(conv(x1), y1)             # a second call does not see stale data
    assert np.array_equal(y2, np.maximum(ref.float_conv_bn(x2, weight, scale, shift, 1, 1,
                                                           ordered=True), 0))


def block_case(seed, c, h, w, stride, kind):
    """A binary edge block's parameters and input (conv1 C -> O with stride, conv2 O -> O)."""
    rng = np.random.default_rng(seed)
    o = 2 * c if stride == 2 else c
    x, bn1_s, bn1_t = bn_inputs(rng, 2, c, h, w)
    w1 = quant.sign_codes(rng.standard_normal((o, c, 3, 3)))
    w2 = quant.sign_codes(rng.standard_normal((o, o, 3, 3)))
    s1, s2 = (rng.random(o) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float32), \
        rng.random(o).astype(np.float32)
    s1[rng.random(o) < 0.1] = 0.0                      # alpha = 0: t = 0 everywhere
    bn2_s = (rng.standard_normal(o) * rng.choice([1e-3, 1.0, 1e3])).astype(np.float32)
    bn2_s[rng.random(o) < 0.1] = 0.0
    bn2_t = (rng.standard_normal(o) * rng.choice([1e-2, 1.0])).astype(np.float32)
    # put some BN2 zero crossings exactly on an attainable t = A * s1 (sign(0) at the threshold)
    a = rng.integers(-9 * c, 9 * c + 1, o).astype(np.float32)
    on = rng.random(o) < 0.3
    bn2_t[on] = -((a * s1) * bn2_s)[on]
    sc = None
    if kind == "conv1x1":
        sc = rng.standard_normal((2, o, (h - 1) // stride + 1, (w - 1) // stride + 1))
        sc = sc.astype(np.float32)
    return x, (bn1_s, bn1_t, w1, s1), (bn2_s, bn2_t, w2, s2), sc


def reference_block(x, p1, p2, kind, stride, sc):
    t = ref.quant_conv(x, p1[0], p1[1], p1[2], p1[3], 1, 1.0, stride)
    t = ref.quant_conv(t, p2[0], p2[1], p2[2], p2[3], 1, 1.0, 1)
    if kind == "identity":
        return t + x
    if kind == "zero_pad":
        p = x.shape[1] // 2
        return t + np.pad(x[:, :, ::2, ::2], ((0, 0), (p, p), (0, 0), (0, 0)))
    return t + sc


@pytest.mark.parametrize("name", list(BLOCK_KERNELS))
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c=st.one_of(st.sampled_from([16, 32, 64, 65]),
                                                    st.integers(1, MAX_C // 2)),
       h=st.integers(1, MAX_HW), w=st.integers(1, MAX_HW),
       geometry=st.sampled_from([(1, "identity"), (2, "zero_pad"), (2, "conv1x1"),
                                 (1, "conv1x1")]))
def test_binary_block_exact(name, seed, c, h, w, geometry):
    stride, kind = geometry
    if kind == "zero_pad" and c % 2:
        c += 1                                          # zero-pad needs an even width
    x, p1, p2, sc = block_case(seed, c, h, w, stride, kind)
    conv1 = BitConv(p1[2], p1[3], p1[0], p1[1], 1, 1.0, stride)
    conv2 = BitConv(p2[2], p2[3], p2[0], p2[1], 1, 1.0, 1)
    block = BLOCK_KERNELS[name].build(conv1, conv2, kind, c // 2 if kind == "zero_pad" else 0)
    got = block(x, sc)
    want = reference_block(x, p1, p2, kind, stride, sc)
    assert np.array_equal(got, want)


def test_sign_intervals_match_enumeration():
    """[lo, hi] is exactly the set of integer sums whose BN2(float32(A) * s1) has sign -1."""
    rng = np.random.default_rng(9)
    k = 144
    s1 = np.array([0.5, 0.0, 1e-3, 2.0, 0.7], np.float32)
    bs = np.array([1.0, -1.0, -3.0, 0.0, 1e-6], np.float32)
    bt = np.array([-7.0, 0.5, 0.0, -1.0, rng.standard_normal()], np.float32)
    lo, hi = sign_intervals(s1, bs, bt, k)
    a = np.arange(-k, k + 1)
    for o in range(len(s1)):
        y = (a.astype(np.float32) * s1[o]) * bs[o] + bt[o]
        assert np.array_equal(quant.sign_codes(y) < 0, (a >= lo[o]) & (a <= hi[o])), o
