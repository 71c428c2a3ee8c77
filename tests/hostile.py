"""Helpers of the bad-input tests: a small valid set of files (weights, images, energy table,
split artifacts), commands run as subprocesses with a timeout, snapshots of a folder's files
(sha256 of every regular file, the target of every link, the kind of everything else) and
edits of zip archives below what ``zipfile`` offers (method, flags, declared sizes)."""
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest

from conftest import make_spec, random_images
from xnorcdl.energy import DEFAULT_TABLE
from xnorcdl.format import META_KEY, random_weights, save_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: seconds a command may take before the test calls it a hang
TIMEOUT = 120
#: files larger than this are the sparse files of the size-limit tests: compared by size and
#: modification time, not hashed
BIG = 64 << 20


def env():
    """The environment of a command: this checkout first on the path, no cache fetching."""
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def xnorcdl(args, cwd, timeout=TIMEOUT, **kw):
    """``python -m xnorcdl ARGS`` in ``cwd``; a hang fails the test (TimeoutExpired)."""
    return subprocess.run([sys.executable, "-m", "xnorcdl", *args], cwd=str(cwd), env=env(),
                          capture_output=True, text=True, timeout=timeout, **kw)


def snapshot(folder):
    """{relative path: sha256 | ("link", target) | kind} of everything under ``folder``."""
    out = {}
    for base, dirs, files in os.walk(str(folder)):
        for name in dirs + files:
            p = os.path.join(base, name)
            rel = os.path.relpath(p, str(folder))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode) and st.st_size > BIG:
                out[rel] = ("big", st.st_size, st.st_mtime_ns)  # a sparse file of the tests
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[rel] = stat.S_IFMT(st.st_mode)
    return out


def assert_refused(r, *names, status=2):
    """Exit ``status``, no traceback, one ``error:`` line naming every one of ``names``."""
    assert r.returncode == status, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in names:
        assert str(n) in lines[0], (n, lines[0])


# ----------------------------------------------------------------------------- valid files

SPEC = dict(edge_convs=4, exits=[(4, 0.5)])
N_IMAGES = 20


def write_records(path, n=N_IMAGES, seed=1):
    images = random_images(n, seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rec = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1)
    with open(path, "wb") as f:
        f.write(rec.tobytes())
    return str(path)


def make_files(folder):
    """The valid files every table row starts from, in ``folder``: w.npz, w2.npz, i.bin,
    table.json, token.txt, grid/w.npz, d/edge.npz and d/cloud.npz."""
    from xnorcdl.split import split
    folder = str(folder)
    spec = make_spec(**SPEC)
    save_weights(os.path.join(folder, "w.npz"), spec, random_weights(spec, 0))
    save_weights(os.path.join(folder, "w2.npz"), spec, random_weights(spec, 1))
    write_records(os.path.join(folder, "i.bin"))
    shutil.copy(DEFAULT_TABLE, os.path.join(folder, "table.json"))
    with open(os.path.join(folder, "token.txt"), "w") as f:
        f.write("s3cret\n")
    os.mkdir(os.path.join(folder, "grid"))
    shutil.copy(os.path.join(folder, "w.npz"), os.path.join(folder, "grid", "w.npz"))
    split(os.path.join(folder, "w.npz"), os.path.join(folder, "d"))
    return folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One folder of valid files per test module (make_files); tests work on copies."""
    return make_files(tmp_path_factory.mktemp("pristine"))


def copy_files(src, dst):
    for name in os.listdir(src):
        s, d = os.path.join(src, name), os.path.join(str(dst), name)
        (shutil.copytree if os.path.isdir(s) else shutil.copy2)(s, d)


def table_doc():
    with open(DEFAULT_TABLE) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- npz edits

def npz_members(path):
    """{member name: bytes} of an archive, in order."""
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=False)
    return buf.getvalue()


def write_zip(path, members, method=zipfile.ZIP_STORED):
    """An archive of ``members`` (a list of (name, bytes); a name may repeat)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about a duplicate name
        with zipfile.ZipFile(path, "w", method) as z:
            for name, data in members:
                z.writestr(name, data)


def meta_bytes(path):
    with np.load(path, allow_pickle=False) as z:
        return z[META_KEY].tobytes()


def with_meta(src, dst, raw: bytes):
    """A copy of weights file ``src`` whose meta.json holds ``raw``."""
    members = npz_members(src)
    members[META_KEY + ".npy"] = npy(np.frombuffer(raw, np.uint8))
    write_zip(dst, list(members.items()))
    return str(dst)


def with_array(src, dst, name, array=None):
    """A copy of ``src`` with array ``name`` replaced (or removed when ``array`` is None)."""
    members = npz_members(src)
    if array is None:
        members.pop(name + ".npy")
    else:
        members[name + ".npy"] = npy(array)
    write_zip(dst, list(members.items()))
    return str(dst)


def patch_zip(path, member, method=None, flags=None, file_size=None):
    """Edit ``member``'s compression method, flag bits or declared uncompressed size in both
    its local header and its central directory entry, in place."""
    data = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = z.getinfo(member)
        start = z.start_dir
    locs = [info.header_offset]
    pos = start
    while data[pos:pos + 4] == b"PK\x01\x02":
        nlen, elen, clen = struct.unpack_from("<HHH", data, pos + 28)
        if data[pos + 46:pos + 46 + nlen].decode() == member:
            cdir = pos
        pos += 46 + nlen + elen + clen
    for off, base in ((locs[0], 0), (cdir, 2)):  # a central entry has 2 more bytes up front
        if flags is not None:
            struct.pack_into("<H", data, off + 6 + base, flags)
        if method is not None:
            struct.pack_into("<H", data, off + 8 + base, method)
        if file_size is not None:
            struct.pack_into("<I", data, off + 22 + base, file_size)
    with open(path, "wb") as f:
        f.write(bytes(data))
