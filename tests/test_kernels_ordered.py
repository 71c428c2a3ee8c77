"""The fixed-order float32 sums of the edge (kernels/ordered.py) against their NumPy statement
(``reference.ordered_matmul`` / ``reference.ordered_linear``), and that statement against a
scalar loop of float32 operations: bit for bit at every level."""
import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from xnorcdl.kernels import reference as ref
from xnorcdl.kernels import ordered
from xnorcdl.kernels.ordered import ordered_conv3x3, ordered_gemm, ordered_linear

SLOW = numba.config.DISABLE_JIT
SETTINGS = settings(max_examples=10 if SLOW else 60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def operands(seed, *shapes):
    """float32 arrays of mixed magnitudes, so that the order of the additions shows in the bits."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * 10.0 ** rng.integers(-3, 4, s)).astype(np.float32)
            for s in shapes]


def scalar_dot(w_row, x_col):
    acc = np.float32(w_row[0]) * np.float32(x_col[0])
    for wk, xk in zip(w_row[1:], x_col[1:]):
        acc = np.float32(acc + np.float32(np.float32(wk) * np.float32(xk)))
    return acc


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), o=st.integers(1, 5), k=st.integers(1, 40),
       n=st.integers(1, 2), p=st.integers(1, 6))
def test_ordered_matmul_is_the_scalar_left_to_right_sum(seed, o, k, n, p):
    w, cols = operands(seed, (o, k), (n, k, p))
    got = ref.ordered_matmul(w, cols)
    assert got.dtype == np.float32 and got.shape == (n, o, p)
    want = np.array([[[scalar_dot(w[i], cols[m, :, j]) for j in range(p)] for i in range(o)]
                     for m in range(n)], np.float32)
    assert np.array_equal(got, want)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), o=st.integers(1, 20), k=st.integers(1, 300),
       n=st.integers(1, 3), p=st.integers(1, 70), extra=st.integers(0, 1))
def test_ordered_gemm_equals_reference(seed, o, k, n, p, extra):
    w, cols = operands(seed, (o, k), (n, k + extra, p))    # a trailing row (a bias row) is ignored
    out = np.full((n, o, p), np.nan, np.float32)
    ordered_gemm(w, cols, out)
    assert np.array_equal(out, ref.ordered_matmul(w, cols[:, :k]))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), o=st.integers(1, 12), k=st.integers(1, 900),
       n=st.integers(1, 5))
def test_ordered_linear_equals_reference_and_scalar_loop(seed, o, k, n):
    f, w, b = operands(seed, (n, k), (o, k), (o,))
    out = np.full((n, o), np.nan, np.float32)
    ordered_linear(f, np.ascontiguousarray(w.T), b, out)
    want = ref.ordered_linear(f, w, b)
    assert want.dtype == np.float32
    assert np.array_equal(out, want)
    m, i = n - 1, o - 1
    assert out[m, i] == np.float32(scalar_dot(w[i], f[m]) + b[i])


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), o=st.integers(1, 40), k=st.integers(1, 900),
       n=st.integers(1, 3))
def test_ordered_linear_register_tiles_equal_the_reference(seed, o, k, n):
    """Classes padded to whole tiles (ordered.pad_classes, what the exits hold): one block or
    several, the last one partial or whole; the padded columns are never written to out."""
    f, w, b = operands(seed, (n, k), (o, k), (o,))
    wt = ordered.pad_classes(np.ascontiguousarray(w.T))
    assert wt.shape == (k, -(-o // ordered.LANES) * ordered.LANES)
    assert np.array_equal(wt[:, :o], w.T) and not wt[:, o:].any()
    out = np.full((n, o), np.nan, np.float32)
    ordered_linear(f, wt, b, out)
    assert np.array_equal(out, ref.ordered_linear(f, w, b))


def test_order_matters_for_these_operands():
    """The tests above can tell orders apart: a BLAS product of the same operands differs."""
    w, cols = operands(3, (16, 27), (4, 27, 1024))
    assert not np.array_equal(ref.ordered_matmul(w, cols), np.matmul(w, cols))
    assert not np.array_equal(ref.ordered_matmul(w, cols),
                              ref.ordered_matmul(w[:, ::-1].copy(), cols[:, ::-1].copy()))


FMA = ("vfmadd", "vfnmadd", "vfmsub", "vfnmsub")


def _asm(func, fastmath, *args):
    """Machine code of a fresh, non-caching copy of ``func`` (Numba shows none for code it loaded
    from its cache), compiled with the kernels' options and ``fastmath``."""
    fresh = numba.njit(nogil=True, fastmath=fastmath)(func)
    fresh(*args)
    return "\n".join(fresh.inspect_asm().values()).lower()


@pytest.mark.skipif(SLOW, reason="needs the JIT")
def test_ordered_kernels_compile_without_fma():
    """No fused multiply-add: each product is rounded before it is added, as in NumPy. The same
    code compiled with fastmath is the control that the processor and the check see FMAs."""
    one = np.ones((1, 1), np.float32)
    cases = [(ordered_gemm, (one, np.ones((1, 1, 8), np.float32), np.empty((1, 1, 8), np.float32))),
             (ordered_linear, (one, one, np.ones(1, np.float32), np.empty((1, 1), np.float32))),
             (ordered_linear, (np.ones((1, 3), np.float32), ordered.pad_classes(np.ones((3, 2),
                               np.float32)), np.ones(2, np.float32), np.empty((1, 2), np.float32)))]
    for disp, args in cases:
        assert not disp.targetoptions.get("fastmath")
        control = _asm(disp.py_func, True, *args)
        if not any(op in control for op in FMA):
            pytest.skip("no FMA instructions on this processor")
        asm = _asm(disp.py_func, False, *args)
        assert "mulps" in asm or "mulss" in asm
        assert not any(op in asm for op in FMA), f"{disp.__name__} contracts into an FMA"


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), o=st.integers(1, 5), c=st.integers(1, 5),
       h=st.integers(1, 9), w=st.integers(1, 9))
def test_ordered_conv3x3_reads_the_padded_images_in_the_same_order(seed, o, c, h, w):
    """The stem's sums on the padded images directly equal the ordered conv of the reference
    (im2col + ordered_matmul), bit for bit, at every pixel that is not a dropped column."""
    weight, x = operands(seed, (o, c, 3, 3), (1, c, h, w))
    wp, plane = w + 2, (h + 2) * (w + 2)
    flat = np.full(c * plane + 2, np.float32(np.nan))      # slack: read for dropped columns only
    flat[:c * plane] = np.pad(x[0], ((0, 0), (1, 1), (1, 1))).reshape(-1)
    acc = np.empty((o, h * wp), np.float32)
    ordered_conv3x3(weight.reshape(o, -1), flat, plane, wp, h * wp, acc)
    want = ref.conv2d(x, weight, 1, 1, ordered=True)[0]
    assert np.array_equal(acc.reshape(o, h, wp)[:, :, :w], want)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), o=st.integers(1, 19), c=st.integers(1, 4),
       h=st.integers(1, 12), w=st.integers(1, 34))
def test_ordered_conv3x3_tiles_equal_the_reference(seed, o, c, h, w):
    """Shapes with whole register tiles (ordered.ROWS channels x ordered.TILE pixels) and remainders of
    both: the tiles' sums are the reference's, bit for bit, and so are the loops' on the rest."""
    weight, x = operands(seed, (o, c, 3, 3), (1, c, h, w))
    wp, plane = w + 2, (h + 2) * (w + 2)
    flat = np.full(c * plane + 2, np.float32(np.nan))
    flat[:c * plane] = np.pad(x[0], ((0, 0), (1, 1), (1, 1))).reshape(-1)
    acc = np.full((o, h * wp), np.nan, np.float32)
    ordered_conv3x3(weight.reshape(o, -1), flat, plane, wp, h * wp, acc)
    want = ref.conv2d(x, weight, 1, 1, ordered=True)[0]
    assert np.array_equal(acc.reshape(o, h, wp)[:, :, :w], want)


@pytest.mark.skipif(SLOW, reason="needs the JIT")
def test_ordered_conv3x3_tiles_compile_to_vector_products_without_fma():
    """The stem's tiles are vector multiplies and adds, never fused: each product is rounded."""
    wm = np.ones((4, 27), np.float32)
    flat = np.ones(3 * 36 + 2, np.float32)
    asm = _asm(ordered._conv3x3_jit.py_func, False, wm, flat, 36, 6, 24, np.empty((4, 24), np.float32))
    assert "vmulps" in asm and "vaddps" in asm
    assert not any(op in asm for op in FMA), "the stem's tiles contract into an FMA"
