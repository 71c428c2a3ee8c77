"""The nibble-table binary conv (xnorcdl/kernels/nibbleconv.py, nibbleblock.py): its tables and
layout exactly, its counts equal to the popcount definition in every form (AVX2 tiles, plain
loops, NumPy), the block and the edge program bit-identical to the reference, and its tile as
``vpshufb`` on vector registers."""
import re

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from test_kernels_conv import block_case, reference_block
from xnorcdl.backends.fast import FastExecutor
from xnorcdl.backends.reference import ReferenceExecutor
from xnorcdl.format import random_weights
from xnorcdl.kernels import nibbleconv as nc
from xnorcdl.kernels.binaryblock import BinaryBlock
from xnorcdl.kernels.bitconv import BitConv
from xnorcdl.kernels.edgeprogram import NIBBLE, OP
from xnorcdl.kernels.nibbleblock import NibbleBlock
from xnorcdl.kernels.registry import _binary_block
from xnorcdl.model import build_model
from xnorcdl.spec import ExitSpec, ModelSpec

SLOW = numba.config.DISABLE_JIT
SETTINGS = settings(max_examples=4 if SLOW else 30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

COUNTS = [nc._counts_numpy] + ([] if SLOW else [nc._counts_loops]) + (
    [nc._counts_tiles] if nc.vectorized() else [])


def popcount_counts(x_neg, w_neg):
    """The definition: ``acc[o, y, x] = sum over the 9C taps of [a bit != w bit]``, padded taps
    zero bits (x_neg ``[C, H, W]``, w_neg ``[O, C, 3, 3]`` booleans)."""
    c, h, w = x_neg.shape
    xp = np.pad(x_neg, ((0, 0), (1, 1), (1, 1)))
    acc = np.zeros((w_neg.shape[0], h, w), np.int64)
    for ky in range(3):
        for kx in range(3):
            a = xp[:, ky:ky + h, kx:kx + w]                       # [C, H, W]
            acc += (a[None] != w_neg[:, :, ky, kx, None, None]).sum(axis=1)
    return acc


def planes_of(x_neg):
    """Nibble planes of sign bits ``[C, H, W]`` (the layout of nibbleconv), padding 0."""
    c, h, w = x_neg.shape
    wp, lp, _ = nc.geometry(h, w)
    xn = np.zeros(nc.plane_bytes(c, h, w), np.uint8)
    for g in range(c // 4):
        v = sum(x_neg[4 * g + r].astype(np.uint8) << r for r in range(4))
        xn[g * lp:(g + 1) * lp].reshape(h + 2, wp)[1:h + 1, 1:w + 1] = v
    return xn


shapes = st.tuples(st.integers(1, 20).map(lambda g: 4 * g), st.integers(1, 4).map(lambda r: 4 * r),
                   st.integers(1, 18), st.integers(1, 18))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), shape=shapes)
def test_tables_and_offsets_layout(seed, shape):
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
    wp, lp, q = nc.geometry(h, w)
    offs = nc.term_offsets(c, h, w)
    assert offs.dtype == np.int32
    assert [offs[t * g_n + g] for t, g in [(0, 0), (4, g_n - 1), (8, 0)]] == [
        0, (g_n - 1) * lp + wp + 1, 2 * wp + 2]
    assert q % nc.TILE == 0 and q - nc.TILE < h * wp <= q
    # the furthest read of a junk output stays inside the buffer
    assert offs.max() + q - 1 + nc.LANES <= nc.plane_bytes(c, h, w)
    plane = rng.integers(0, 100, (o, h * w))
    rows = nc.to_padded_rows(plane, h, w)
    assert np.array_equal(rows[:, :h * wp].reshape(o, h, wp)[:, :, :w].reshape(o, -1), plane)
    assert nc.valid_mask(h, w).sum() == 255 * h * w


@pytest.mark.parametrize("counts", COUNTS, ids=lambda f: f.__name__)
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), shape=shapes, dense=st.sampled_from([0.0, 0.5, 1.0]))
@example(seed=1, shape=(256, 4, 3, 3), dense=1.0)     # 2304 terms: chunks, int16 near its top
@example(seed=2, shape=(4, 4, 1, 1), dense=0.5)
def test_counts_equal_the_popcount_definition(counts, seed, shape, dense):
    c, o, h, w = shape
    rng = np.random.default_rng(seed)
    x_neg = rng.random((c, h, w)) < dense
    w_neg = rng.random((o, c, 3, 3)) < 0.5
    codes = np.where(w_neg, -1, 1).astype(np.int8)
    wp, _, q = nc.geometry(h, w)
    acc = np.full((o, q), 77, np.int16)
    counts(nc.weight_tables(codes), planes_of(x_neg), nc.term_offsets(c, h, w), acc)
    got = acc[:, :h * wp].reshape(o, h, wp)[:, :, :w]
    assert np.array_equal(got, popcount_counts(x_neg, w_neg))


def test_pack_nibbles_is_the_sign_convention():
    """Bit r of a pixel's byte is set exactly where BN(x) of channel 4g + r is negative;
    sign(0) = +1 and -0.0 counts as 0; the padding bytes are left at 0."""
    rng = np.random.default_rng(5)
    c, h, w = 8, 3, 5
    x = rng.standard_normal((c, h, w)).astype(np.float32)
    x[0, 0, 0], x[1, 0, 1] = 0.0, -0.0
    scale = np.ones(c, np.float32)
    shift = np.zeros(c, np.float32)
    wp, lp, _ = nc.geometry(h, w)
    xn = np.zeros(nc.plane_bytes(c, h, w), np.uint8)
    nc.pack_nibbles(x, scale, shift, wp, lp, xn, np.empty(h * w, np.uint8))
    assert np.array_equal(xn, planes_of(~(x * scale[:, None, None] + shift[:, None, None] >= 0)))


def nibble_case(seed, c, h, w, kind):
    x, p1, p2, sc = block_case(seed, c, h, w, 1, kind)
    conv1 = BitConv(p1[2], p1[3], p1[0], p1[1], 1, 1.0, 1)
    conv2 = BitConv(p2[2], p2[3], p2[0], p2[1], 1, 1.0, 1)
    return x, p1, p2, sc, NibbleBlock(_binary_block(conv1, conv2, kind, 0))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 17).map(lambda g: 4 * g),
       h=st.integers(1, 17), w=st.integers(1, 17),
       kind=st.sampled_from(["identity", "conv1x1"]))
@example(seed=3, c=16, h=32, w=32, kind="identity")
@example(seed=4, c=32, h=16, w=16, kind="identity")
def test_nibble_block_exact(seed, c, h, w, kind):
    x, p1, p2, sc, block = nibble_case(seed, c, h, w, kind)
    assert block.applies
    assert np.array_equal(block(x, sc), reference_block(x, p1, p2, kind, 1, sc))


def test_block_keeps_padding_bytes_zero():
    """The junk columns of conv1's outputs are masked: conv2's planes keep their padding."""
    c, h, w = 8, 5, 6
    x, p1, p2, sc, block = nibble_case(0, c, h, w, "identity")
    b = block.block
    offs1, offs2, base1, base2, valid = block.prepared(h, w)
    n1, n2, _ = block.scratch_sizes(h, w)
    xn1, xn2 = np.zeros(n1, np.uint8), np.zeros(n2, np.uint8)
    wp, lp, q = nc.geometry(h, w)
    acc = np.empty((c, q), np.int16)
    # make conv1's integers set every bit, so an unmasked junk column would write 0xF
    lo, hi = np.full(c, -2**15, np.int16), np.full(c, 2**15 - 1, np.int16)
    from xnorcdl.kernels.nibbleblock import nibble_block_forward
    nibble_block_forward(x, b.conv1.bn_scale, b.conv1.bn_shift, block.lut1, offs1, base1, lo, hi,
                         block.lut2, offs2, base2, b.conv2.out_scale, valid, block.kind, x, xn1,
                         xn2, acc, np.empty(h * w, np.uint8), np.empty(q, np.float32),
                         np.empty_like(x))
    planes = xn2[:(c // 4) * lp].reshape(c // 4, h + 2, wp)
    assert (planes[:, 1:h + 1, 1:w + 1] == 15).all()
    inner = np.zeros_like(planes, bool)
    inner[:, 1:h + 1, 1:w + 1] = True
    assert (planes[~inner] == 0).all() and (xn2[(c // 4) * lp:] == 0).all()


def test_other_shapes_run_the_popcount_block():
    for c, stride, kind in [(6, 1, "identity"), (8, 2, "zero_pad")]:
        x, p1, p2, sc = block_case(1, c, 7, 7, stride, kind)
        conv1 = BitConv(p1[2], p1[3], p1[0], p1[1], 1, 1.0, stride)
        conv2 = BitConv(p2[2], p2[3], p2[0], p2[1], 1, 1.0, 1)
        block = NibbleBlock(_binary_block(conv1, conv2, kind, c // 2 if stride == 2 else 0))
        assert not block.applies
        assert np.array_equal(block(x, sc), reference_block(x, p1, p2, kind, stride, sc))


def with_nibble_blocks(model):
    """A fast executor whose binary blocks are NibbleBlocks (whatever this host prefers), its
    edge program rebuilt."""
    ex = FastExecutor(model)
    for prep in ex.blocks:
        if prep.fused is not None:
            inner = prep.fused.block if isinstance(prep.fused, NibbleBlock) else prep.fused
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
    assert (fast.program.meta[:, OP] == NIBBLE).sum() >= 4
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
          nc.term_offsets(c, h, w), np.zeros((o, nc.geometry(h, w)[2]), np.int16))
    lines = "\n".join(fresh.inspect_asm().values()).lower().splitlines()
    shuf = [i for i, line in enumerate(lines) if re.search(r"vpshufb\s.*%ymm", line)]
    assert len(shuf) >= 8 and len(shuf) % 8 == 0
    start = shuf[0]
    while start > 0 and not re.match(r"^\S+:", lines[start]):
        start -= 1
    loop = lines[start:shuf[-1] + 1]
    assert not [line for line in loop if "(%rsp)" in line and "%ymm" in line]
