"""Quantizers against the paper's equations on hand-worked values (eq. 1-3)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from xnorcdl import quant


def test_sign_zero_is_plus_one():
    assert quant.sign_codes(np.array([0.0, -0.0, 1e-30, -1e-30], np.float32)).tolist() == [1, 1, 1, -1]


def test_two_bit_hand_values():
    # Z = 3, levels -1, -1/3, 1/3, 1; boundaries (q + 1/2) / 1.5 - 1 = -2/3, 0, 2/3 round half up
    y = np.array([-5, -1, -0.7, -0.6, -0.01, 0.0, 0.5, 0.7, 1, 5], np.float32)
    assert quant.kbit_codes(y, 2).tolist() == [-3, -3, -3, -1, -1, 1, 1, 3, 3, 3]
    assert np.allclose(quant.dequantize(quant.kbit_codes(y, 2), 2),
                       [-1, -1, -1, -1 / 3, -1 / 3, 1 / 3, 1 / 3, 1, 1, 1])


def test_four_bit_hand_values():
    # Z = 15: u = 2 floor((y + 1) * 7.5 + 0.5) - 15
    y = np.array([-1, -0.9, 0, 0.1, 0.2, 1], np.float32)
    # (y+1)*7.5+0.5 = 0.5, 1.25, 8.0, 8.75, 9.5, 15.5 -> q = 0, 1, 8, 8, 9, 15
    assert quant.kbit_codes(y, 4).tolist() == [-15, -13, 1, 1, 3, 15]


def test_v0_scales_the_clip_range():
    y = np.array([-0.5, -0.25, 0.25, 0.5, 0.9], np.float32)
    assert quant.kbit_codes(y, 2, v0=0.5).tolist() == [-3, -1, 1, 3, 3]
    assert np.allclose(quant.dequantize(np.array([-3, 3]), 2, v0=0.5), [-0.5, 0.5])


@given(hnp.arrays(np.float32, 50, elements=st.floats(-3, 3, width=32)), st.sampled_from([2, 4]))
def test_kbit_codes_match_eq1(y, bits):
    """eq. (1) with v0=1, v1=2, v2=1/2 computed in float64 gives the value v0 u / Z."""
    z = 2 ** bits - 1
    yc = np.clip(y.astype(np.float64), -1, 1)
    expected = 2 * (np.floor((yc + 1) / 2 * z + 0.5) / z - 0.5)
    got = quant.dequantize(quant.kbit_codes(y, bits), bits).astype(np.float64)
    # float32 vs float64 rounding can only differ exactly at a level boundary
    t = (yc + 1) / 2 * z + 0.5
    boundary = np.abs(t - np.rint(t)) < 1e-5
    assert np.allclose(got[~boundary], expected[~boundary], atol=1e-6)
    codes = quant.kbit_codes(y, bits)
    assert ((codes % 2) != 0).all() and (np.abs(codes) <= z).all()


def test_alpha_is_mean_abs_per_filter():
    w = np.array([[[[1.0, -2.0]], [[3.0, -4.0]]], [[[0.0, 0.0]], [[0.0, -8.0]]]], np.float32)
    assert quant.alpha(w).tolist() == [2.5, 2.0]  # ||W||_1 / n, n = 2 * 1 * 2
    assert np.allclose(quant.output_scale(w, 2), np.array([2.5, 2.0]) / 9)


def test_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        quant.levels(3)
