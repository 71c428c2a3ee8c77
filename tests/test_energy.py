"""Energy model (xnorcdl.energy), the energy table and the summary command.

Expected energies are written out from the counting rules of docs/COUNTING.md and Table I, not
taken from the implementation. Floats are compared with a relative tolerance of 1e-12: the sums
are of at most ~10^2 terms of magnitude <= 1e8 pJ, far from float64's 2^-52 relative error.
"""
import dataclasses
import json

import numpy as np
import pytest

from xnorcdl import energy as E
from xnorcdl.counter import FINAL
from xnorcdl.format import random_weights
from xnorcdl.model import build_model
from xnorcdl.spec import ExitSpec, ModelSpec
from xnorcdl.summary import main as summary_main

from conftest import make_spec

REL = 1e-12
BINARY_R32_EDGE = 10 * 16 * 16 * 94 ** 2 + 32 * 16 * 47 ** 2 + 9 * 32 * 32 * 46 ** 2   # valid MACs


def model_of(spec):
    return build_model(spec, random_weights(spec))


@pytest.fixture(scope="module")
def r32():
    return model_of(ModelSpec(depth=32, edge_convs=20, edge_bits=1, exits=(ExitSpec(20, 0.5),)))


def table_doc(**ops):
    """The default table as a dict, with some operation energies replaced."""
    with open(E.DEFAULT_TABLE) as f:
        doc = json.load(f)
    for k, v in ops.items():
        doc["operations"][k]["energy"] = v
    return doc


def only(name, value=1.0, **top):
    """A table pricing one class at ``value`` and everything else at 0 (built in code: a table
    file must price every row above 0)."""
    doc = table_doc()
    doc.update(top)
    table = E.parse_energy_table(doc, "t.json")
    return dataclasses.replace(table, energy={k: value if k == name else 0.0
                                              for k in E.OPERATIONS})


# ---- the table --------------------------------------------------------------------------------

def test_default_table_is_table_one():
    t = E.load_energy_table()
    assert t.energy["add32"] == 0.9 and t.energy["mac32"] == 4.6
    assert t.energy["mac1"] == 0.2 and t.energy["mem_bit"] == 2.5
    assert t.energy["mul32"] == pytest.approx(4.6 - 0.9)
    assert [t.mac(k) for k in (1, 2, 4)] == pytest.approx([0.2, 0.4, 0.8])   # k * binary MAC
    assert t.mac(32) == 4.6
    assert all("Table I" in t.source[k] for k in ("add32", "mac32", "mac1", "mem_bit"))
    assert t.mac_convention == "valid" and t.memory_mode == "weights_and_activations"
    with pytest.raises(ValueError, match="1..32"):
        t.mac(0)


@pytest.mark.parametrize("mutate,key", [
    (lambda d: d["operations"].pop("mac32"), "operations.mac32"),
    (lambda d: d["operations"]["add32"].update(energy=-1), "operations.add32.energy"),
    (lambda d: d["operations"]["add32"].update(energy="0.9"), "operations.add32.energy"),
    (lambda d: d["operations"]["add32"].update(energy=True), "operations.add32.energy"),
    (lambda d: d["operations"]["add32"].pop("energy"), "operations.add32.energy"),
    (lambda d: d["operations"]["mem_bit"].update(unit="pJ/op"), "operations.mem_bit.unit"),
    (lambda d: d["operations"]["mac1"].update(source=""), "operations.mac1.source"),
    (lambda d: d["operations"].update(mac8={"energy": 1}), "mac8"),
    (lambda d: d.update(extra=1), "extra"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(mac_convention="padded"), "mac_convention"),
    (lambda d: d.update(memory="activations"), "memory"),
    (lambda d: d["rules"]["mac_k"].update(rule="quadratic"), "rules.mac_k.rule"),
    (lambda d: d["rules"]["mac_k"].update(base="mac32"), "rules.mac_k.base"),
    (lambda d: d.pop("rules"), "rules.mac_k"),
])
def test_table_errors_name_file_and_key(tmp_path, mutate, key):
    doc = table_doc()
    mutate(doc)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(E.EnergyTableError) as err:
        E.load_energy_table(str(path))
    assert str(path) in str(err.value) and key in str(err.value)


def test_table_file_errors(tmp_path):
    with pytest.raises(E.EnergyTableError, match="no such file"):
        E.load_energy_table(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(E.EnergyTableError, match="bad.json: not valid UTF-8 JSON"):
        E.load_energy_table(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(E.EnergyTableError, match="expected a JSON object"):
        E.load_energy_table(str(bad))


# ---- pricing ------------------------------------------------------------------------------------

def test_full_precision_network_energy_by_hand():
    """ResNet-8 with every conv float32 and no exits: MACs * 4.6 + BN (mul 3.7 + add 0.9 per
    element) + ReLU and residual adds (0.9 each) + head pool/bias/argmax + 2.5 pJ per bit moved."""
    m = model_of(make_spec(depth=8, edge_convs=0))
    macs = (16 * 3 * 94 ** 2                                   # stem
            + 2 * 16 * 16 * 94 ** 2                            # block 0: two 16->16 @32x32
            + 32 * 16 * 47 ** 2 + 32 * 32 * 46 ** 2            # block 1: 16->32 s2, 32->32 @16
            + 64 * 32 * 23 ** 2 + 64 * 64 * 22 ** 2            # block 2: 32->64 s2, 64->64 @8
            + 64 * 10)                                         # head
    bn = 16384 + 2 * 16384 + 2 * 8192 + 2 * 4096               # one per conv output element
    norm = 3 * 1024                                            # input normalisation multiply-add
    relu = 16384 + 2 * 16384 + 2 * 8192 + 2 * 4096             # stem; conv1 and after each add
    res_adds = 16384 + 16 * 256 + 32 * 64                      # identity; zero_pad real channels
    head_add, head_mul, head_cmp = 64 * 63 + 10, 64, 9         # pool sums + bias; 1/64; argmax
    params = (16 * 27 + 32 + 6 + 2 * (2304 + 32) + (4608 + 64) + (9216 + 64)
              + (18432 + 128) + (36864 + 128) + 650)
    acts = (8 * 3072 + 32 * 16384                              # stem: pixels in, float out
            + 32 * 4 * 16384 + 32 * 3 * 16384                  # block 0: 2 convs r/w; add 2r + w
            + 32 * (16384 + 8192) + 32 * 2 * 8192              # block 1 conv1, conv2
            + 32 * 2 * 4096 + 32 * (8192 + 4096 + 8192)        # zero_pad r/w; add
            + 32 * (8192 + 4096) + 32 * 2 * 4096               # block 2 conv1, conv2
            + 32 * 2 * 2048 + 32 * (4096 + 2048 + 4096)        # zero_pad r/w; add
            + 32 * 4096 + 32 * 10)                             # head
    expected = (4.6 * macs + (3.7 + 0.9) * (bn + norm) + 0.9 * (relu + res_adds + head_add)
                + 3.7 * head_mul + 0.9 * head_cmp + 2.5 * (32 * params + acts))
    s = E.energy_summary(m, np.array([FINAL]))
    assert s["mean_pJ_per_sample"]["total"] == pytest.approx(expected, rel=REL)
    assert s["baselines_pJ_per_sample"]["full_precision_no_exit"]["total"] == pytest.approx(
        expected, rel=REL)
    assert s["reduction"]["vs_full_precision_no_exit"] == pytest.approx(1.0, rel=REL)
    assert s["ops_total"]["macs_valid"] == macs


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_each_class_priced_alone(bits):
    """With one class at 1 pJ and the others at 0, the energy is that count."""
    m = model_of(ModelSpec(depth=32, edge_convs=20, edge_bits=bits, exits=(ExitSpec(20, 0.5),)))
    def mean(table, ex):
        return E.energy_summary(m, np.array([ex]), table)["mean_pJ_per_sample"]
    assert mean(only("mac1"), 0)["total"] == pytest.approx(bits * BINARY_R32_EDGE, rel=REL)
    fp_exit = 16 * 3 * 94 ** 2 + 10 * 800
    assert mean(only("mac32"), 0)["total"] == pytest.approx(fp_exit, rel=REL)
    cloud = 64 * 32 * 23 ** 2 + 9 * 64 * 64 * 22 ** 2 + 640
    e = mean(only("mac32"), FINAL)
    assert (e["edge"], e["cloud"]) == (pytest.approx(fp_exit), pytest.approx(cloud))
    dense_edge = 10 * 16 * 16 * 9 * 1024 + (32 * 16 * 9 + 9 * 32 * 32 * 9) * 256
    assert mean(only("mac1", mac_convention="dense"), 0)["total"] == pytest.approx(
        bits * dense_edge, rel=REL)
    assert mean(only("special32"), 0)["total"] == 21                 # 2C + 1 at the exit
    # weights only: parameter bits of stem + 20 edge convs + exit
    edge_params = (32 * (16 * 27 + 32 + 6) + bits * (10 * 2304 + 4608 + 9 * 9216)
                   + 32 * (10 * (16 + 32) + (32 + 32) + 9 * (32 + 64)) + 32 * 8010)
    assert mean(only("mem_bit", memory="weights"), 0)["total"] == pytest.approx(edge_params,
                                                                                rel=REL)


def test_r32_hybrid_summary(r32):
    ex = np.array([0, 0, 0, FINAL])
    s = E.energy_summary(r32, ex)
    per = E.per_sample_energy(r32, ex)
    exit_row, final_row = s["outcomes"]
    assert exit_row["outcome"] == "exit0" and exit_row["after_conv"] == 20
    assert exit_row["pJ_per_sample"]["cloud"] == 0
    assert final_row["pJ_per_sample"]["edge"] == pytest.approx(exit_row["pJ_per_sample"]["edge"])
    assert (exit_row["samples"], final_row["samples"]) == (3, 1)
    expected_mean = (3 * exit_row["pJ_per_sample"]["total"]
                     + final_row["pJ_per_sample"]["total"]) / 4
    assert s["mean_pJ_per_sample"]["total"] == pytest.approx(expected_mean, rel=REL)
    assert s["total_pJ"]["total"] == pytest.approx(per["total_pJ"].sum(), rel=REL)
    np.testing.assert_array_equal(per["exit_index"], ex)
    np.testing.assert_array_equal(per["comm_bytes"], [0, 0, 0, 32 * 16 * 16 * 4])
    assert s["communication"]["total_bytes"] == 32768 and s["communication"]["cloud_samples"] == 1
    # baselines: (a) full precision without exits, (b) the hybrid without its exit
    fp = s["baselines_pJ_per_sample"]["full_precision_no_exit"]["total"]
    hy = s["baselines_pJ_per_sample"]["hybrid_no_exit"]["total"]
    assert s["reduction"]["vs_full_precision_no_exit"] == pytest.approx(fp / expected_mean)
    assert s["reduction"]["vs_hybrid_no_exit"] == pytest.approx(hy / expected_mean)
    exit_only = E.split_energy([r for r in E.profile(r32).rows if r.kind == "exit"],
                               E.default_table())["total"]
    assert final_row["pJ_per_sample"]["total"] == pytest.approx(hy + exit_only, rel=REL)
    assert fp > hy > exit_row["pJ_per_sample"]["total"]
    ops = s["ops_total"]
    assert ops["macs_valid_by_bits"]["1"] == 4 * BINARY_R32_EDGE
    assert ops["entropy"] == 4 and ops["softmax"] == 40
    json.dumps(s)                                              # JSON-serialisable as is


def test_per_sample_records_and_empty_run(r32):
    recs = E.per_sample_records(r32, np.array([FINAL, 0]))
    assert [r["exit"] for r in recs] == ["final", "exit0"]
    assert recs[1]["macs_by_bits"] == {"1": BINARY_R32_EDGE, "32": 16 * 3 * 94 ** 2 + 8000}
    assert recs[0]["comm_bytes"] == 32768 and recs[1]["comm_bytes"] == 0
    json.dumps(recs)
    s = E.energy_summary(r32, np.array([], dtype=np.int64))
    assert s["samples"] == 0 and s["mean_pJ_per_sample"]["total"] is None
    assert s["reduction"]["vs_hybrid_no_exit"] is None
    assert "n/a" in E.format_energy(s)


def test_format_energy_lines(r32):
    text = E.format_energy(E.energy_summary(r32, np.array([0, FINAL])))
    lines = text.splitlines()
    assert lines[0].startswith("energy ") and "uJ/sample" in lines[0]
    assert any(l.startswith("reduction ") for l in lines)
    assert any("32768 B per cloud-bound sample x 1" in l for l in lines)


def test_summary_command(weights_file, tmp_path, capsys):
    path = weights_file(make_spec(depth=8, edge_convs=4, edge_bits=2, exits=[(4, 0.5)]))
    out = tmp_path / "s.json"
    assert summary_main(["--weights", path, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "total edge" in text and "total cloud" in text and "2-bit MACs" in text
    doc = json.loads(out.read_text())
    net = doc["totals"]["network"]
    two_bit = 2 * 16 * 16 * 94 ** 2 + 32 * 16 * 47 ** 2 + 32 * 32 * 46 ** 2   # convs 1-4, valid
    assert net["macs_valid_by_bits"]["2"] == two_bit
    assert net["total_pJ"] == pytest.approx(doc["outcomes"][-1]["pJ_per_sample"]["total"])
    assert net["edge_pJ"] == pytest.approx(doc["totals"]["edge"]["total_pJ"])
    assert [d["name"] for d in doc["layers"]][-1] == "head"
    bad = tmp_path / "t.json"
    bad.write_text("{}")
    assert summary_main(["--weights", path, "--energy", str(bad)]) == 2
    assert "t.json" in capsys.readouterr().err
