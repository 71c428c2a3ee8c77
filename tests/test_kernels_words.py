"""The binary conv on pixel words (xnorcdl/kernels/wordconv.py, wordblock.py, rowtile.py): its
layout exactly, its counts equal to the popcount definition (jitted loop and NumPy), the conv,
the block and the edge program bit-identical to the reference, the residual tile equal to its
loop, and the counts as lane popcounts on vector registers where the target has them."""
import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from test_kernels_conv import block_case, reference_block
from test_kernels_nibble import popcount_counts
from xnorcdl.backends.fast import FastExecutor
from xnorcdl.backends.reference import ReferenceExecutor
from xnorcdl.format import random_weights
from xnorcdl.kernels import rowtile, wordconv as wc
from xnorcdl.kernels.binaryblock import BinaryBlock
from xnorcdl.kernels.bitconv import BitConv
from xnorcdl.kernels.edgeprogram import OP, WORDS
from xnorcdl.kernels.nibbleblock import NibbleBlock
from xnorcdl.kernels.registry import _binary_block
from xnorcdl.kernels.wordblock import WordBlock, plane_bits, word_block_forward
from xnorcdl.model import build_model
from xnorcdl.spec import ExitSpec, ModelSpec

SLOW = numba.config.DISABLE_JIT
SETTINGS = settings(max_examples=4 if SLOW else 30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
COUNTS = [wc._counts_numpy] + ([] if SLOW else [wc._counts_loops])
DTYPES = {16: np.uint16, 32: np.uint32, 64: np.uint64}


def plane_of(x_neg, stride, bits):
    """The padded plane of words of sign bits ``[C, H, W]`` (the layout of wordconv)."""
    c, h, w = x_neg.shape
    _, _, wq, lq, _, _ = wc.geometry(h, w, stride, bits)
    xw = np.zeros(wc.plane_words(h, w, stride, bits), DTYPES[bits])
    v = (x_neg.astype(np.uint64) << np.arange(c, dtype=np.uint64)[:, None, None]).sum(
        axis=0, dtype=np.uint64)
    padded = np.pad(v, ((1, 3), (1, 3)))
    if stride == 1:
        xw[:lq].reshape(h + 2, wq)[:] = padded[:h + 2, :w + 2]
    else:
        hq = lq // wq
        for a in range(2):
            for b in range(2):
                at = (2 * a + b) * lq
                xw[at:at + lq].reshape(hq, wq)[:] = padded[a::2, b::2][:hq, :wq]
    return xw


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 64), o=st.integers(1, 9),
       h=st.integers(1, 18), w=st.integers(1, 18), stride=st.sampled_from([1, 2]))
def test_words_and_geometry_layout(seed, c, o, h, w, stride):
    rng = np.random.default_rng(seed)
    codes = rng.choice(np.array([-1, 1], np.int8), (o, c, 3, 3))
    words = wc.weight_words(codes)
    assert words.shape == (o, 9) and words.dtype == np.uint64
    for oo, t in [(0, 0), (o - 1, 8), tuple(rng.integers([0, 0], [o, 9]))]:
        want = sum(int(codes[oo, ch, t // 3, t % 3] < 0) << ch for ch in range(c))
        assert int(words[oo, t]) == want
    bits = 8 * np.dtype(wc.word_dtype(c)).itemsize
    assert bits >= c and (bits == 16 or bits // 2 < c)
    ho, wo, wq, lq, phases, q = wc.geometry(h, w, stride, bits)
    lanes = 512 // bits
    assert q % lanes == 0 and q - lanes < ho * wq <= q
    offs = wc.tap_offsets(h, w, stride)
    # the furthest read of a junk output stays inside the buffer
    assert offs.max() + q <= wc.plane_words(h, w, stride, bits)
    b1, b2 = plane_bits(c, o)
    assert (b1, b2) in {(16, 16), (16, 32), (32, 32), (32, 64), (64, 64)}
    assert b1 >= c and b2 >= o


def test_more_than_64_channels_is_one_clear_error():
    with pytest.raises(ValueError, match="channels"):
        wc.word_dtype(65)
    assert not wc.supports(65, 1) and not wc.supports(16, 3) and wc.supports(64, 2)


@pytest.mark.parametrize("counts", COUNTS, ids=lambda f: f.__name__)
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 64), o=st.integers(1, 9),
       h=st.integers(1, 18), w=st.integers(1, 18), dense=st.sampled_from([0.0, 0.5, 1.0]),
       stride=st.sampled_from([1, 2]))
@example(seed=1, c=64, o=3, h=8, w=8, dense=1.0, stride=1)     # 576: the largest count
@example(seed=2, c=16, o=1, h=1, w=1, dense=0.5, stride=2)
def test_counts_equal_the_popcount_definition(counts, seed, c, o, h, w, dense, stride):
    rng = np.random.default_rng(seed)
    x_neg = rng.random((c, h, w)) < dense
    w_neg = rng.random((o, c, 3, 3)) < 0.5
    bits = 8 * np.dtype(wc.word_dtype(c)).itemsize
    ho, wo, wq, _, _, q = wc.geometry(h, w, stride, bits)
    acc = np.full((o, q), 77, np.int16)
    counts(wc.weight_words(np.where(w_neg, -1, 1)), plane_of(x_neg, stride, bits),
           wc.tap_offsets(h, w, stride), acc)
    got = acc[:, :ho * wq].reshape(o, ho, wq)[:, :, :wo]
    assert np.array_equal(got, popcount_counts(x_neg, w_neg, stride))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("c,hw", [(16, (3, 5)), (32, (4, 4)), (64, (1, 2)), (5, (5, 3))])
def test_pack_words_is_the_sign_convention(stride, c, hw):
    """Bit c of a pixel's word is set exactly where BN(x) of channel c is negative; sign(0) =
    +1 and -0.0 counts as 0; the padding words are left at 0."""
    rng = np.random.default_rng(5)
    h, w = hw
    x = rng.standard_normal((c, h, w)).astype(np.float32)
    x[0, 0, 0] = 0.0
    x[-1, 0, -1] = -0.0
    scale = rng.standard_normal(c).astype(np.float32)
    shift = np.zeros(c, np.float32)
    bits = 8 * np.dtype(wc.word_dtype(c)).itemsize
    xw = np.zeros(wc.plane_words(h, w, stride, bits), DTYPES[bits])
    wc.pack_words(x, scale, shift, stride, xw, np.empty((1, 1, h, w), np.uint64))
    y = x * scale[:, None, None] + shift[:, None, None]
    assert np.array_equal(xw, plane_of(~(y >= 0), stride, bits))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 64), o=st.integers(1, 12),
       h=st.integers(1, 17), w=st.integers(1, 17), stride=st.sampled_from([1, 2]))
@example(seed=3, c=16, o=16, h=32, w=32, stride=1)
@example(seed=4, c=32, o=64, h=16, w=16, stride=2)
def test_word_conv_equals_bitconv(seed, c, o, h, w, stride):
    rng = np.random.default_rng(seed)
    codes = rng.choice(np.array([-1, 1], np.int8), (o, c, 3, 3))
    args = (codes, rng.random(o).astype(np.float32), rng.standard_normal(c).astype(np.float32),
            rng.standard_normal(c).astype(np.float32))
    conv = wc.WordConv(*args, stride=stride)
    x = rng.standard_normal((2, c, h, w)).astype(np.float32)
    assert conv.applies
    assert np.array_equal(conv(x), BitConv(*args, stride=stride)(x))


def word_case(seed, c, h, w, kind, stride=1):
    x, p1, p2, sc = block_case(seed, c, h, w, stride, kind)
    conv1 = BitConv(p1[2], p1[3], p1[0], p1[1], 1, 1.0, stride)
    conv2 = BitConv(p2[2], p2[3], p2[0], p2[1], 1, 1.0, 1)
    pad = c // 2 if kind == "zero_pad" else 0
    return x, p1, p2, sc, WordBlock(_binary_block(conv1, conv2, kind, pad))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 32), h=st.integers(1, 17),
       w=st.integers(1, 17),
       geometry=st.sampled_from([(1, "identity"), (1, "conv1x1"), (2, "zero_pad"),
                                 (2, "conv1x1")]))
@example(seed=3, c=16, h=32, w=32, geometry=(1, "identity"))
@example(seed=4, c=32, h=16, w=16, geometry=(1, "identity"))
@example(seed=5, c=16, h=32, w=32, geometry=(2, "zero_pad"))
@example(seed=6, c=32, h=16, w=16, geometry=(2, "zero_pad"))
@example(seed=7, c=64, h=8, w=8, geometry=(1, "identity"))
def test_word_block_exact(seed, c, h, w, geometry):
    stride, kind = geometry
    if kind == "zero_pad" and c % 2:
        c += 1                                  # zero-pad doubles the channels
    x, p1, p2, sc, block = word_case(seed, c, h, w, kind, stride)
    assert block.applies
    assert np.array_equal(block(x, sc), reference_block(x, p1, p2, kind, stride, sc))


@pytest.mark.parametrize("stride,kind,c", [(1, "identity", 16), (2, "zero_pad", 8),
                                           (1, "identity", 40)])
def test_block_keeps_padding_words_zero(stride, kind, c):
    """Only the interior of conv2's plane is written: with every sign bit of conv1's output
    set, the interior words are all ones in the O channel bits and every other word 0."""
    h, w = 5, 6
    x, p1, p2, sc, block = word_case(0, c, h, w, kind, stride)
    b = block.block
    o_n = b.conv1.out_channels
    offs1, offs2, base1, base2 = block.prepared(h, w)
    n1, n2, n_acc, n_w, n32 = block.scratch_sizes(h, w)
    d1, d2 = block.dtypes
    xw2 = np.zeros(n2, d2)
    lo, hi = np.full(o_n, -2**15, np.int16), np.full(o_n, 2**15 - 1, np.int16)
    ho, wo = wc.geometry(h, w, stride, 16)[:2]
    out = np.empty((x.shape[0], o_n, ho, wo), np.float32)
    word_block_forward(x, b.conv1.bn_scale, b.conv1.bn_shift, block.wt1, offs1, base1, lo, hi,
                       stride, block.wt2, offs2, base2, b.conv2.out_scale, block.kind,
                       block.pad_channels, out, np.zeros(n1, d1), xw2,
                       np.empty(n_acc, np.int16), np.empty((1, 1, h, w), np.uint64),
                       np.empty(n_w, d2), np.empty(n32, np.float32), out)
    lp = (ho + 2) * (wo + 2)
    plane = xw2[:lp].reshape(ho + 2, wo + 2)
    assert (plane[1:ho + 1, 1:wo + 1] == (1 << o_n) - 1).all()
    inner = np.zeros_like(plane, bool)
    inner[1:ho + 1, 1:wo + 1] = True
    assert (plane[~inner] == 0).all() and (xw2[lp:] == 0).all()


def test_wider_blocks_run_the_popcount_block():
    x, p1, p2, sc, block = word_case(1, 65, 5, 4, "identity", 1)
    assert not block.applies
    assert np.array_equal(block(x, sc), reference_block(x, p1, p2, "identity", 1, sc))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 41), rows=st.integers(1, 4),
       step=st.sampled_from([1, 2]), odd=st.booleans())
def test_residual_tile_equals_its_loop(seed, n, rows, step, odd):
    """``residual_vectors`` then the caller's scalar tail give the loop's bits, rows apart by
    their strides, the stride-2 reads never past a row of ``step n - odd`` entries."""
    rng = np.random.default_rng(seed)
    lq, ld = n + 3, n + 1
    lr = step * n - (odd and step == 2)
    bo = rng.integers(-2000, 2000, rows * lq).astype(np.int16)
    ac = rng.integers(-500, 500, rows * lq).astype(np.int16)
    r = rng.standard_normal(rows * lr + 1).astype(np.float32)
    s = np.float32(rng.standard_normal())
    d = np.zeros(rows * ld, np.float32)
    whole = min(n, lr // step)
    m = rowtile.residual_vectors(bo.ctypes.data, ac.ctypes.data, r.ctypes.data, d.ctypes.data,
                                 s, whole, step, rows, lq, lr, ld)
    assert m <= whole and (SLOW or m == whole // 8 * 8)
    want = np.zeros_like(d)
    for y in range(rows):
        for i in range(n):
            t = np.float32(np.int16(bo[y * lq + i] - 2 * ac[y * lq + i])) * s
            v = t + r[y * lr + step * i] if step * i < lr else np.float32(0.0)
            want[y * ld + i] = v
            if i >= m:
                d[y * ld + i] = v
    assert np.array_equal(d.view(np.uint32), want.view(np.uint32))


def with_word_blocks(model):
    """A fast executor whose binary blocks are WordBlocks (whatever this host prefers), its
    edge program rebuilt."""
    ex = FastExecutor(model)
    for prep in ex.blocks:
        if prep.fused is not None:
            inner = (prep.fused.block if isinstance(prep.fused, (NibbleBlock, WordBlock))
                     else prep.fused)
            assert isinstance(inner, BinaryBlock)
            prep.fused = WordBlock(inner)
    ex.program = ex._edge_program()
    return ex


@pytest.mark.parametrize("shortcut", ["zero_pad", "conv1x1"])
def test_edge_program_with_word_rows_is_the_reference(shortcut):
    spec = ModelSpec(depth=20, edge_convs=18, edge_bits=1, shortcut=shortcut,
                     exits=(ExitSpec(6, 0.5), ExitSpec(18, 0.5)))
    spec.validate()
    model = build_model(spec, random_weights(spec, 3))
    images = np.random.default_rng(2).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    fast, ref = with_word_blocks(model), ReferenceExecutor(model)
    assert (fast.program.meta[:, OP] == WORDS).sum() == 9     # 16, 32 and 64 channels
    for k, e in enumerate(model.exits):
        x_fast, l_fast = fast.segment(images, None, 0, e.after_block + 1, k)
        x = ref.stem(images)
        for b in range(e.after_block + 1):
            x = ref.block(b, x)
        assert np.array_equal(x_fast, x) and np.array_equal(l_fast, ref.exit(k, x))


@pytest.mark.skipif(not wc.vectorized(), reason="needs the JIT and AVX-512 BITALG/VPOPCNTDQ")
@pytest.mark.parametrize("bits,mnemonic", [(16, "vpopcntw"), (32, "vpopcntd"),
                                           (64, "vpopcntq")])
def test_counts_are_lane_popcounts_on_vector_registers(bits, mnemonic):
    """The counts' loop: 18 lane popcounts (nine taps, two channels) per pass on 512-bit
    registers, or an unrolled multiple, and no vector register to or from the stack in it."""
    from test_kernels_directconv import check_vector_loop
    fresh = numba.njit(nogil=True)(wc._counts_loops.py_func)
    h = w = 8
    q = wc.geometry(h, w, 1, bits)[5]
    fresh(np.zeros((2, 9), np.uint64), np.zeros(wc.plane_words(h, w, 1, bits), DTYPES[bits]),
          wc.tap_offsets(h, w, 1), np.zeros((2, q), np.int16))
    check_vector_loop(fresh, mnemonic + r"\s.*%zmm", 18)


@pytest.mark.skipif(SLOW, reason="needs the JIT")
@pytest.mark.parametrize("features,name", [
    ("+avx2,+avx512f,+avx512bitalg,+avx512vpopcntdq", "binary_block_words"),
    ("+avx2,+avx512f,+avx512vpopcntdq", "binary_block_fused"),
    ("+avx2,+fma,-avx512f", "binary_block_nibble"),
])
def test_choice_follows_the_target_features(monkeypatch, features, name):
    from xnorcdl.kernels.registry import binary_block_kernel
    monkeypatch.setattr(numba.config, "CPU_FEATURES", features)
    assert wc.preferred() is (name == "binary_block_words")
    assert binary_block_kernel().name == name
