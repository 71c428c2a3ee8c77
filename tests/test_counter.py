"""Operation counter (xnorcdl.counter): hand-computed counts, written as arithmetic with the formula
in a comment, plus independent checks against direct loops and against what the reference
kernels actually execute. All counts are integers and compared exactly."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from xnorcdl import counter, engine
from xnorcdl.backends import reference as ex
from xnorcdl.counter import FINAL
from xnorcdl.format import random_weights
from xnorcdl.kernels import reference as ref
from xnorcdl.model import FloatConv, QuantConv, build_model
from xnorcdl.spec import ExitSpec, ModelSpec

from conftest import make_spec, random_images


def model_of(spec):
    return build_model(spec, random_weights(spec))


@pytest.fixture(scope="module")
def r32():
    """ResNet-32, 20 binary edge convs + 10 cloud convs, one exit after conv 20."""
    return model_of(ModelSpec(depth=32, edge_convs=20, edge_bits=1, exits=(ExitSpec(20, 0.5),)))


def rows_by_name(model, **kw):
    return {r.name: r for r in counter.layer_counts(model, **kw)}


# ---- valid taps: closed form vs a direct loop ---------------------------------------------------

def loop_valid_taps_2d(h, w, k, stride, pad):
    """Count (output position, kernel tap) pairs whose input pixel lies inside the image."""
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    n = 0
    for oy in range(ho):
        for ox in range(wo):
            for ty in range(k):
                for tx in range(k):
                    y, x = oy * stride - pad + ty, ox * stride - pad + tx
                    n += (0 <= y < h) and (0 <= x < w)
    return n


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 40), k=st.integers(1, 5), stride=st.integers(1, 3),
       pad=st.integers(0, 2))
def test_valid_taps_closed_form_matches_loop(size, k, stride, pad):
    if size + 2 * pad < k:
        return
    n_out = (size + 2 * pad - k) // stride + 1
    direct = sum(0 <= o * stride - pad + t < size for o in range(n_out) for t in range(k))
    assert counter.valid_taps_1d(size, k, stride, pad) == direct
    assert loop_valid_taps_2d(size, size, k, stride, pad) == direct * direct


@pytest.mark.parametrize("shape,stride,pad", [
    ((4, 3, 3, 3), 1, 1), ((5, 2, 3, 3), 2, 1), ((6, 4, 1, 1), 2, 0), ((3, 2, 3, 3), 1, 0)])
@pytest.mark.parametrize("h", [7, 8])
def test_conv_counts_match_kernel_and_loop(shape, stride, pad, h):
    """Valid MACs = the sum of a reference convolution of all-ones operands (every valid tap adds
    exactly 1, every padded tap 0); dense MACs = O * C * k * k * Ho * Wo."""
    o, c, k, _ = shape
    layer = FloatConv("t", np.zeros(shape, np.float32), np.ones(o, np.float32),
                      np.zeros(o, np.float32), stride, pad, True)
    row = counter.conv_counts(layer, (c, h, h))
    executed = ref.conv2d(np.ones((1, c, h, h)), np.ones(shape), stride, pad).sum()
    assert row.macs_valid == int(executed)
    assert row.macs_valid == o * c * loop_valid_taps_2d(h, h, k, stride, pad)
    ho = (h + 2 * pad - k) // stride + 1
    assert row.macs_dense == o * c * k * k * ho * ho
    assert row.output_shape == (o, ho, ho)


def test_quant_conv_counts_small():
    """A 2-bit QuanConv, 3 -> 4 channels, 5x5 input, stride 2, pad 1."""
    q = QuantConv("q", np.ones((4, 3, 3, 3), np.int8), np.ones(4, np.float32),
                  np.ones(3, np.float32), np.zeros(3, np.float32), 2, 1.0, 2)
    row = counter.conv_counts(q, (3, 5, 5))
    # out 3x3; per dim, o in 0..2 reads 2o-1..2o+1 of 0..4: o = 0 loses -1, o = 2 loses 5,
    # so 2 + 3 + 2 = 7 valid taps per dim
    assert row.output_shape == (4, 3, 3)
    assert row.macs_valid == 4 * 3 * 7 * 7
    assert row.macs_dense == 4 * 3 * 9 * 3 * 3
    assert row.precision == 2
    assert row.params == 4 * 3 * 9 + 4 + 2 * 3                # codes + s[o] + BN scale, shift
    assert row.param_bits == 2 * 108 + 32 * (4 + 6)
    n_in, n_out = 3 * 5 * 5, 4 * 3 * 3
    assert row.quantize == n_in
    assert row.cmp32 == 2 * n_in                               # clip: 2 comparisons
    assert row.add32 == n_in + 2 * n_in                        # BN shift; + v0, + 1/2
    assert row.mul32 == n_in + n_in + n_out                    # BN scale; * Z/v1; s[o]
    assert row.read_bits == 32 * n_in + 2 * n_in               # float input, packed codes back
    assert row.write_bits == 2 * n_in + 32 * n_out             # packed codes, float output


def test_unknown_layer_raises():
    with pytest.raises(TypeError, match="cannot count"):
        counter.conv_counts(object(), (3, 4, 4))


# ---- ResNet-32 layers by hand ----------------------------------------------------------------

def test_r32_stem(r32):
    s = rows_by_name(r32)["stem"]
    assert s.macs_dense == 16 * 3 * 9 * 32 * 32                # O C k^2 Ho Wo = 442,368
    # valid taps per dim for 3x3, pad 1, stride 1 on n: (n - 1) + n + (n - 1) = 3n - 2 = 94
    assert s.macs_valid == 16 * 3 * 94 * 94                    # 424,128
    assert s.params == 16 * 3 * 9 + 2 * 16 + 2 * 3             # weights, BN, normalisation
    assert s.mul32 == 16 * 32 * 32 + 3 * 32 * 32               # BN scale + normalisation
    assert s.read_bits == 8 * 3 * 32 * 32                      # uint8 pixels
    assert s.write_bits == 32 * 16 * 32 * 32
    assert (s.placement, s.precision) == ("edge", 32)
    relu = rows_by_name(r32)["stem.relu"]
    assert relu.cmp32 == relu.relu == 16 * 32 * 32 and relu.memory_bits == 0


def test_r32_binary_16_channel_block(r32):
    rows = rows_by_name(r32)
    c1 = rows["conv1"]
    assert (c1.kind, c1.placement, c1.precision) == ("qconv", "edge", 1)
    assert c1.macs_dense == 16 * 16 * 9 * 32 * 32              # 2,359,296
    assert c1.macs_valid == 16 * 16 * 94 * 94                  # 2,262,016
    assert c1.params == 16 * 16 * 9 + 16 + 2 * 16
    assert c1.param_bits == 1 * 2304 + 32 * 48
    assert c1.cmp32 == 16 * 32 * 32                            # sign of every input element
    assert c1.read_bits == (32 + 1) * 16384 and c1.write_bits == (1 + 32) * 16384
    sc, add = rows["block0.shortcut"], rows["block0.add"]
    assert sc.memory_bits == 0 and sc.add32 == 0               # identity
    assert add.add32 == 16 * 32 * 32
    assert add.read_bits == 32 * 2 * 16384 and add.write_bits == 32 * 16384
    assert "block0.relu" not in rows and "conv1.relu" not in rows      # edge: no ReLU


def test_r32_stride2_blocks(r32):
    rows = rows_by_name(r32)
    c = rows["conv11"]                                         # block 5: 16 -> 32, 32x32 -> 16x16
    assert c.output_shape == (32, 16, 16)
    assert c.macs_dense == 32 * 16 * 9 * 16 * 16
    # stride 2, pad 1, n = 32: output o reads 2o-1, 2o, 2o+1; only 2o-1 at o = 0 falls out:
    # 15 + 16 + 16 = 47 valid taps per dim
    assert c.macs_valid == 32 * 16 * 47 * 47
    sc, add = rows["block5.shortcut"], rows["block5.add"]      # zero_pad: 16 real channels
    assert sc.read_bits == sc.write_bits == 32 * 16 * 16 * 16
    assert add.add32 == 16 * 16 * 16
    c = rows["conv21"]                                         # block 10 (cloud): 32 -> 64, 8x8
    assert (c.kind, c.placement, c.precision) == ("conv", "cloud", 32)
    assert c.macs_dense == 64 * 32 * 9 * 8 * 8
    assert c.macs_valid == 64 * 32 * 23 * 23                   # n = 16: 7 + 8 + 8 = 23
    assert c.params == 64 * 32 * 9 + 2 * 64
    assert c.add32 == c.mul32 == 64 * 8 * 8                    # BN per output element
    assert rows["conv21.relu"].cmp32 == 64 * 64
    assert rows["block10.relu"].cmp32 == 64 * 64
    assert rows["conv22"].macs_valid == 64 * 64 * 22 * 22       # 3 * 8 - 2 = 22


def test_r32_exit_and_head(r32):
    rows = rows_by_name(r32)
    e = rows["exit0"]                                          # reads block 9: 32 x 16 x 16
    feats = 32 * 5 * 5                                         # avg pool 3/3, floor: 16 // 3 = 5
    assert e.macs_valid == e.macs_dense == 10 * feats
    assert e.params == 10 * feats + 10
    # pool: 8 adds + 1 mul per pooled value; bias: 10 adds; softmax + entropy on C = 10:
    # adds 3C - 1, muls C, exp/div/log 2C + 1, comparisons C + 1
    assert e.add32 == 8 * feats + 10 + 29
    assert e.mul32 == feats + 10
    assert e.special32 == 21 and e.cmp32 == 11
    assert e.read_bits == 32 * 32 * 15 * 15 and e.write_bits == 32 * 10
    assert (e.placement, e.softmax, e.entropy) == ("edge", 10, 1)
    h = rows["head"]
    assert h.macs_valid == 64 * 10 and h.params == 650
    assert h.add32 == 64 * 63 + 10 and h.mul32 == 64 and h.cmp32 == 9     # pool, bias, argmax
    assert h.placement == "cloud"


def test_r32_full_precision_totals(r32):
    tot = counter.total(counter.layer_counts(r32, full_precision=True, exits=False))
    # dense: stem + stage 0 (10 convs 16->16 @32x32) + stage 1 (16->32 @16x16, 9 x 32->32)
    #        + stage 2 (32->64 @8x8, 9 x 64->64) + head
    dense = (16 * 27 * 1024 + 10 * 16 * 16 * 9 * 1024 + (32 * 16 * 9 + 9 * 32 * 32 * 9) * 256
             + (64 * 32 * 9 + 9 * 64 * 64 * 9) * 64 + 640)
    assert dense == 68_862_592
    assert tot["macs_dense"] == dense
    # valid: valid taps per dim 3n - 2 (stride 1) and 47 (32 -> 16), 23 (16 -> 8)
    valid = (16 * 3 * 94 ** 2 + 10 * 16 * 16 * 94 ** 2 + 32 * 16 * 47 ** 2 + 9 * 32 * 32 * 46 ** 2
             + 64 * 32 * 23 ** 2 + 9 * 64 * 64 * 22 ** 2 + 640)
    assert valid == 62_602_560
    assert tot["macs_valid"] == valid
    assert tot["macs_valid_by_bits"] == {"32": valid}
    # parameters: convs + BN (2 per output channel) + normalisation + head
    convs = 16 * 27 + 10 * 2304 + 4608 + 9 * 9216 + 18432 + 9 * 36864
    bn = 2 * (16 + 10 * 16 + 10 * 32 + 10 * 64)
    assert tot["params"] == convs + bn + 6 + 650


def test_r32_hybrid_macs_by_precision(r32):
    tot = counter.total(counter.layer_counts(r32))
    binary = 10 * 16 * 16 * 94 ** 2 + 32 * 16 * 47 ** 2 + 9 * 32 * 32 * 46 ** 2
    fp = 16 * 3 * 94 ** 2 + 10 * 800 + 64 * 32 * 23 ** 2 + 9 * 64 * 64 * 22 ** 2 + 640
    assert tot["macs_valid_by_bits"] == {"1": binary, "32": fp}
    assert binary == 43_252_224


def test_full_precision_mode_equals_an_all_cloud_model():
    hybrid = model_of(make_spec(depth=14, edge_convs=8, edge_bits=2, exits=[(4, 1.0)]))
    plain = model_of(make_spec(depth=14, edge_convs=0))
    a = counter.total(counter.layer_counts(hybrid, full_precision=True, exits=False))
    b = counter.total(counter.layer_counts(plain))
    assert a == b
    assert {r.placement for r in counter.layer_counts(hybrid, full_precision=True)} == {"cloud"}


def test_conv1x1_shortcut_counts():
    m = model_of(make_spec(depth=8, edge_convs=4, shortcut="conv1x1"))
    sc = rows_by_name(m)["block1.shortcut"]                    # 16 -> 32, 32x32 -> 16x16
    assert sc.macs_valid == sc.macs_dense == 32 * 16 * 16 * 16
    assert sc.read_bits == 32 * 16 * 16 * 16                   # a 1x1 stride-2 conv reads 1/4
    assert sc.params == 32 * 16 + 2 * 32 and sc.placement == "edge"
    assert rows_by_name(m)["block1.add"].add32 == 32 * 16 * 16
    assert rows_by_name(m)["block2.shortcut"].placement == "cloud"


# ---- a tiny network, all layers ---------------------------------------------------------------

def test_depth8_hand_counts():
    """ResNet-8, 4 edge convs at 2 bits, exit after conv 4: blocks 16@32 -> 32@16 -> 64@8."""
    m = model_of(make_spec(depth=8, edge_convs=4, edge_bits=2, exits=[(4, 0.5)]))
    names = [r.name for r in counter.layer_counts(m)]
    assert names == ["stem", "stem.relu",
                     "conv1", "conv2", "block0.shortcut", "block0.add",
                     "conv3", "conv4", "block1.shortcut", "block1.add", "exit0",
                     "conv5", "conv5.relu", "conv6", "block2.shortcut", "block2.add",
                     "block2.relu", "head"]
    tot = counter.total(counter.layer_counts(m))
    two_bit = 2 * 16 * 16 * 94 ** 2 + 32 * 16 * 47 ** 2 + 32 * 32 * 46 ** 2
    fp = 16 * 3 * 94 ** 2 + 10 * 800 + 64 * 32 * 23 ** 2 + 64 * 64 * 22 ** 2 + 640
    assert tot["macs_valid_by_bits"] == {"2": two_bit, "32": fp}
    assert tot["quantize"] == 2 * 16 * 1024 + 16 * 1024 + 32 * 256      # inputs of convs 1..4
    assert tot["relu"] == 16 * 1024 + 2 * 64 * 64
    assert counter.edge_output_bytes(m) == 4 * 32 * 16 * 16


# ---- per sample ------------------------------------------------------------------------------

def test_sample_exiting_counts_stem_edge_blocks_and_exit(r32):
    rows = counter.sample_counts(r32, 0)
    names = [r.name for r in rows]
    assert names[0] == "stem" and names[-1] == "exit0"
    assert "head" not in names and not any(r.placement == "cloud" for r in rows)
    assert len([r for r in rows if r.kind == "qconv"]) == 20
    tot = counter.total(rows)
    binary = 10 * 16 * 16 * 94 ** 2 + 32 * 16 * 47 ** 2 + 9 * 32 * 32 * 46 ** 2
    assert tot["macs_valid_by_bits"] == {"1": binary, "32": 16 * 3 * 94 ** 2 + 8000}
    final = counter.sample_counts(r32, FINAL)
    assert [r.name for r in final] == [r.name for r in counter.layer_counts(r32)]
    assert counter.total(final)["entropy"] == 1                # exit evaluated, not taken


def test_two_exits_each_sample_counts_every_exit_evaluated():
    m = model_of(make_spec(depth=14, edge_convs=8, exits=[(2, 0.5), (6, 0.5)]))
    first = [r.name for r in counter.sample_counts(m, 0)]
    second = [r.name for r in counter.sample_counts(m, 1)]
    final = [r.name for r in counter.sample_counts(m, FINAL)]
    assert first[-1] == "exit0" and "conv3" not in first
    assert second[-1] == "exit1" and "exit0" in second and "conv7" not in second
    assert "exit0" in final and "exit1" in final and final[-1] == "head"
    masks = counter.outcome_masks(m, counter.layer_counts(m))
    assert masks.shape == (3, len(counter.layer_counts(m))) and masks[2].all()


def test_outcome_index_validates(r32):
    np.testing.assert_array_equal(counter.outcome_index(r32, np.array([0, -1, 0])), [0, 1, 0])
    with pytest.raises(ValueError, match="neither an exit"):
        counter.outcome_index(r32, np.array([1]))
    with pytest.raises(ValueError, match="integers"):
        counter.outcome_index(r32, np.array([0.0]))


def test_placement_and_communication_edges():
    all_edge = model_of(make_spec(depth=8, edge_convs=6))
    assert {r.placement for r in counter.layer_counts(all_edge)} == {"edge"}
    assert counter.edge_output_bytes(all_edge) == 0
    all_cloud = model_of(make_spec(depth=8, edge_convs=0))
    places = {r.name: r.placement for r in counter.layer_counts(all_cloud)}
    assert places["stem"] == "edge" and places["conv1"] == "cloud" and places["head"] == "cloud"
    assert counter.edge_output_bytes(all_cloud) == 4 * 16 * 32 * 32


# ---- what the engine executes ----------------------------------------------------------------

@pytest.mark.parametrize("threshold,outcome", [(1e9, 0), (0.0, FINAL)])
def test_counts_match_an_instrumented_engine_run(monkeypatch, threshold, outcome):
    """Run Algorithm 1 on one image with the reference executor, tallying every convolution the
    kernels execute (valid taps = sum of an all-ones convolution) and every linear layer; the
    per-sample counts must agree exactly."""
    m = model_of(make_spec(depth=8, edge_convs=4, edge_bits=1, exits=[(2, 0.5)],
                           shortcut="conv1x1"))
    seen = {"valid": 0, "dense": 0, "linear": 0}
    conv2d, linear = ref.conv2d, ex.linear

    def counting_conv2d(x, w, stride=1, pad=0, ordered=False):
        y = conv2d(x, w, stride, pad, ordered)
        ones = conv2d(np.ones((1,) + x.shape[1:]), np.ones(w.shape), stride, pad)
        seen["valid"] += int(ones.sum()) * x.shape[0]
        seen["dense"] += int(np.prod(w.shape)) * y.shape[2] * y.shape[3] * x.shape[0]
        return y

    def counting_linear(x, layer, ordered=False):
        seen["linear"] += layer.weight.size * x.shape[0]
        return linear(x, layer, ordered)

    monkeypatch.setattr(ref, "conv2d", counting_conv2d)
    monkeypatch.setattr(ex, "linear", counting_linear)
    res = engine.run(m, random_images(1), ex.ReferenceExecutor(m), [threshold])
    assert int(res.exit_index[0]) == outcome
    rows = counter.sample_counts(m, outcome)
    convs = [r for r in rows if r.kind not in ("exit", "head")]
    lins = [r for r in rows if r.kind in ("exit", "head")]
    assert seen["valid"] == sum(r.macs_valid for r in convs)
    assert seen["dense"] == sum(r.macs_dense for r in convs)
    assert seen["linear"] == sum(r.macs_valid for r in lins)


def test_layer_count_to_dict_is_plain(r32):
    d = counter.layer_counts(r32)[0].to_dict()
    assert d["output_shape"] == [16, 32, 32] and d["memory_bits"] == (
        d["param_bits"] + d["read_bits"] + d["write_bits"])
