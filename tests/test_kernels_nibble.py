"""The nibble-table binary conv (xnorcdl/kernels/nibbleconv.py, nibbleblock.py): its tables and
layout exactly, its counts equal to the popcount definition in every form (AVX2 tiles, plain
loops, NumPy), the block and the edge program bit-identical to the reference, and its tile as
``vpshufb`` on vector registers."""
import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from test_kernels_conv import block_case, reference_block
from test_kernels_directconv import check_vector_loop
from xnorcdl.backends.fast import FastExecutor
from xnorcdl.backends.reference import ReferenceExecutor
from xnorcdl.format import random_weights
from xnorcdl.kernels import nibbleconv as nc
from xnorcdl.kernels.binaryblock import BinaryBlock
from xnorcdl.kernels.bitconv import BitConv
from xnorcdl.kernels.edgeprogram import NIBBLE, OP
from xnorcdl.kernels.nibbleblock import NibbleBlock
from xnorcdl.kernels.wordblock import WordBlock
from xnorcdl.kernels.registry import _binary_block
from xnorcdl.model import build_model
from xnorcdl.spec import ExitSpec, ModelSpec

SLOW = numba.config.DISABLE_JIT
SETTINGS = settings(max_examples=4 if SLOW else 30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

COUNTS = [nc._counts_numpy] + ([] if SLOW else [nc._counts_loops]) + (
    [nc._counts_tiles] if nc.vectorized() else [])


def popcount_counts(x_neg, w_neg, stride):
    """The definition: ``acc[o, y, x] = sum over the 9C taps of [a bit != w bit]``, padded taps
    zero bits (x_neg ``[C, H, W]``, w_neg ``[O, C, 3, 3]`` booleans)."""
    c, h, w = x_neg.shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    xp = np.pad(x_neg, ((0, 0), (1, 2), (1, 2)))
    acc = np.zeros((w_neg.shape[0], ho, wo), np.int64)
    for ky in range(3):
        for kx in range(3):
            a = xp[:, ky:ky + stride * ho:stride, kx:kx + stride * wo:stride]   # [C, Ho, Wo]
            acc += (a[None] != w_neg[:, :, ky, kx, None, None]).sum(axis=1)
    return acc


def planes_of(x_neg, stride):
    """Nibble planes of sign bits ``[C, H, W]`` (the layout of nibbleconv), padding 0."""
    c, h, w = x_neg.shape
    _, _, wq, lq, phases, _ = nc.geometry(h, w, stride)
    xn = np.zeros(nc.plane_bytes(c, h, w, stride), np.uint8)
    for g in range(c // 4):
        v = sum(x_neg[4 * g + r].astype(np.uint8) << r for r in range(4))
        padded = np.pad(v, ((1, 3), (1, 3)))
        if stride == 1:
            xn[g * lq:(g + 1) * lq].reshape(h + 2, wq)[:] = padded[:h + 2, :w + 2]
        else:
            hq = lq // wq
            for a in range(2):
                for b in range(2):
                    at = (4 * g + 2 * a + b) * lq
                    xn[at:at + lq].reshape(hq, wq)[:] = padded[a::2, b::2][:hq, :wq]
    return xn


shapes = st.tuples(st.integers(1, 20).map(lambda g: 4 * g), st.integers(1, 4).map(lambda r: 4 * r),
                   st.integers(1, 18), st.integers(1, 18))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), shape=shapes, stride=st.sampled_from([1, 2]))
def test_tables_and_offsets_layout(seed, shape, stride):
    c, o, h, w = shape
    rng = np.random.default_rng(seed)
    codes = rng.choice(np.array([-1, 1], np.int8), (o, c, 3, 3))
    lut = nc.weight_tables(codes)
    nib = nc.weight_nibbles(codes)
    g_n = c // 4
    assert lut.shape == (o // 4, 9 * g_n, 4, 16) and lut.dtype == np.uint8
    for oo, t, g in [(0, 0, 0), (o - 1, 8, g_n - 1), tuple(rng.integers([0, 0, 0], [o, 9, g_n]))]:
        n = t * g_n + g
        want = sum(int(codes[oo, 4 * g + r, t // 3, t % 3] < 0) << r for r in range(4))
        assert nib[oo, n] == want
        for v in range(16):
            assert lut[oo // 4, n, oo % 4, v] == bin(v ^ want).count("1")
    ho, wo, wq, lq, phases, q = nc.geometry(h, w, stride)
    assert (ho, wo) == ((h - 1) // stride + 1, (w - 1) // stride + 1)
    offs = nc.term_offsets(c, h, w, stride)
    assert offs.dtype == np.int32
    if stride == 1:
        assert [offs[t * g_n + g] for t, g in [(0, 0), (4, g_n - 1), (8, 0)]] == [
            0, (g_n - 1) * lq + wq + 1, 2 * wq + 2]
    else:       # tap (1, 1): phase (1, 1) at (0, 0); tap (2, 2): phase (0, 0) at (1, 1)
        assert [offs[t * g_n + g] for t, g in [(0, 0), (4, g_n - 1), (8, 0)]] == [
            0, (4 * (g_n - 1) + 3) * lq, wq + 1]
    assert q % nc.TILE == 0 and q - nc.TILE < ho * wq <= q
    # the furthest read of a junk output stays inside the buffer
    assert offs.max() + q - 1 + nc.LANES <= nc.plane_bytes(c, h, w, stride)
    plane = rng.integers(0, 100, (o, ho * wo))
    rows = nc.to_padded_rows(plane, ho, wo, wq, q)
    assert np.array_equal(rows[:, :ho * wq].reshape(o, ho, wq)[:, :, :wo].reshape(o, -1), plane)


@pytest.mark.parametrize("counts", COUNTS, ids=lambda f: f.__name__)
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), shape=shapes, dense=st.sampled_from([0.0, 0.5, 1.0]),
       stride=st.sampled_from([1, 2]))
@example(seed=1, shape=(256, 4, 3, 3), dense=1.0, stride=1)   # 2304 terms: chunks, int16
@example(seed=2, shape=(4, 4, 1, 1), dense=0.5, stride=2)
def test_counts_equal_the_popcount_definition(counts, seed, shape, dense, stride):
    c, o, h, w = shape
    rng = np.random.default_rng(seed)
    x_neg = rng.random((c, h, w)) < dense
    w_neg = rng.random((o, c, 3, 3)) < 0.5
    codes = np.where(w_neg, -1, 1).astype(np.int8)
    ho, wo, wq, _, _, q = nc.geometry(h, w, stride)
    acc = np.full((o, q), 77, np.int16)
    counts(nc.weight_tables(codes), planes_of(x_neg, stride), nc.term_offsets(c, h, w, stride),
           acc)
    got = acc[:, :ho * wq].reshape(o, ho, wq)[:, :, :wo]
    assert np.array_equal(got, popcount_counts(x_neg, w_neg, stride))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(3, 5), (4, 4), (1, 2)])
def test_pack_nibbles_is_the_sign_convention(stride, hw):
    """Bit r of a pixel's byte is set exactly where BN(x) of channel 4g + r is negative;
    sign(0) = +1 and -0.0 counts as 0; the padding bytes are left at 0."""
    rng = np.random.default_rng(5)
    c, (h, w) = 8, hw
    x = rng.standard_normal((c, h, w)).astype(np.float32)
    x[0, 0, 0] = 0.0
    x[1, 0, -1] = -0.0
    scale = rng.standard_normal(c).astype(np.float32)
    shift = np.zeros(c, np.float32)
    xn = np.zeros(nc.plane_bytes(c, h, w, stride), np.uint8)
    nc.pack_nibbles(x, scale, shift, stride, xn, np.empty(h * w, np.uint8))
    y = x * scale[:, None, None] + shift[:, None, None]
    assert np.array_equal(xn, planes_of(~(y >= 0), stride))


def nibble_case(seed, c, h, w, kind, stride=1):
    x, p1, p2, sc = block_case(seed, c, h, w, stride, kind)
    conv1 = BitConv(p1[2], p1[3], p1[0], p1[1], 1, 1.0, stride)
    conv2 = BitConv(p2[2], p2[3], p2[0], p2[1], 1, 1.0, 1)
    pad = c // 2 if kind == "zero_pad" else 0
    return x, p1, p2, sc, NibbleBlock(_binary_block(conv1, conv2, kind, pad))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 17).map(lambda g: 4 * g),
       h=st.integers(1, 17), w=st.integers(1, 17),
       geometry=st.sampled_from([(1, "identity"), (1, "conv1x1"), (2, "zero_pad"),
                                 (2, "conv1x1")]))
@example(seed=3, c=16, h=32, w=32, geometry=(1, "identity"))
@example(seed=4, c=32, h=16, w=16, geometry=(1, "identity"))
@example(seed=5, c=16, h=32, w=32, geometry=(2, "zero_pad"))
def test_nibble_block_exact(seed, c, h, w, geometry):
    stride, kind = geometry
    if kind == "zero_pad" and c % 8:
        c += 4                                  # zero-pad doubles the channels: 2C % 4 == 0
    x, p1, p2, sc, block = nibble_case(seed, c, h, w, kind, stride)
    assert block.applies
    assert np.array_equal(block(x, sc), reference_block(x, p1, p2, kind, stride, sc))


@pytest.mark.parametrize("stride,kind", [(1, "identity"), (2, "zero_pad")])
def test_block_keeps_padding_bytes_zero(stride, kind):
    """Only the interior of conv2's planes is written (the junk outputs of conv1's rows never
    reach the padding): with every sign bit of conv1's output set, the interior is all 15 and
    every other byte 0."""
    c, h, w = 8, 5, 6
    x, p1, p2, sc, block = nibble_case(0, c, h, w, kind, stride)
    b = block.block
    o_n = b.conv1.out_channels
    offs1, offs2, base1, base2 = block.prepared(h, w)
    n1, n2, n_acc, n8, n32 = block.scratch_sizes(h, w)
    xn2 = np.zeros(n2, np.uint8)
    lo, hi = np.full(o_n, -2**15, np.int16), np.full(o_n, 2**15 - 1, np.int16)
    from xnorcdl.kernels.nibbleblock import nibble_block_forward
    out = np.empty((x.shape[0], o_n) + nc.geometry(h, w, stride)[:2], np.float32)
    nibble_block_forward(x, b.conv1.bn_scale, b.conv1.bn_shift, block.lut1, offs1, base1, lo, hi,
                         stride, block.lut2, offs2, base2, b.conv2.out_scale, block.kind,
                         block.pad_channels, out, np.zeros(n1, np.uint8), xn2,
                         np.empty(n_acc, np.int16), np.empty(n8, np.uint8),
                         np.empty(n32, np.float32), out)
    ho, wo = out.shape[2:]
    lp = (ho + 2) * (wo + 2)
    planes = xn2[:(o_n // 4) * lp].reshape(o_n // 4, ho + 2, wo + 2)
    assert (planes[:, 1:ho + 1, 1:wo + 1] == 15).all()
    inner = np.zeros_like(planes, bool)
    inner[:, 1:ho + 1, 1:wo + 1] = True
    assert (planes[~inner] == 0).all() and (xn2[(o_n // 4) * lp:] == 0).all()


def test_other_shapes_run_the_popcount_block():
    for c, stride, kind in [(6, 1, "identity"), (6, 2, "zero_pad")]:
        x, p1, p2, sc, block = nibble_case(1, c, 7, 7, kind, stride)
        assert not block.applies
        assert np.array_equal(block(x, sc), reference_block(x, p1, p2, kind, stride, sc))


def with_nibble_blocks(model):
    """A fast executor whose binary blocks are NibbleBlocks (whatever this host prefers), its
    edge program rebuilt."""
    ex = FastExecutor(model)
    for prep in ex.blocks:
        if prep.fused is not None:
            inner = (prep.fused.block if isinstance(prep.fused, (NibbleBlock, WordBlock))
                     else prep.fused)
            assert isinstance(inner, BinaryBlock)
            prep.fused = NibbleBlock(inner)
    ex.program = ex._edge_program()
    return ex


@pytest.mark.parametrize("shortcut", ["zero_pad", "conv1x1"])
def test_edge_program_with_nibble_rows_is_the_reference(shortcut):
    spec = ModelSpec(depth=20, edge_convs=12, edge_bits=1, shortcut=shortcut,
                     exits=(ExitSpec(6, 0.5), ExitSpec(12, 0.5)))
    spec.validate()
    model = build_model(spec, random_weights(spec, 3))
    images = np.random.default_rng(2).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    fast, ref = with_nibble_blocks(model), ReferenceExecutor(model)
    assert (fast.program.meta[:, OP] == NIBBLE).sum() == 6      # every edge block, stride 2 too
    n_edge = sum(b.edge for b in model.blocks)
    for k, e in enumerate(model.exits):
        x_fast, l_fast = fast.segment(images, None, 0, e.after_block + 1, k)
        x = ref.stem(images)
        for b in range(e.after_block + 1):
            x = ref.block(b, x)
        assert np.array_equal(x_fast, x) and np.array_equal(l_fast, ref.exit(k, x))
    x_fast, _ = fast.segment(images, None, 0, n_edge, None)
    x = ref.stem(images)
    for b in range(n_edge):
        x = ref.block(b, x)
    assert np.array_equal(x_fast, x)


@pytest.mark.skipif(not nc.vectorized(), reason="needs the JIT and an AVX2 target")
def test_tile_is_vpshufb_on_vector_registers():
    """The tile's loop: eight ``vpshufb`` on ymm per term (or an unrolled multiple), and no
    vector register to or from the stack inside it (the accumulators stay in registers)."""
    fresh = numba.njit(nogil=True)(nc._counts_tiles.py_func)
    c, o, h, w = 4, 4, 2, 8
    codes = np.ones((o, c, 3, 3), np.int8)
    fresh(nc.weight_tables(codes), np.zeros(nc.plane_bytes(c, h, w), np.uint8),
          nc.term_offsets(c, h, w), np.zeros((o, nc.geometry(h, w, 1)[5]), np.int16))
    check_vector_loop(fresh, r"vpshufb\s.*%ymm", 8)


@pytest.mark.skipif(SLOW, reason="needs the JIT")
@pytest.mark.parametrize("features,tiles,preferred", [
    ("+avx2,+fma,-avx512f,-avx512vpopcntdq", True, True),
    ("+avx2,+avx512f,+avx512vpopcntdq", True, False),
    ("-avx2,+sse4.2", False, False),
])
def test_choice_follows_the_target_features(monkeypatch, features, tiles, preferred):
    """The tables run where the target has AVX2, and the backend prefers them unless it also
    has VPOPCNTDQ (read from the features Numba compiles for, here the user's)."""
    from xnorcdl.kernels.registry import binary_block_kernel
    monkeypatch.setattr(numba.config, "CPU_FEATURES", features)
    assert nc.vectorized() is tiles and nc.preferred() is preferred
    assert binary_block_kernel().name == ("binary_block_nibble" if preferred
                                          else "binary_block_fused")
