"""Bad input files, for every input option of every command: special files (a FIFO, a device,
a folder), files over their size limit, truncated or empty files, missing files, image files
that shrink or grow while they are read, and energy tables with bad rows. Each is refused with
status 2, one ``error:`` line naming the file, no traceback, no hang (a timeout fails the
test), and every file in the folder unchanged."""
import json
import os
import sys

import pytest

from hostile import (assert_refused, copy_files, env, pristine, snapshot, table_doc, xnorcdl,
                     TIMEOUT)
from xnorcdl import energy, files, format as fmt, records
from xnorcdl.cloud import MAX_TOKEN_BYTES

#: (command line with SLOT where the bad file goes, the kind of file the slot takes)
SLOTS = {
    "infer --weights": (["infer", "--weights", "SLOT", "--images", "i.bin"], "weights"),
    "infer --images": (["infer", "--weights", "w.npz", "--images", "SLOT", "--backend",
                        "reference"], "images"),
    "infer --energy": (["infer", "--weights", "w.npz", "--images", "i.bin", "--energy", "SLOT"],
                       "table"),
    "summary --weights": (["summary", "--weights", "SLOT"], "weights"),
    "summary --energy": (["summary", "--weights", "w.npz", "--energy", "SLOT"], "table"),
    "tradeoff --weights": (["tradeoff", "--weights", "SLOT", "--images", "i.bin", "--calib",
                            "i.bin"], "weights"),
    "tradeoff --images": (["tradeoff", "--weights", "w.npz", "--images", "SLOT", "--calib",
                           "i.bin", "--backend", "reference"], "images"),
    "tradeoff --calib": (["tradeoff", "--weights", "w.npz", "--images", "i.bin", "--calib",
                          "SLOT", "--backend", "reference"], "images"),
    "tradeoff --energy": (["tradeoff", "--weights", "w.npz", "--images", "i.bin", "--calib",
                           "i.bin", "--energy", "SLOT"], "table"),
    "compare --weights": (["compare", "--weights", "w.npz", "SLOT", "--images", "i.bin"],
                          "weights"),
    "compare --images": (["compare", "--weights", "w.npz", "w2.npz", "--images", "SLOT",
                          "--backend", "reference"], "images"),
    "compare --calib": (["compare", "--weights", "w.npz", "w2.npz", "--images", "i.bin",
                         "--calib", "SLOT", "--backend", "reference"], "images"),
    "explore --baseline": (["explore", "--weights-dir", "grid", "--images", "i.bin", "--rules",
                            "stored", "--out", "res", "--baseline", "SLOT"], "weights"),
    "explore --images": (["explore", "--weights-dir", "grid", "--images", "SLOT", "--rules",
                          "stored", "--out", "res", "--baseline", "", "--backend",
                          "reference"], "images"),
    "explore --energy": (["explore", "--weights-dir", "grid", "--images", "i.bin", "--rules",
                          "stored", "--out", "res", "--baseline", "", "--energy", "SLOT"],
                         "table"),
    "split --weights": (["split", "--weights", "SLOT", "--out", "parts"], "weights"),
    "edge --weights": (["edge", "--weights", "SLOT", "--images", "i.bin", "--cloud",
                        "http://127.0.0.1:9"], "weights"),
    "edge --images": (["edge", "--weights", "d/edge.npz", "--images", "SLOT", "--cloud",
                       "http://127.0.0.1:9", "--backend", "reference"], "images"),
    "edge --token-file": (["edge", "--weights", "d/edge.npz", "--images", "i.bin", "--cloud",
                           "http://127.0.0.1:9", "--backend", "reference", "--token-file",
                           "SLOT"], "token"),
    "cloud --weights": (["cloud", "--weights", "SLOT", "--port", "0"], "weights"),
    "cloud --token-file": (["cloud", "--weights", "d/cloud.npz", "--port", "0",
                            "--token-file", "SLOT"], "token"),
    "data --from": (["data", "cifar10", "--dest", "cache", "--from", "SLOT"], "source"),
}
LIMITS = {"weights": fmt.MAX_FILE_BYTES, "images": records.MAX_BYTES,
          "table": energy.MAX_TABLE_BYTES, "token": MAX_TOKEN_BYTES}


def _fifo(tmp, kind):
    os.mkfifo(tmp / "pipe")
    return "pipe", "FIFO"


def _oversize(tmp, kind):
    with open(tmp / "big", "wb") as f:   # sparse: no disk space used
        f.truncate(LIMITS[kind] + 1)
    return "big", "more than"


def _truncated(tmp, kind):
    src = {"weights": "w.npz", "images": "i.bin", "table": "table.json", "token": "token.txt",
           "source": "w.npz"}[kind]
    data = open(tmp / src, "rb").read()
    cut = len(data) // 2 + 7 if kind != "images" else len(data) - 10
    with open(tmp / "cut", "wb") as f:
        f.write(data[:cut])
    says = {"weights": "not a readable", "images": "not a multiple", "table": "not valid",
            "token": "", "source": "not a tar archive"}[kind]
    return "cut", says


def _empty(tmp, kind):
    open(tmp / "empty", "wb").close()
    return "empty", {"images": "empty", "table": "not valid", "token": "expected one token",
                     "weights": "not a readable", "source": "not a tar archive"}[kind]


#: (row id, make(tmp, kind) -> (path, what the error says), kinds it applies to)
KINDS = [
    ("fifo", _fifo, None),
    ("device", lambda tmp, kind: ("/dev/zero", "character device"), None),
    ("folder", lambda tmp, kind: ("grid", "folder"), ("weights", "images", "table", "token")),
    ("oversize", _oversize, ("weights", "images", "table", "token")),
    ("truncated", _truncated, ("weights", "images", "table", "source")),
    ("empty", _empty, None),
    ("missing", lambda tmp, kind: ("absent.bin", "no such file"), None),
]
#: every kind for one slot of each kind of file (the loaders are shared); a FIFO and a device,
#: the files that could hang a reader, for every slot of every command
FULL = ("summary --weights", "infer --images", "summary --energy", "cloud --token-file",
        "data --from")
CASES = [(slot, row, make) for slot, (_, kind) in SLOTS.items()
         for row, make, kinds in KINDS if (kinds is None or kind in kinds)
         and (slot in FULL or row in ("fifo", "device"))]


@pytest.fixture
def work(pristine, tmp_path):
    copy_files(pristine, tmp_path)
    return tmp_path


@pytest.mark.parametrize("slot, row, make", CASES, ids=[f"{s}-{r}" for s, r, _ in CASES])
def test_bad_input_file(work, slot, row, make):
    argv, kind = SLOTS[slot]
    path, says = make(work, kind)
    argv = [path if a == "SLOT" else a for a in argv]
    before = snapshot(work)
    r = xnorcdl(argv, work)
    assert_refused(r, path, says)
    assert snapshot(work) == before


# ----------------------------------------------------------------------------- files that change

CHANGING = r"""
import os, sys
from xnorcdl import cli, files
path, how, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
real = files._readinto

def changing(fd, view):
    if os.fstat(fd).st_ino != os.stat(path).st_ino:  # another input
        return real(fd, view)
    files._readinto = real
    if how == "shrink":
        os.truncate(path, os.path.getsize(path) // 3)
    else:
        with open(path, "ab") as f:
            f.write(b"x" * 3073)
    return real(fd, view)

files._readinto = changing
sys.exit(cli.main(argv))
"""


@pytest.mark.parametrize("how, says", [("shrink", "shrank"), ("grow", "changed size")])
@pytest.mark.parametrize("slot", ["infer --images", "infer --weights", "summary --energy"])
def test_file_changing_while_read(work, slot, how, says):
    """Another program truncates (or extends) the file between the size check and the read:
    a clear error naming the file (inputs are read, never memory-mapped, so no SIGBUS)."""
    import subprocess
    argv, _ = SLOTS[slot]
    target = {"infer --images": "i.bin", "infer --weights": "w.npz",
              "summary --energy": "table.json"}[slot]
    argv = [target if a == "SLOT" else a for a in argv]
    r = subprocess.run([sys.executable, "-c", CHANGING, target, how, *argv], cwd=str(work),
                       env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert_refused(r, target, says)


# ----------------------------------------------------------------------------- image files

def _records(tmp, body: bytes, name="x.bin"):
    with open(tmp / name, "wb") as f:
        f.write(body)
    return name


IMAGES = [
    ("one byte short", lambda d: d[:-1], "not a multiple"),
    ("one byte over", lambda d: d + b"\0", "not a multiple"),
    ("label out of range", lambda d: b"\x0b" + d[1:], "label is 11"),
]


@pytest.mark.parametrize("row, mutate, says", IMAGES, ids=[r[0] for r in IMAGES])
@pytest.mark.parametrize("command", ["infer", "tradeoff", "edge"])
def test_bad_image_records(work, command, row, mutate, says):
    data = open(work / "i.bin", "rb").read()
    name = _records(work, mutate(data))
    argv = {"infer": ["infer", "--weights", "w.npz", "--images", name],
            "tradeoff": ["tradeoff", "--weights", "w.npz", "--images", "i.bin", "--calib", name],
            "edge": ["edge", "--weights", "d/edge.npz", "--images", name, "--cloud",
                     "http://127.0.0.1:9"]}[command]
    before = snapshot(work)
    r = xnorcdl(argv + ["--backend", "reference"], work)
    assert_refused(r, name, says)
    assert snapshot(work) == before


def test_images_with_labels_the_model_lacks(work):
    """cifar100 records read as such hold fine labels up to 99; a 10-class model refuses."""
    data = bytearray(open(work / "i.bin", "rb").read())
    body = b"".join(b"\x00" + bytes([50]) + data[i * 3073 + 1:(i + 1) * 3073]
                    for i in range(len(data) // 3073))
    name = _records(work, body)
    r = xnorcdl(["infer", "--weights", "w.npz", "--images", name, "--format", "cifar100",
                 "--backend", "reference"], work)
    assert_refused(r, name, "label 50")


# ----------------------------------------------------------------------------- energy tables

def _row(name, value):
    def edit(doc):
        doc["operations"][name]["energy"] = value
    return edit


TABLES = [
    ("zero row", _row("mac1", 0), "operations.mac1.energy"),
    ("negative row", _row("mem_bit", -2.5), "operations.mem_bit.energy"),
    ("huge row", _row("mac32", 1e300), "operations.mac32.energy"),
    ("bool row", _row("add32", True), "operations.add32.energy"),
    ("string row", _row("add32", "0.9"), "operations.add32.energy"),
    ("null row", _row("add32", None), "operations.add32.energy"),
    ("version true", lambda d: d.update(version=True), "version"),
    ("version 1.0", lambda d: d.update(version=1.0), "version"),
    ("operations a list", lambda d: d.update(operations=[1, 2]), "operations"),
    ("rules.mac_k a list", lambda d: d["rules"].update(mac_k=[]), "rules.mac_k"),
    ("description a number", lambda d: d.update(description=3), "description"),
]
RAW_TABLES = [
    ("NaN literal", lambda t: t.replace('"energy": 0.2', '"energy": NaN'), "NaN"),
    ("Infinity literal", lambda t: t.replace('"energy": 0.2', '"energy": Infinity'), "Infinity"),
    ("overflowing number", lambda t: t.replace('"energy": 0.2', '"energy": 1e999'),
     "operations.mac1.energy"),
    ("duplicate key", lambda t: t.replace('"version": 1,', '"version": 1, "version": 1,'),
     "twice"),
    ("nested bomb", lambda t: t.replace('"version": 1,', '"version": 1, "description": '
                                        + "[" * 5000 + "]" * 5000 + ","), "levels deep"),
    ("not UTF-8", lambda t: t.replace("Table I", "Table \udcff"), "UTF-8"),
]


def _table_cases():
    out = []
    for row, edit, key in TABLES:
        def make(tmp, edit=edit):
            doc = table_doc()
            edit(doc)
            (tmp / "t.json").write_text(json.dumps(doc))
        out.append((row, make, key))
    for row, edit, key in RAW_TABLES:
        def make(tmp, edit=edit):
            text = json.dumps(table_doc())
            (tmp / "t.json").write_bytes(edit(text).encode("utf-8", "surrogateescape"))
        out.append((row, make, key))
    return out


TABLE_COMMANDS = {
    "summary": ["summary", "--weights", "w.npz", "--energy", "t.json"],
    "infer": ["infer", "--weights", "w.npz", "--images", "i.bin", "--backend", "reference",
              "--energy", "t.json"],
    "tradeoff": ["tradeoff", "--weights", "w.npz", "--images", "i.bin", "--calib", "i.bin",
                 "--backend", "reference", "--energy", "t.json"],
    "explore": ["explore", "--weights-dir", "grid", "--images", "i.bin", "--rules", "stored",
                "--out", "res", "--baseline", "", "--energy", "t.json"]}
#: every row through summary; the zero row (it used to crash tradeoff) through every command
TABLE_CASES = [(c, *row) for row in _table_cases() for c in TABLE_COMMANDS
               if c == "summary" or row[0] == "zero row"]


@pytest.mark.parametrize("command, row, make, key", TABLE_CASES,
                         ids=[f"{c}-{r}" for c, r, _, _ in TABLE_CASES])
def test_bad_energy_table(work, command, row, make, key):
    make(work)
    argv = TABLE_COMMANDS[command]
    before = snapshot(work)
    r = xnorcdl(argv, work)
    assert_refused(r, "t.json", key)
    assert snapshot(work) == before


def test_loaders_refuse_special_files_in_process(tmp_path):
    """The same rules through the Python API (no command line)."""
    import xnorcdl
    os.mkfifo(tmp_path / "p")
    for load in (xnorcdl.load, lambda p: xnorcdl.read_records(p), energy.load_energy_table):
        for p in (str(tmp_path / "p"), "/dev/zero", str(tmp_path)):
            with pytest.raises(xnorcdl.XnorcdlError, match="expected a regular"):
                load(p)
    with pytest.raises(xnorcdl.DataError, match="expected a regular"):
        files.read_bytes("/dev/zero", 10, xnorcdl.DataError)
