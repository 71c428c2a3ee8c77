"""Split deployment artifacts (xnorcdl.split): bit packing, each half alone, and edge + cloud
equal to the single-process engine (bit for bit at the edge, per sample for decisions)."""
import json
import os
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from serving import images, split_model
from xnorcdl import engine, split as sp
from xnorcdl.cloud_service import CloudRunner
from xnorcdl.edge_program import edge_pass
from xnorcdl.errors import ArtifactError
from xnorcdl.files import sha256_of
from xnorcdl.api import make_executor
from xnorcdl.model import load_model


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 4]), n=st.integers(1, 200), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(bits, n, seed):
    z = (1 << bits) - 1
    rng = np.random.default_rng(seed)
    u = (2 * rng.integers(0, z + 1, n) - z).astype(np.int8) if bits > 1 else \
        rng.choice(np.array([-1, 1], np.int8), n)
    packed = sp.pack_codes(u, bits)
    assert packed.dtype == np.uint8 and len(packed) == (n * bits + 7) // 8
    np.testing.assert_array_equal(sp.unpack_codes(packed, bits, (n,)), u)


def test_pack_layout_is_lsb_first_with_set_bit_for_minus_one():
    assert sp.pack_codes(np.array([-1, 1, 1, -1, 1, 1, 1, 1, -1], np.int8), 1).tolist() == [9, 1]
    # 2 bits: levels q = (u + 3) / 2 = 0, 3, 1, 2 -> 0b10_01_11_00
    assert sp.pack_codes(np.array([-3, 3, -1, 1], np.int8), 2).tolist() == [0b10011100]


CASES = [dict(edge_bits=b, shortcut=s) for b in (1, 2, 4) for s in ("zero_pad", "conv1x1")] + [
    dict(edge_convs=2, exits=[(2, 1.9)]), dict(edge_convs=0, exits=[]),
    dict(depth=14, edge_convs=6, exits=[(4, 1.7), (6, 1.9)])]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_edge_plus_cloud_equals_the_engine(tmp_path, kw, backend):
    w, e_path, c_path = split_model(tmp_path, **kw)
    full = load_model(w)
    edge, cloud = sp.load_edge(e_path), sp.load_cloud(c_path)
    assert edge.model_id == cloud.model_id == sha256_of(w)
    x = images(48, seed=5)
    ref = engine.run(full, x, make_executor(full, backend), batch_size=16)
    thr = [e.threshold for e in full.exits]
    where, pred, ent, idx, feats = edge_pass(edge.model, x, make_executor(edge.model, backend), thr)
    np.testing.assert_array_equal(where, ref.exit_index)
    np.testing.assert_array_equal(ent, ref.entropies)          # bit for bit, NaN where skipped
    left = where != engine.FINAL
    np.testing.assert_array_equal(pred[left], ref.predictions[left])
    np.testing.assert_array_equal(idx, np.flatnonzero(~left))
    # the features sent are the engine's edge output for those samples, bit for bit
    ex = make_executor(full, backend)
    state = ex.stem(x)
    for b in range(full.edge_blocks):
        state = ex.block(b, state)
    if len(idx):
        np.testing.assert_array_equal(feats, state[idx])
        logits = CloudRunner(cloud, backend)(feats)
        np.testing.assert_allclose(logits, ref.logits[idx], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(logits.argmax(1), ref.predictions[idx])


def test_r32_20E_edge_artifact_is_small(tmp_path):
    rep = sp.split(os.path.join("weights", "r32_20E.npz"), str(tmp_path))
    assert rep["edge_bytes"] < 100_000 < rep["edge_float32_bytes"]
    with zipfile.ZipFile(rep["edge"]) as z:
        names = {n[:-4] for n in z.namelist()}
    assert not any(n.startswith(("conv21", "conv30", "head")) for n in names)  # no cloud array
    assert "conv20.codes" in names and "exit0.weight" in names


def test_each_half_refuses_the_other_and_bad_files(tmp_path):
    _, e_path, c_path = split_model(tmp_path)
    with pytest.raises(ArtifactError, match="other half"):
        sp.load_edge(c_path)
    with pytest.raises(ArtifactError, match="other half"):
        sp.load_cloud(e_path)
    with pytest.raises(ArtifactError, match="no such file"):
        sp.load_edge(str(tmp_path / "missing.npz"))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="not a readable"):
        sp.load_cloud(str(bad))
    # a tampered array shape and an unknown version are named
    with np.load(e_path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta.json"].tobytes())
    for change, needle in ((lambda a, m: a.update({"exit0.bias": a["exit0.bias"][:3]}), "exit0.bias"),
                           (lambda a, m: m.update(version=2), "version"),
                           (lambda a, m: m.update(model_id="zz"), "model_id")):
        a2, m2 = dict(arrays), dict(meta)
        change(a2, m2)
        a2["meta.json"] = np.frombuffer(json.dumps(m2).encode(), np.uint8)
        p = tmp_path / "t.npz"
        np.savez(p, **a2)
        with pytest.raises(ArtifactError, match=needle):
            sp.load_edge(str(p))


def test_split_command(tmp_path, capsys):
    assert sp.main(["--weights", os.path.join("weights", "r32_20E.npz"), "--out",
                    str(tmp_path / "d"), "--json", "-"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["edge_bytes"] == os.path.getsize(tmp_path / "d" / "edge.npz")
    assert sp.main(["--weights", str(tmp_path / "none.npz"), "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.startswith("error:")
