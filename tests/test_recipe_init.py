"""The recipe's initialisation (weights/recipe/qat_resnet.py): ``init_from`` with
``fit_ranges`` (2/4-bit quantizers put in their working range) and ``edge_path`` (the edge of
a trained hybrid), and the ``--init-edge`` option."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import recipe_support  # noqa: E402
from xnorcdl import quant  # noqa: E402
from xnorcdl.format import random_weights, save_weights  # noqa: E402
from xnorcdl.spec import ExitSpec, ModelSpec  # noqa: E402

import qat_resnet as Q  # noqa: E402


def _file(tmp_path, name, **kw):
    spec = ModelSpec(depth=14, **kw)
    path = str(tmp_path / name)
    save_weights(path, spec, random_weights(spec, seed=len(name) + kw.get("edge_convs", 0)))
    return path, spec


def _model(**kw):
    return Q.HybridResNet(ModelSpec(depth=14, **kw))


def _edge_weights(model):
    t = Q.named_tensors(model)
    return {i: t[f"conv{i}.weight"].detach().numpy().copy()
            for i in range(1, model.spec.edge_convs + 1)}


@pytest.mark.parametrize("bits", [2, 4])
def test_fit_ranges_spreads_weight_codes_over_the_levels(tmp_path, bits):
    """He-normal weights (std ~0.1 at 16 channels) in [-v0, v0] mostly get the two codes next
    to zero without the fit; with it, every fitted conv uses at least 2^bits - 1 of its 2^bits codes and the
    relative code error is below the unfitted one."""
    fp, _ = _file(tmp_path, "fp.npz")
    plain, fitted = _model(edge_convs=6, edge_bits=bits), _model(edge_convs=6, edge_bits=bits)
    Q.init_from(plain, fp, log=lambda s: None)
    Q.init_from(fitted, fp, log=lambda s: None, fit_ranges=True)
    for i, w in _edge_weights(plain).items():
        assert np.mean(np.abs(quant.codes(w, bits, 1.0)) == 1) > 0.6, i
        wf = _edge_weights(fitted)[i]
        assert len(np.unique(quant.codes(wf, bits, 1.0))) >= (1 << bits) - 1, i
        # a per-layer factor: the filters keep their relative norms
        ratio = wf / w
        np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
        e_plain = Q._code_error(torch.from_numpy(w), 1.0, bits, 1.0)
        e_fit = Q._code_error(torch.from_numpy(wf), 1.0, bits, 1.0)
        assert e_fit < 0.5 * e_plain, (i, e_fit, e_plain)


def test_fit_scale_is_a_minimum_of_the_code_error():
    y = torch.from_numpy(np.random.default_rng(0).normal(0, 0.05, 20000).astype(np.float32))
    for bits in (2, 4):
        c = Q.fit_scale(y, bits, 1.0, 0.5, 500.0)
        e = Q._code_error(y, c, bits, 1.0)
        assert e <= Q._code_error(y, 0.8 * c, bits, 1.0)
        assert e <= Q._code_error(y, 1.25 * c, bits, 1.0)
    # a 4-bit quantizer clips a normal input near 2.5..3 standard deviations
    c4 = Q.fit_scale(y, 4, 1.0, 0.5, 500.0)
    assert 2.0 < 1.0 / (c4 * 0.05) < 3.5


def test_fit_ranges_leaves_binary_edges_and_same_depth_edges_alone(tmp_path):
    fp, _ = _file(tmp_path, "fp.npz")
    four, _ = _file(tmp_path, "e4.npz", edge_convs=6, edge_bits=4)
    for kw, src in (({"edge_bits": 1}, fp), ({"edge_bits": 4}, four)):
        a, b = _model(edge_convs=6, **kw), _model(edge_convs=6, **kw)
        Q.init_from(a, src, log=lambda s: None)
        Q.init_from(b, src, log=lambda s: None, fit_ranges=True)
        for k, t in Q.named_tensors(a).items():
            np.testing.assert_array_equal(t.detach().numpy(),
                                          Q.named_tensors(b)[k].detach().numpy(), err_msg=k)


def test_edge_path_takes_stem_edge_convs_and_exits_from_the_hybrid(tmp_path):
    """A 4E model from a float file and an 8E binary hybrid with an exit after conv 4: stem,
    convs 1..4 (weights and BNs) and the exit come from the hybrid, the rest from the float
    file, bit for bit; fitting the 2-bit ranges rescales the copied BNs to |gamma| = c_a and
    keeps each channel's zero crossing -beta/gamma."""
    fp, _ = _file(tmp_path, "fp.npz")
    hy, _ = _file(tmp_path, "hybrid.npz", edge_convs=8, edge_bits=1,
                  exits=(ExitSpec(4, 0.5), ExitSpec(8, 0.5)))
    from xnorcdl.format import load_weights
    _, a_fp = load_weights(fp)
    _, a_hy = load_weights(hy)
    m = _model(edge_convs=4, edge_bits=1, exits=(ExitSpec(4, 0.0),))
    Q.init_from(m, fp, log=lambda s: None, edge_path=hy)
    got = {k: t.detach().numpy() for k, t in Q.named_tensors(m).items()}
    for k, v in got.items():
        if k.startswith("stem.") or (k.startswith("conv") and int(k[4:k.index(".")]) <= 4):
            np.testing.assert_array_equal(v, a_hy[k], err_msg=k)
        elif k.startswith("exit0."):
            np.testing.assert_array_equal(v, a_hy[k], err_msg=k)
        else:
            np.testing.assert_array_equal(v, a_fp[k], err_msg=k)
    m2 = _model(edge_convs=4, edge_bits=2, exits=(ExitSpec(4, 0.0),))
    Q.init_from(m2, fp, log=lambda s: None, edge_path=hy, fit_ranges=True)
    t2 = Q.named_tensors(m2)
    c_a = Q.fit_scale(torch.randn(1 << 18, generator=torch.Generator().manual_seed(0)),
                      2, 1.0, 0.05, 4.0)
    for i in range(1, 5):
        g, b = t2[f"conv{i}.bn.gamma"].detach().numpy(), t2[f"conv{i}.bn.beta"].detach().numpy()
        np.testing.assert_allclose(np.abs(g), c_a, rtol=1e-6)
        np.testing.assert_allclose(-b / g, -a_hy[f"conv{i}.bn.beta"] / a_hy[f"conv{i}.bn.gamma"],
                                   rtol=1e-5)


def test_init_edge_needs_init_and_a_matching_network(tmp_path, capsys):
    T = recipe_support.T
    hy, _ = _file(tmp_path, "hybrid.npz", edge_convs=2, edge_bits=1)
    assert T.run(recipe_support.tiny_args(tmp_path, "--init-edge", hy)) == 2
    assert "--init-edge replaces the edge of the --init file" in capsys.readouterr().err
    other = str(tmp_path / "conv1x1.npz")
    spec = ModelSpec(depth=8, edge_convs=2, edge_bits=1, shortcut="conv1x1")
    save_weights(other, spec, random_weights(spec, seed=1))
    m = _model(edge_convs=2, edge_bits=1)
    fp, _ = _file(tmp_path, "fp.npz")
    with pytest.raises(ValueError, match="ResNet-14 with zero_pad"):
        Q.init_from(m, fp, log=lambda s: None, edge_path=other)
