"""Malformed weights files and split artifacts: the description (exact types, ranges, JSON
bombs), the arrays (dtype, shape, values) and the zip structure (duplicates, encryption,
compression methods, declared sizes, member names). Each row is refused by the command with
status 2, one ``error:`` line naming the file and the field or array, no traceback, and every
file unchanged; the loader raises only the project's errors."""
import json
import os
import zipfile

import numpy as np
import pytest

from hostile import (assert_refused, make_files, meta_bytes, npy, npz_members, patch_zip,
                     snapshot, with_array, with_meta, write_zip, xnorcdl)
from xnorcdl.errors import ArtifactError, WeightsError, XnorcdlError
from xnorcdl.format import META_KEY, MAX_META_BYTES, load_weights


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = make_files(tmp_path_factory.mktemp("w"))
    return folder, json.loads(meta_bytes(os.path.join(folder, "w.npz")))


def _field(path, value):
    """Set the description's field at ``path`` (a dotted path, list indices as numbers)."""
    def edit(meta):
        *head, last = path.split(".")
        d = meta
        for k in head:
            d = d[int(k)] if isinstance(d, list) else d[k]
        if isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value
        return json.dumps(meta).encode()
    return edit


def _raw(old, new):
    """Replace text in the description as written (for what json.dumps cannot write)."""
    def edit(meta):
        text = json.dumps(meta)
        assert old in text, old
        return text.replace(old, new, 1).encode("utf-8", "surrogateescape")
    return edit


#: (row id, edit of the decoded description -> new meta.json bytes, what the error names)
DESCRIPTIONS = [
    ("edge_bits true", _field("edge_bits", True), "edge_bits"),
    ("edge_bits float", _field("edge_bits", 1.0), "edge_bits"),
    ("edge_bits string", _field("edge_bits", "1"), "edge_bits"),
    ("edge_bits 3", _field("edge_bits", 3), "edge_bits"),
    ("depth float", _field("depth", 8.0), "depth"),
    ("depth true", _field("depth", True), "depth"),
    ("absurd depth", _field("depth", 6 * 10 ** 9 + 2), "depth"),
    ("depth with 5000 digits", _raw('"depth": 8', '"depth": ' + "9" * 5000), "meta.json"),
    ("num_classes huge", _field("num_classes", 10 ** 7), "num_classes"),
    ("edge_convs null", _field("edge_convs", None), "edge_convs"),
    ("version true", _field("version", True), "version"),
    ("version 1.0", _field("version", 1.0), "version"),
    ("bn_eps Infinity", _raw('"bn_eps": 1e-05', '"bn_eps": Infinity'), "Infinity"),
    ("bn_eps NaN", _raw('"bn_eps": 1e-05', '"bn_eps": NaN'), "NaN"),
    ("bn_eps overflowing", _raw('"bn_eps": 1e-05', '"bn_eps": 1e999'), "bn_eps"),
    ("bn_eps zero", _field("bn_eps", 0), "bn_eps"),
    ("bn_eps negative", _field("bn_eps", -1e-5), "bn_eps"),
    ("bn_eps true", _field("bn_eps", True), "bn_eps"),
    ("bn_eps huge", _field("bn_eps", 1e6), "bn_eps"),
    ("v0 huge", _field("quantizer", {"v0": 1e300, "v1": 2e300, "v2": 0.5}), "quantizer"),
    ("quantizer a list", _field("quantizer", [1, 2, 0.5]), "quantizer"),
    ("quantizer extra key", _field("quantizer", {"v0": 1, "v1": 2, "v2": 0.5, "v3": 1}),
     "quantizer"),
    ("threshold negative", _field("exits.0.threshold", -1), "exits[0].threshold"),
    ("threshold string", _field("exits.0.threshold", "0.5"), "exits[0].threshold"),
    ("threshold NaN", _raw('"threshold": 0.5', '"threshold": NaN'), "NaN"),
    ("after_conv float", _field("exits.0.after_conv", 4.0), "exits[0].after_conv"),
    ("exit a list", _field("exits", [[4, 0.5]]), "exits[0]"),
    ("exit missing threshold", _field("exits", [{"after_conv": 4}]), "exits[0]"),
    ("exits an object", _field("exits", {"after_conv": 4}), "exits"),
    ("too many exits", _field("exits", [{"after_conv": 4, "threshold": 0}] * 1000), "exits"),
    ("std zero", _field("normalize.std", [0, 1, 1]), "normalize.std"),
    ("mean of four", _field("normalize.mean", [0, 0, 0, 0]), "normalize.mean"),
    ("mean a string", _field("normalize.mean", "abc"), "normalize.mean"),
    ("shortcut a list", _field("shortcut", ["zero_pad"]), "shortcut"),
    ("provenance a number", _field("provenance", 5), "provenance"),
    ("provenance.partial a string", _field("provenance", {"partial": "x"}), "provenance.partial"),
    ("provenance.recalibrations a number", _field("provenance", {"recalibrations": 3}),
     "provenance.recalibrations"),
    ("unknown field", _field("surprise", 1), "unknown field"),
    ("duplicate key", _raw('"depth": 8', '"depth": 8, "depth": 14'), "twice"),
    ("nested array bomb", _raw('"bn_eps"', '"provenance": ' + "[" * 100000 + "]" * 100000
                               + ', "bn_eps"'), "levels deep"),
    ("nested object bomb", _raw('"bn_eps"', '"provenance": ' + '{"a":' * 50000 + "1"
                                + "}" * 50000 + ', "bn_eps"'), "levels deep"),
    ("not an object", lambda meta: b"[1, 2, 3]", "JSON object"),
    ("not UTF-8", lambda meta: b'{"format": "\xff"}', "UTF-8"),
    ("not JSON", lambda meta: b"{oops", "not valid UTF-8 JSON"),
    ("over the size limit", lambda meta: json.dumps(meta).encode() + b" " * MAX_META_BYTES,
     "more than"),
]


@pytest.mark.parametrize("row, edit, names", DESCRIPTIONS, ids=[r[0] for r in DESCRIPTIONS])
def test_bad_description(base, tmp_path, row, edit, names):
    folder, meta = base
    w = with_meta(os.path.join(folder, "w.npz"), tmp_path / "bad.npz",
                  edit(json.loads(json.dumps(meta))))
    with pytest.raises(WeightsError) as e:
        load_weights(w)
    assert names in str(e.value) and "bad.npz" in str(e.value)
    before = snapshot(tmp_path)
    r = xnorcdl(["summary", "--weights", "bad.npz"], tmp_path)
    assert_refused(r, "bad.npz", names)
    assert snapshot(tmp_path) == before


def _scaled(name, factor):
    def make(arrays):
        return name, (arrays[name] * factor).astype(np.float32)
    return make


def _set(name, index, value):
    def make(arrays):
        a = arrays[name].copy()
        a[index] = value
        return name, a
    return make


#: (row id, arrays -> (name, replacement or None to remove), what the error names)
ARRAYS = [
    ("negative variance", _set("conv1.bn.var", 0, -1.0), "conv1.bn.var"),
    ("NaN weight", _set("stem.conv.weight", (0, 0, 0, 0), np.nan), "stem.conv.weight"),
    ("inf bias", _set("head.bias", 3, np.inf), "head.bias"),
    ("huge weight", _set("conv3.weight", (0, 0, 0, 0), 1e35), "conv3.weight"),
    ("folded scale overflowing", lambda a: [_set("conv1.bn.var", 0, 0.0)(a),
                                            _set("conv1.bn.gamma", 0, 1e29)(a)], "conv1.bn"),
    ("float64", lambda a: ("head.bias", a["head.bias"].astype(np.float64)), "head.bias"),
    ("big-endian", lambda a: ("head.bias", a["head.bias"].astype(">f4")), "head.bias"),
    ("int32", lambda a: ("head.bias", a["head.bias"].astype(np.int32)), "head.bias"),
    ("wrong shape", lambda a: ("conv3.weight", np.zeros((32, 16, 1, 1), np.float32)),
     "conv3.weight"),
    ("0-d", lambda a: ("head.bias", np.float32(1)), "head.bias"),
    ("missing", lambda a: ("conv3.weight", None), "conv3.weight"),
    ("extra", lambda a: ("conv99.weight", np.zeros(2, np.float32)), "conv99.weight"),
]


@pytest.mark.parametrize("row, make, names", ARRAYS, ids=[r[0] for r in ARRAYS])
def test_bad_array(base, tmp_path, row, make, names):
    folder, _ = base
    src = os.path.join(folder, "w.npz")
    _, arrays = load_weights(src)
    edits = make(arrays)
    w = src
    for name, array in edits if isinstance(edits, list) else [edits]:
        w = with_array(w, tmp_path / "bad.npz", name, array)
    with pytest.raises(WeightsError, match="bad.npz") as e:
        load_weights(w)
    assert names in str(e.value)
    before = snapshot(tmp_path)
    r = xnorcdl(["summary", "--weights", "bad.npz"], tmp_path)
    assert_refused(r, "bad.npz", names)
    assert snapshot(tmp_path) == before


def test_object_array_is_never_unpickled(base, tmp_path):
    import io
    folder, _ = base
    members = npz_members(os.path.join(folder, "w.npz"))
    import pickle
    buf = io.BytesIO()  # an object-dtype .npy: the header, then a pickle payload
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    buf.write(pickle.dumps([{"a": 1}]))
    members["head.bias.npy"] = buf.getvalue()
    write_zip(tmp_path / "bad.npz", list(members.items()))
    with pytest.raises(WeightsError, match="pickle"):
        load_weights(str(tmp_path / "bad.npz"))


def test_fortran_order_arrays_load(base, tmp_path):
    """A valid file may store an array in Fortran order: same values."""
    folder, _ = base
    src = os.path.join(folder, "w.npz")
    _, arrays = load_weights(src)
    w = with_array(src, tmp_path / "f.npz", "conv3.weight", np.asfortranarray(arrays["conv3.weight"]))
    _, got = load_weights(w)
    np.testing.assert_array_equal(got["conv3.weight"], arrays["conv3.weight"])
    assert got["conv3.weight"].flags.c_contiguous


def _dup(name):
    def make(members, path):
        write_zip(path, list(members.items()) + [(name, members[name])])
    return make


def _patched(member, **kw):
    def make(members, path):
        write_zip(path, list(members.items()))
        patch_zip(str(path), member, **kw)
    return make


def _members(edit):
    def make(members, path):
        write_zip(path, edit(list(members.items())))
    return make


def _bzip2(members, path):
    items = list(members.items())
    with zipfile.ZipFile(path, "w") as z:
        for name, data in items:
            z.writestr(name, data, compress_type=zipfile.ZIP_BZIP2 if name.startswith("head")
                       else zipfile.ZIP_STORED)


def _bad_crc(members, path):
    write_zip(path, list(members.items()))
    data = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("head.weight.npy")
    data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF  # inside the array data
    with open(path, "wb") as f:
        f.write(bytes(data))


def _cut(members, path):
    write_zip(path, list(members.items()))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) * 2 // 3])


#: (row id, write(members, path), what the error names)
ZIPS = [
    ("duplicate meta.json", _dup(META_KEY + ".npy"), "appears twice"),
    ("duplicate array", _dup("head.bias.npy"), "appears twice"),
    ("encrypted flag", _patched("head.bias.npy", flags=0x1), "encrypted"),
    ("bzip2 member", _bzip2, "compression method 12"),
    ("unknown method", _patched("head.bias.npy", method=99), "compression method 99"),
    ("declared-size bomb", _patched("conv3.weight.npy", file_size=0xFFFFFFF0), "declares"),
    ("declared size off by one", _patched("head.bias.npy", file_size=167), "head.bias"),
    ("member in a folder", _members(lambda m: m + [("sub/x.npy", npy(np.zeros(1)))]),
     "sub/x.npy"),
    ("member climbing out", _members(lambda m: m + [("../x.npy", npy(np.zeros(1)))]),
     "../x.npy"),
    ("member not .npy", _members(lambda m: m + [("notes.txt", b"hi")]), "notes.txt"),
    ("no meta.json", _members(lambda m: [x for x in m if x[0] != META_KEY + ".npy"]),
     "meta.json"),
    ("damaged data", _bad_crc, "head.weight"),
    ("truncated archive", _cut, "bad.npz"),
    ("not .npy bytes", _members(lambda m: [(n, b"garbage" if n == "head.bias.npy" else d)
                                           for n, d in m]), "head.bias"),
]


@pytest.mark.parametrize("row, make, names", ZIPS, ids=[r[0] for r in ZIPS])
def test_bad_zip_structure(base, tmp_path, row, make, names):
    folder, _ = base
    members = npz_members(os.path.join(folder, "w.npz"))
    make(members, tmp_path / "bad.npz")
    with pytest.raises(WeightsError, match="bad.npz") as e:
        load_weights(str(tmp_path / "bad.npz"))
    assert names in str(e.value)
    before = snapshot(tmp_path)
    r = xnorcdl(["summary", "--weights", "bad.npz"], tmp_path)
    assert_refused(r, "bad.npz", names)
    assert snapshot(tmp_path) == before


def test_too_many_members(tmp_path):
    from xnorcdl.format import MAX_MEMBERS
    write_zip(tmp_path / "bad.npz", [(f"a{i}.npy", b"") for i in range(MAX_MEMBERS + 1)])
    with pytest.raises(WeightsError, match="members, more than"):
        load_weights(str(tmp_path / "bad.npz"))


# ----------------------------------------------------------------------------- artifacts

def _meta_edit(key, value):
    def edit(meta):
        meta[key] = value
        return meta
    return edit


def _outcome_edit(field, value):
    def edit(meta):
        meta["energy_outcomes"][0][field] = value
        return meta
    return edit


ARTIFACTS = [
    ("edge", "format of the other half", _meta_edit("format", "xnorcdl-cloud"), "other half"),
    ("edge", "version true", _meta_edit("version", True), "version"),
    ("edge", "model_id short", _meta_edit("model_id", "ab"), "model_id"),
    ("edge", "edge_blocks true", _meta_edit("edge_blocks", True), "edge_blocks"),
    ("edge", "spec edge_bits true", lambda m: dict(m, spec=dict(m["spec"], edge_bits=True)),
     "edge_bits"),
    ("edge", "energy_outcomes missing", lambda m: {k: v for k, v in m.items()
                                                  if k != "energy_outcomes"}, "energy_outcomes"),
    ("edge", "outcome without pJ", _outcome_edit("pJ_per_sample", None), "pJ_per_sample"),
    ("edge", "outcome NaN pJ", _outcome_edit("pJ_per_sample", {
        "edge": float("nan"), "cloud": 0, "compute": 0, "memory": 0, "total": 0}), "NaN"),
    ("edge", "outcome negative pJ", _outcome_edit("pJ_per_sample", {
        "edge": -1, "cloud": 0, "compute": 0, "memory": 0, "total": 0}), "pJ_per_sample"),
    ("edge", "outcome bytes negative", _outcome_edit("comm_bytes", -1), "comm_bytes"),
    ("edge", "MAC counts a list", _outcome_edit("macs_valid_by_bits", [1]), "macs_valid"),
    ("edge", "energy_table missing", lambda m: {k: v for k, v in m.items()
                                               if k != "energy_table"}, "energy_table"),
    ("edge", "baselines a number", _meta_edit("baselines_pJ_per_sample", 3), "baselines"),
    ("cloud", "format of the other half", _meta_edit("format", "xnorcdl-edge"), "other half"),
    ("cloud", "spec not an object", _meta_edit("spec", [1]), "spec"),
]


@pytest.mark.parametrize("side, row, edit, names", ARTIFACTS,
                         ids=[f"{a[0]}-{a[1]}" for a in ARTIFACTS])
def test_bad_artifact(base, tmp_path, side, row, edit, names):
    from xnorcdl.split import load_cloud, load_edge
    folder, _ = base
    src = os.path.join(folder, "d", f"{side}.npz")
    meta = json.loads(meta_bytes(src))
    raw = json.dumps(edit(meta)).encode()  # a NaN is written as NaN: refused as a literal
    path = with_meta(src, tmp_path / "bad.npz", raw)
    with pytest.raises(ArtifactError, match="bad.npz") as e:
        (load_edge if side == "edge" else load_cloud)(path)
    assert names in str(e.value)
    argv = (["edge", "--weights", "bad.npz", "--images", "i.bin", "--cloud", "http://127.0.0.1:9"]
            if side == "edge" else ["cloud", "--weights", "bad.npz", "--port", "0"])
    before = snapshot(tmp_path)
    r = xnorcdl(argv, tmp_path)
    assert_refused(r, "bad.npz")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("side", ["edge", "cloud"])
def test_artifact_zip_rules(base, tmp_path, side):
    from xnorcdl.split import load_cloud, load_edge
    folder, _ = base
    members = npz_members(os.path.join(folder, "d", f"{side}.npz"))
    for make, says in ((_dup(META_KEY + ".npy"), "appears twice"),
                       (_patched(META_KEY + ".npy", flags=0x1), "encrypted"),
                       (_patched(META_KEY + ".npy", file_size=0xFFFFFFF0), "declares")):
        make(members, tmp_path / "bad.npz")
        with pytest.raises(ArtifactError, match=says):
            (load_edge if side == "edge" else load_cloud)(str(tmp_path / "bad.npz"))


def test_errors_are_the_projects(base):
    assert issubclass(WeightsError, XnorcdlError) and issubclass(ArtifactError, XnorcdlError)
