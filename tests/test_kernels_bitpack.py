"""Bit packing convention (bit set = -1, LSB-first, pad bits zero) and the popcount primitive."""
import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from xnorcdl import quant
from xnorcdl.kernels import bitpack
from xnorcdl.kernels.popcount import popcount, popcount_sum

WIDTHS = [1, 3, 16, 32, 33, 63, 64, 65, 128, 130]


@pytest.mark.parametrize("channels", WIDTHS)
def test_pack_channels_every_bit(channels):
    rng = np.random.default_rng(channels)
    codes = np.where(rng.random((7, channels)) < 0.5, -1, 1).astype(np.int8)
    words = bitpack.pack_channels(codes)
    assert words.dtype == np.uint64 and words.shape == (7, bitpack.n_words(channels))
    for r in range(7):
        for c in range(bitpack.n_words(channels) * 64):
            bit = (int(words[r, c // 64]) >> (c % 64)) & 1
            assert bit == (c < channels and codes[r, c] == -1)   # pad bits stay zero
    assert np.array_equal(bitpack.unpack_channels(words, channels), codes)


@pytest.mark.parametrize("channels", WIDTHS)
def test_one_hot_lsb_first(channels):
    for c in range(channels):
        codes = np.ones(channels, np.int8)
        codes[c] = -1
        words = bitpack.pack_channels(codes)
        expect = np.zeros(bitpack.n_words(channels), np.uint64)
        expect[c // 64] = np.uint64(1) << np.uint64(c % 64)
        assert np.array_equal(words, expect)


@pytest.mark.parametrize("channels", WIDTHS)
def test_dot_product_identity(channels):
    """sum a w = K - 2 popcount(A XOR W), K the true width: pad bits must not count."""
    rng = np.random.default_rng(100 + channels)
    a = np.where(rng.random(channels) < 0.5, -1, 1)
    w = np.where(rng.random(channels) < 0.5, -1, 1)
    pop = int(popcount_sum(bitpack.pack_channels(a), bitpack.pack_channels(w)))
    assert channels - 2 * pop == int(a @ w)


@numba.njit
def popcount_of(v):
    return popcount(v)          # an intrinsic is callable from jitted code only


@settings(deadline=None)        # the first example compiles popcount_of (seconds on a busy host)
@given(st.integers(0, 2**64 - 1))
def test_popcount_matches_python(v):
    assert int(popcount_of(np.uint64(v))) == bin(v).count("1")


@pytest.mark.parametrize("bits", [2, 4])
def test_sign_planes_reconstruct_codes(bits):
    u = quant.kbit_codes(np.linspace(-1.5, 1.5, 101, dtype=np.float32), bits)
    s = bitpack.sign_planes(u, bits)
    assert set(np.unique(s)) <= {-1, 1}
    assert np.array_equal(sum((1 << i) * s[i].astype(np.int64) for i in range(bits)), u)
    with pytest.raises(ValueError):
        bitpack.sign_planes(np.array([2]), bits)       # even code: not a k-bit code


@pytest.mark.parametrize("channels", WIDTHS)
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_pack_activations_layout(channels, bits):
    """[planes, words, H, W]: each word channel-packed by the convention, exact zeros after BN
    packed as +1, every stale bit of the output cleared."""
    rng = np.random.default_rng(channels * 10 + bits)
    h, w = 3, 4
    x = rng.standard_normal((channels, h, w)).astype(np.float32) * 2
    scale = rng.standard_normal(channels).astype(np.float32)
    shift = rng.standard_normal(channels).astype(np.float32)
    x[:, 0, 0] = 0.0
    shift[::2] = 0.0                                  # y = 0 * s + 0 = 0 exactly: sign(0) = +1
    out = np.full((bits, bitpack.n_words(channels), h, w), 12345, np.uint64)
    bitpack.pack_activations(x, scale, shift, bits, 1.0, out)
    y = x * scale[:, None, None] + shift[:, None, None]
    planes = bitpack.sign_planes(quant.codes(y, bits), bits)          # [bits, C, h, w]
    expect = bitpack.pack_channels(planes.transpose(0, 2, 3, 1))      # [bits, h, w, words]
    assert np.array_equal(out, expect.transpose(0, 3, 1, 2))


def test_pack_weight_rows_order():
    """Row segment of (o, plane, kernel row r): tap kx channel c at bit kx * C + c."""
    c = 5
    w = np.ones((2, c, 3, 3), np.int8)
    w[1, 3, 2, 1] = -1                                # o = 1, c = 3, r = 2, kx = 1
    wp = bitpack.pack_weight_rows(w, 1)
    assert wp.shape == (2, 1, 3, 1)
    assert not wp[0].any()
    assert int(wp[1, 0, 2, 0]) == 1 << (1 * c + 3) and not wp[1, 0, :2].any()


@settings(max_examples=10 if numba.config.DISABLE_JIT else 60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), channels=st.integers(1, 64), h=st.integers(1, 12),
       w=st.integers(1, 12))
def test_binary_packing_tiles_equal_the_convention(seed, channels, h, w):
    """One word per pixel (C <= 64): the packing tiles (whole vectors of pixels, the rest by a
    loop) set the bit of each channel exactly when not (x * scale + shift >= 0): -0.0 and 0.0
    pack as +1, NaN as -1; stale bits of the output are overwritten."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((channels, h, w)) * 2).astype(np.float32)
    scale = rng.standard_normal(channels).astype(np.float32)
    shift = rng.standard_normal(channels).astype(np.float32)
    flat = x.reshape(channels, -1)
    picks = rng.integers(0, flat.shape[1], 3)
    flat[0, picks[0]], flat[-1, picks[1]], flat[channels // 2, picks[2]] = 0.0, -0.0, np.nan
    shift[::3] = 0.0
    out = np.full((1, 1, h, w), 2**64 - 1, np.uint64)
    bitpack.pack_activations(x, scale, shift, 1, 1.0, out)
    y = x * scale[:, None, None] + shift[:, None, None]
    want = np.zeros((h, w), np.uint64)
    for c in range(channels):
        want |= (~(y[c] >= 0)).astype(np.uint64) << np.uint64(c)
    assert np.array_equal(out[0, 0], want)
