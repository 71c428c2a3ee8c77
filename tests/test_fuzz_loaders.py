"""Property-based fuzzing of every loader (hypothesis): random mutations of a valid weights
file (bytes, zip structure, description values and types, array dtypes, shapes and values),
of split artifacts, of image record files and of energy tables. A loader either succeeds
(and then what it returns is usable: the model builds, the table prices, the records have
their shape) or raises one of the project's errors; nothing else escapes, memory stays
bounded, and commands run in process on the mutated files end with status 0 or 2.

Examples per test are sized so that the file runs in well under a minute on one core."""
import io
import json
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from conftest import make_spec
from hostile import npy, npz_members, patch_zip, table_doc, write_zip
from xnorcdl import cli, energy, records
from xnorcdl.errors import XnorcdlError
from xnorcdl.format import META_KEY, load_weights, random_weights, save_weights
from xnorcdl.model import build_model

FAST = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
FEW = settings(FAST, max_examples=25)
#: the most a loader may allocate (bytes) for any mutation of the small files here
MEMORY_BOUND = 64 << 20


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A valid depth-8 weights file (two quantized convs, one exit), its members and meta."""
    folder = tmp_path_factory.mktemp("fuzz")
    spec = make_spec(edge_convs=2, edge_bits=2, exits=[(2, 0.5)])
    path = str(folder / "w.npz")
    save_weights(path, spec, random_weights(spec, 3))
    members = npz_members(path)
    meta = json.loads(np.load(io.BytesIO(members[META_KEY + ".npy"])).tobytes())
    return folder, open(path, "rb").read(), members, meta


def _load(path):
    """load_weights, then the model: only the project's errors may escape."""
    try:
        spec, arrays = load_weights(path)
    except XnorcdlError:
        return False
    build_model(spec, arrays)
    return True


def _structure(data: bytes):
    """Offsets where the zip and npy structure lives (headers, the central directory)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        spots = list(range(z.start_dir, len(data)))
        for info in z.infolist():
            spots += range(info.header_offset, info.header_offset + 30 + len(info.filename) + 128)
    return sorted(set(s for s in spots if s < len(data)))


# ----------------------------------------------------------------------------- weights bytes

@FAST
@given(st.data())
def test_weights_byte_mutations(small, tmp_path_factory, data):
    folder, raw, _, _ = small
    buf = bytearray(raw)
    spots = _structure(raw)
    for _ in range(data.draw(st.integers(1, 8))):
        where = data.draw(st.sampled_from(spots) if data.draw(st.booleans())
                          else st.integers(0, len(buf) - 1))
        buf[where] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        buf = buf[:data.draw(st.integers(0, len(buf)))]
    path = folder / "mut.npz"
    path.write_bytes(bytes(buf))
    _load(str(path))


def test_weights_header_that_does_not_tokenize(small, tmp_path_factory):
    """A ``.npy`` header whose dict cannot even be tokenized (``'fortran_order'{`` for
    ``'fortran_order':``, found by the byte mutations above): NumPy raises tokenize's
    TokenError, which must come out as the project's error naming the member."""
    folder, raw, _, _ = small
    at = raw.index(b"'fortran_order':", raw.index(b"conv1.weight")) + len(b"'fortran_order'")
    path = folder / "untokenizable.npz"
    path.write_bytes(raw[:at] + b"{" + raw[at + 1:])
    with pytest.raises(XnorcdlError, match="damaged"):
        load_weights(str(path))


# ----------------------------------------------------------------------------- zip structure

@FAST
@given(st.data())
def test_zip_structure_mutations(small, data):
    folder, _, members, _ = small
    items = list(members.items())
    op = data.draw(st.sampled_from(["drop", "duplicate", "rename", "patch", "reorder", "add"]))
    names = [n for n, _ in items]
    pick = data.draw(st.sampled_from(names))
    if op == "drop":
        items = [x for x in items if x[0] != pick]
    elif op == "duplicate":
        items.append((pick, members[pick]))
    elif op == "rename":
        new = data.draw(st.text(st.characters(blacklist_characters="\0"), max_size=12))
        items = [((new or "x") if n == pick else n, d) for n, d in items]
    elif op == "reorder":
        items = data.draw(st.permutations(items))
    elif op == "add":
        items.append((data.draw(st.from_regex(r"[a-z]{1,5}\.npy", fullmatch=True)),
                      data.draw(st.binary(max_size=200))))
    path = folder / "zip.npz"
    try:
        write_zip(path, items, data.draw(st.sampled_from([zipfile.ZIP_STORED,
                                                          zipfile.ZIP_DEFLATED])))
    except (ValueError, UnicodeEncodeError, IndexError):  # a name zipfile cannot write
        assume(False)
    if op == "patch":
        field = data.draw(st.sampled_from(["method", "flags", "file_size"]))
        value = data.draw(st.integers(0, 0xFFFF if field != "file_size" else 0xFFFFFFFF))
        patch_zip(str(path), pick, **{field: value})
    tracemalloc.start()
    try:
        _load(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND


# ----------------------------------------------------------------------------- the description

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)


def _paths(d, prefix=()):
    """Every path to a value in a decoded JSON document."""
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _paths(v, prefix + (i,))


def _replace(doc, path, value):
    if not path:
        return value
    d = doc
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    return doc


def _with_meta(folder, members, raw: bytes, name="meta.npz"):
    items = dict(members)
    items[META_KEY + ".npy"] = npy(np.frombuffer(raw, np.uint8))
    path = folder / name
    write_zip(path, list(items.items()))
    return str(path)


@FAST
@given(st.data())
def test_description_value_and_type_mutations(small, data):
    folder, _, members, meta = small
    doc = json.loads(json.dumps(meta))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(list(_paths(doc))))
        doc = _replace(doc, path, data.draw(JSON_VALUES))
    _load(_with_meta(folder, members, json.dumps(doc).encode()))


@FAST
@given(st.data())
def test_description_text_mutations(small, data):
    folder, _, members, meta = small
    text = bytearray(json.dumps(meta).encode())
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        i = data.draw(st.integers(0, len(text) - 1))
        b = data.draw(st.sampled_from(list(b'{}[]",:0123456789.eE-+ tfnNI\\\xff')))
        if op == "set":
            text[i] = b
        elif op == "insert":
            text[i:i] = bytes([b]) * data.draw(st.integers(1, 3000))
        else:
            del text[i]
    _load(_with_meta(folder, members, bytes(text)))


# ----------------------------------------------------------------------------- the arrays

DTYPES = ["<f2", "<f8", ">f4", "<i4", "|u1", "|i1", "|b1", "<c8", "<f4"]


@FAST
@given(st.data())
def test_array_dtype_shape_and_value_mutations(small, data):
    folder, _, members, _ = small
    names = [n for n in members if n != META_KEY + ".npy"]
    name = data.draw(st.sampled_from(names))
    a = np.load(io.BytesIO(members[name]))
    op = data.draw(st.sampled_from(["dtype", "shape", "value"]))
    if op == "dtype":
        a = a.astype(data.draw(st.sampled_from(DTYPES)))
    elif op == "shape":
        shape = tuple(data.draw(st.lists(st.integers(0, 40), max_size=4)))
        a = np.zeros(shape, data.draw(st.sampled_from(DTYPES)))
    else:
        a = a.copy()
        flat = a.reshape(-1)
        flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(
            st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 0.0, 1e30, 3e38, -3e38, 1e-45]))
    items = dict(members)
    items[name] = npy(a)
    path = folder / "arr.npz"
    write_zip(path, list(items.items()))
    if _load(str(path)):  # accepted: every value finite and in range
        _, arrays = load_weights(str(path))
        assert all(np.isfinite(v).all() for v in arrays.values())


# ----------------------------------------------------------------------------- artifacts

@pytest.fixture(scope="module")
def parts(small):
    from xnorcdl.split import split
    folder = small[0]
    rep = split(str(folder / "w.npz"), str(folder / "d"))
    return {"edge": open(rep["edge"], "rb").read(), "cloud": open(rep["cloud"], "rb").read()}


@FEW
@given(st.data())
def test_artifact_mutations(small, parts, data):
    from xnorcdl.split import load_cloud, load_edge
    side = data.draw(st.sampled_from(["edge", "cloud"]))
    raw = parts[side]
    folder = small[0]
    if data.draw(st.booleans()):  # the bytes
        buf = bytearray(raw)
        spots = _structure(raw)
        for _ in range(data.draw(st.integers(1, 6))):
            buf[data.draw(st.sampled_from(spots))] = data.draw(st.integers(0, 255))
        (folder / "part.npz").write_bytes(bytes(buf))
    else:  # the description
        members = npz_members(io.BytesIO(raw))
        doc = json.loads(np.load(io.BytesIO(members[META_KEY + ".npy"])).tobytes())
        path = data.draw(st.sampled_from(list(_paths(doc))))
        doc = _replace(doc, path, data.draw(JSON_VALUES))
        _with_meta(folder, members, json.dumps(doc).encode(), "part.npz")
    try:
        (load_edge if side == "edge" else load_cloud)(str(folder / "part.npz"))
    except XnorcdlError:
        pass


# ----------------------------------------------------------------------------- image files

@FAST
@given(body=st.binary(max_size=3 * 3074), fmt=st.sampled_from(list(records.RECORD_FORMATS)),
       limit=st.one_of(st.none(), st.integers(1, 5)))
def test_record_files(small, body, fmt, limit):
    path = small[0] / "rec.bin"
    path.write_bytes(body)
    try:
        images, labels = records.read_records(str(path), fmt, limit=limit)
    except XnorcdlError:
        return
    rs = records.RECORD_FORMATS[fmt].record_size
    n = len(body) // rs if limit is None else min(limit, len(body) // rs)
    assert images.shape == (n, 3, 32, 32) and images.dtype == np.uint8
    assert labels is None or (labels.shape == (n,) and labels.min(initial=0) >= 0)


# ----------------------------------------------------------------------------- energy tables

@FAST
@given(st.data())
def test_energy_table_mutations(small, data):
    doc = table_doc()
    if data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 3))):
            path = data.draw(st.sampled_from(list(_paths(doc))))
            doc = _replace(doc, path, data.draw(JSON_VALUES))
        raw = json.dumps(doc).encode()
    else:
        buf = bytearray(json.dumps(doc).encode())
        for _ in range(data.draw(st.integers(1, 5))):
            buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(
                st.sampled_from(list(b'{}[]",:0-.eNI\xff ')))
        raw = bytes(buf)
    path = small[0] / "table.json"
    path.write_bytes(raw)
    try:
        table = energy.load_energy_table(str(path))
    except XnorcdlError:
        return
    assert all(np.isfinite(v) and v > 0 for v in table.energy.values())
    assert table.mac(1) > 0 and table.mac(32) > 0


# ----------------------------------------------------------------------------- commands

def _main(argv, capsys):
    try:
        status = cli.main(argv)
    except SystemExit as exc:  # argparse's own exit
        status = exc.code
    err = capsys.readouterr().err
    assert status in (0, 2), (status, err)
    assert "Traceback" not in err
    return status


@FEW
@given(st.data())
def test_summary_on_mutated_weights(small, capsys, data):
    folder, raw, members, meta = small
    if data.draw(st.booleans()):
        doc = json.loads(json.dumps(meta))
        path = data.draw(st.sampled_from(list(_paths(doc))))
        w = _with_meta(folder, members, json.dumps(_replace(doc, path, data.draw(JSON_VALUES)))
                       .encode(), "cmd.npz")
    else:
        buf = bytearray(raw)
        spots = _structure(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            buf[data.draw(st.sampled_from(spots))] = data.draw(st.integers(0, 255))
        w = str(folder / "cmd.npz")
        with open(w, "wb") as f:
            f.write(bytes(buf))
    _main(["summary", "--weights", w], capsys)


@FEW
@given(body=st.binary(min_size=0, max_size=4 * 3073 + 5),
       labels=st.lists(st.integers(0, 255), min_size=4, max_size=4))
def test_infer_on_mutated_images(small, capsys, body, labels):
    folder = small[0]
    data = bytearray(body.ljust(4 * 3073, b"\x80")[:len(body) if len(body) % 3073 else None])
    for i, lab in enumerate(labels):
        if i * 3073 < len(data):
            data[i * 3073] = lab % 12  # mostly valid labels, sometimes out of range
    path = folder / "imgs.bin"
    path.write_bytes(bytes(data))
    status = _main(["infer", "--weights", str(folder / "w.npz"), "--images", str(path),
                    "--backend", "reference", "--no-progress"], capsys)
    assert status == 2 or (len(data) % 3073 == 0 and len(data) > 0)
