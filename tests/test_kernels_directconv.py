"""The direct 3x3 conv (xnorcdl/kernels/directconv.py): its packing exactly, its sums within the
float32 bound of a 9C-term dot product, the cloud block taking it where its tiles fit, and its
inner loop as FMA on vector registers."""
import math
import re

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from test_kernels_cloud import CLOUD_KERNELS, bound, conv, reference
from xnorcdl.kernels import directconv

SLOW = numba.config.DISABLE_JIT
SETTINGS = settings(max_examples=4 if SLOW else 25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
U = 2.0 ** -24


def padded_flat(x):
    """x ``[N, C, H, W]`` as the zero-padded flat images ``[N, C, (H+2)(W+2) + 2]``."""
    n, c, h, w = x.shape
    xp = np.zeros((n, c, (h + 2) * (w + 2) + 2), np.float32)
    xp[:, :, :(h + 2) * (w + 2)] = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))).reshape(n, c, -1)
    return xp


def conv_float64(x, w4, stride):
    """The 3x3 conv (pad 1) in float64 and the sums of |w| |x| of each output,
    ``[O, N, Ho, Wo]`` both."""
    n, c, h, w = x.shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    xpad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))).astype(np.float64)
    want = np.zeros((w4.shape[0], n, ho, wo))
    mag = np.zeros_like(want)
    for ky in range(3):
        for kx in range(3):
            win = xpad[:, :, ky:ky + stride * (ho - 1) + 1:stride,
                       kx:kx + stride * (wo - 1) + 1:stride]
            want += np.einsum("oc,nchw->onhw", w4[:, :, ky, kx].astype(np.float64), win)
            mag += np.einsum("oc,nchw->onhw", np.abs(w4[:, :, ky, kx]).astype(np.float64),
                             np.abs(win))
    return want, mag


def assert_within_gamma(kernels, args, x, w4, stride):
    """Each kernel ``fn(*args, t)`` writes every output of ``t [O, N, Ho Wo]`` finite and within
    ``gamma_{9C} sum |w| |x|`` of the float64 conv (each a 9C-term dot product summed by FMA,
    one rounding per term)."""
    want, mag = conv_float64(x, w4, stride)
    o, n, ho, wo = want.shape
    k = 9 * x.shape[1]
    tol = k * U / (1 - k * U) * mag + 1e-30
    for fn in kernels:
        t = np.full((o, n, ho * wo), np.nan, np.float32)
        fn(*args, t)
        got = t.reshape(o, n, ho, wo).astype(np.float64)
        assert np.isfinite(got).all(), fn.__name__
        assert (np.abs(got - want) <= tol).all(), fn.__name__


# shapes the tiles cover: rows of 8, 16 or 24 pixels, PIXELS (16 or 32) pixels per tile, 4
# channels per tile
PIX = directconv.PIXELS
tiled = st.tuples(st.sampled_from([8, 16, 24]), st.integers(1, 6)).map(
    lambda wh: (wh[1] * (PIX // math.gcd(PIX, wh[0])), wh[0]))


def test_supports():
    assert directconv.supports(16, 32, 32) and directconv.supports(64, 8, 8)
    assert directconv.supports(4, PIX // 16, 16) and directconv.supports(8, PIX // 8, 8)
    assert not directconv.supports(6, 8, 8)      # channels not a multiple of 4
    assert not directconv.supports(8, 8, 12)     # rows not made of 8-pixel runs
    assert not directconv.supports(8, PIX // 8 - 1, 8)   # not a whole tile


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), ob=st.integers(1, 4), c=st.integers(1, 9),
       h=st.integers(1, 9), w=st.integers(1, 9))
def test_pack_and_offsets_layout(seed, ob, c, h, w):
    rng = np.random.default_rng(seed)
    o = 4 * ob
    w9 = rng.standard_normal((9, o, c)).astype(np.float32)
    ap = directconv.pack(w9)
    assert ap.shape == (ob, 9 * c, 4) and ap.flags.c_contiguous
    length = (h + 2) * (w + 2) + 2
    boff = directconv.offsets(c, h, w, length)
    for tap in range(9):
        for ch in range(c):
            k = tap * c + ch
            assert np.array_equal(ap[:, k, :].reshape(-1), w9[tap, :, ch])
            assert boff[k] == ch * length + (tap // 3) * (w + 2) + tap % 3


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), ob=st.integers(1, 4), c=st.integers(1, 24),
       hw=tiled, n=st.integers(1, 3))
@example(seed=0, ob=16, c=64, hw=(8, 8), n=2)        # the last stage of ResNet-32
def test_conv3x3_within_bound(seed, ob, c, hw, n):
    """``|t - conv| <= gamma_{9C} sum |w| |x|`` per output (each a 9C-term dot product summed
    by FMA, one rounding per term), against the float64 conv, for the jitted tiles and the NumPy
    fallback alike; every output of the dense rows is written."""
    h, w = hw
    rng = np.random.default_rng(seed)
    o = 4 * ob
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    w4 = (rng.standard_normal((o, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    w9 = np.ascontiguousarray(w4.transpose(2, 3, 0, 1).reshape(9, o, c))
    xp = padded_flat(x)
    ap, boff = directconv.pack(w9), directconv.offsets(c, h, w, xp.shape[2])
    kernels = [directconv._conv3x3_numpy] + ([] if SLOW else [directconv._conv3x3_jit])
    assert_within_gamma(kernels, (ap, boff, xp, h, w), x, w4, 1)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 9), h=st.integers(1, 9),
       w=st.integers(1, 9), n=st.integers(1, 2))
def test_split_phases_layout(seed, c, h, w, n):
    """Every element of the phase images is the padded input at (2 i + py, 2 j + px), zeros
    included, whatever the buffer held before."""
    h, w = 2 * h, 2 * w
    x = np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32)
    ho, wo = h // 2, w // 2
    xph = np.full((n, 4 * c, directconv.phase_length(ho, wo)), np.nan, np.float32)
    directconv.split_phases(x, xph)
    xpad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for py in range(2):
        for px in range(2):
            want = xpad[:, :, py:py + 2 * ho + 1:2, px:px + 2 * wo + 1:2]
            got = xph[:, (2 * py + px) * c:(2 * py + px + 1) * c].reshape(n, c, ho + 1, wo + 1)
            assert np.array_equal(got, want)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), ob=st.integers(1, 4), c=st.integers(1, 24),
       hw=tiled, n=st.integers(1, 3))
@example(seed=0, ob=16, c=32, hw=(8, 8), n=2)        # the first block of ResNet-32's last stage
def test_conv3x3_s2_within_bound(seed, ob, c, hw, n):
    """The stride-2 conv on the phase images: within ``gamma_{9C} sum |w| |x|`` of the float64
    conv at every output, for the jitted tiles and the NumPy fallback alike."""
    ho, wo = hw
    rng = np.random.default_rng(seed)
    o = 4 * ob
    x = rng.standard_normal((n, c, 2 * ho, 2 * wo)).astype(np.float32)
    assert directconv.supports_stride2(o, 2 * ho, 2 * wo)
    w4 = (rng.standard_normal((o, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    w9 = np.ascontiguousarray(w4.transpose(2, 3, 0, 1).reshape(9, o, c))
    xph = np.zeros((n, 4 * c, directconv.phase_length(ho, wo)), np.float32)
    directconv.split_phases(x, xph)
    ap, boff = directconv.pack(w9), directconv.phase_offsets(c, ho, wo)
    kernels = [directconv._conv3x3_s2_numpy] + ([] if SLOW else [directconv._conv3x3_s2_jit])
    assert_within_gamma(kernels, (ap, boff, xph, ho, wo), x, w4, 2)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c4=st.integers(1, 6), hw=tiled, n=st.integers(1, 6),
       kind=st.sampled_from(["identity", "zero_pad", "conv1x1"]))
def test_cloud_block_takes_the_tiles_where_they_fit(seed, c4, hw, n, kind):
    """At shapes the tiles cover, the direct block runs its stride-1 convs as tiles (conv1 too
    when the block keeps its size) and stays within the block's bound of the reference."""
    h, w = hw
    rng = np.random.default_rng(seed)
    c = 4 * c4
    stride = 1 if kind == "identity" else 2
    o = c if kind == "identity" else 2 * c
    if stride == 2:     # the input is twice the tiled output
        h, w = 2 * h, 2 * w
    x = np.maximum(rng.standard_normal((n, c, h, w)), 0).astype(np.float32)
    c1, c2 = conv(rng, o, c, 3, stride, 1), conv(rng, o, o, 3, 1, 1)
    sc = conv(rng, o, c, 1, 2, 0) if kind == "conv1x1" else None
    pad_channels = c // 2 if kind == "zero_pad" else 0
    block = CLOUD_KERNELS["cloud_block_direct"].build(c1, c2, kind, pad_channels, sc)
    got = block(x)
    buffers = block._buffers[(min(n, 4), c, h, w)]
    assert buffers["boff2"].shape[0] == 9 * o
    assert buffers["boff1"].shape[0] == 9 * c         # stride 2 too: on the phase images
    want, t, s = reference(x, c1, c2, kind, pad_channels, sc)
    assert got.shape == want.shape and got.dtype == np.float32
    assert (np.abs(got.astype(np.float64) - want) <= bound(x, c1, c2, t, s, kind, sc)).all()


@pytest.mark.skipif(SLOW, reason="needs the JIT")
def test_tile_loop_is_fma_on_vector_registers():
    """The tile's inner loop: eight (or an unrolled multiple of eight) ``vfmadd`` on vector
    registers per term (zmm on AVX-512 targets, else ymm), and no vector register to or from
    the stack inside it (the eight accumulators stay in registers)."""
    fresh = numba.njit(nogil=True)(directconv._tiles.py_func)
    c, o, h, w = 4, 4, PIX // 8, 8
    xp = np.zeros((1, c, (h + 2) * (w + 2) + 2), np.float32)
    t = np.zeros((o, 1, h * w), np.float32)
    fresh(directconv.pack(np.zeros((9, o, c), np.float32)),
          directconv.offsets(c, h, w, xp.shape[2]), xp, h, w, w + 2, t)
    check_vector_loop(fresh, r"vfmadd\d+ps\s.*%" + ("zmm" if directconv.WIDE else "ymm"), 8)


def check_vector_loop(jitted, pattern: str, per_term: int):
    """In the asm of a (fresh, non-caching) jitted function: the instructions matching
    ``pattern`` come in a multiple of ``per_term`` (the tile's per-term count, maybe unrolled),
    and no ymm register goes to or from the stack between the label before the first of them
    and the last (the accumulators stay in registers)."""
    lines = "\n".join(jitted.inspect_asm().values()).lower().splitlines()
    hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
    assert len(hits) >= per_term and len(hits) % per_term == 0
    start = hits[0]
    while start > 0 and not re.match(r"^\S+:", lines[start]):
        start -= 1
    spills = [line for line in lines[start:hits[-1] + 1]
              if "(%rsp)" in line and ("%ymm" in line or "%zmm" in line)]
    assert not spills, "vector registers spilled in the tile loop"
