"""A checked reader of ``.npz`` archives (weights files, edge and cloud artifacts).

The whole file is read into memory first (:func:`xnorcdl.files.read_bytes`: a regular file,
within a size limit). Then, before any array is allocated, the zip central directory is
checked: at most ``max_members`` members, every name a ``NAME.npy`` of letters, digits, ``_``,
``.`` and ``-``, no name twice, no encrypted member, only the stored and deflate compression
methods, and declared uncompressed sizes within ``max_total``. An array is read only once its
``.npy`` header has been checked against the dtype and shape the caller expects, and its
member's declared size against what that header implies, so memory stays bounded by what the
caller expects. Every problem raises the caller's error class naming the file and the member;
nothing else escapes (no ``zipfile.BadZipFile``, ``zlib.error``, ``EOFError``...).
"""
from __future__ import annotations

import io
import re
import struct
import tokenize
import zipfile
import zlib
from typing import Dict, Optional, Sequence, Tuple, Type

import numpy as np

from .errors import XnorcdlError
from .files import read_bytes

ALLOWED_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
MEMBER_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}\.npy")
#: largest central directory read (bytes): 20000 members of 200-byte names take about 5 MB
MAX_DIRECTORY = 16 << 20
#: what a damaged archive may raise from the zip, zlib and npy layers
DAMAGED = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, ValueError,
           struct.error, OSError, NotImplementedError, RuntimeError, UnicodeDecodeError,
           OverflowError, IndexError, KeyError, SyntaxError, TypeError,
           tokenize.TokenError)   # NumPy tokenizes a damaged .npy header before parsing it


class Npz:
    """The checked members of an ``.npz`` file: ``names`` (without ``.npy``), :meth:`read`."""

    def __init__(self, path, error: Type[XnorcdlError], limit: int, max_members: int,
                 max_total: int, what: str = ".npz archive"):
        self.path, self.error, self.what = str(path), error, what
        data = read_bytes(path, limit, error, what).tobytes()
        if data[:4] != b"PK\x03\x04":
            self._fail("not a readable .npz archive (no zip signature)")
        self._directory_size(data, max_members)
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
            infos = self.zip.infolist()
        except DAMAGED as exc:
            self._fail(f"not a readable .npz archive ({type(exc).__name__}: {exc})")
        if len(infos) > max_members:
            self._fail(f"{len(infos)} members, more than the {max_members} a {what} may hold")
        self.members: Dict[str, zipfile.ZipInfo] = {}
        total = 0
        for info in infos:
            name = info.filename
            if not MEMBER_NAME.fullmatch(name):
                self._fail(f"member {name!r}: expected NAME.npy (letters, digits, _ . -)")
            key = name[:-4]
            if key in self.members:
                self._fail(f"member {name!r} appears twice (a zip may hide one copy behind the "
                           "other); refusing the archive")
            if info.flag_bits & 0x1:
                self._fail(f"member {name!r} is encrypted; expected plain arrays")
            if info.compress_type not in ALLOWED_METHODS:
                self._fail(f"member {name!r} uses compression method {info.compress_type}; "
                           f"expected stored (0) or deflate (8)")
            if info.file_size > max_total or info.compress_size > len(data):
                self._fail(f"member {name!r} declares {info.file_size} bytes ({info.compress_size}"
                           f" compressed), more than the {max_total} a {what} may hold")
            total += info.file_size
            self.members[key] = info
        if total > max_total:
            self._fail(f"members declare {total} bytes in all, more than the {max_total} a "
                       f"{what} may hold")

    def _directory_size(self, data: bytes, max_members: int) -> None:
        """Refuse a central directory larger than :data:`MAX_DIRECTORY` bytes or with more
        than ``max_members`` entries before ``zipfile`` builds one object per entry (the
        count in the end record is not what zipfile reads, so the entries are counted)."""
        end = data.rfind(b"PK\x05\x06", max(0, len(data) - (1 << 16) - 22))
        if end < 0 or end + 22 > len(data):
            return  # no end record: zipfile refuses the archive
        size, = struct.unpack_from("<I", data, end + 12)
        if size == 0xFFFFFFFF:  # zip64: the whole file bounds the directory
            start = 0
        elif size > MAX_DIRECTORY:
            self._fail(f"central directory of {size} bytes, more than {MAX_DIRECTORY}")
        else:
            start = max(0, end - size)
        entries = data.count(b"PK\x01\x02", start, end)
        if entries > max_members:
            self._fail(f"{entries} members, more than the {max_members} a {self.what} may hold")

    def _fail(self, message: str, key: Optional[str] = None):
        where = f"array '{key}' " if key is not None else ""
        raise self.error(f"{self.path}: {where}{message}", where=self.path)

    @property
    def names(self) -> Sequence[str]:
        return list(self.members)

    def header(self, key: str) -> Tuple[np.dtype, Tuple[int, ...], bool, int]:
        """(dtype, shape, fortran order, header length) of member ``key``'s ``.npy`` header."""
        try:
            with self.zip.open(self.members[key]) as fp:
                return self._header(key, fp)
        except XnorcdlError:
            raise
        except DAMAGED as exc:
            self._fail(f"is damaged ({type(exc).__name__}: {exc})", key)

    def _header(self, key: str, fp):
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            self._fail(f"has .npy format version {version[0]}.{version[1]}; expected 1.0 or 2.0",
                       key)
        if dtype.hasobject:
            self._fail("holds Python objects, which need pickle; only numeric arrays are "
                       "allowed", key)
        return dtype, tuple(int(d) for d in shape), bool(fortran), fp.tell()

    def read(self, key: str, dtype, shape: Optional[Tuple[int, ...]] = None,
             max_elements: Optional[int] = None, ndim: Optional[int] = None) -> np.ndarray:
        """Member ``key`` as a writable C-contiguous array, after checking that its dtype is
        exactly ``dtype``, its shape ``shape`` (or, with ``shape`` None, that it has ``ndim``
        dimensions and at most ``max_elements`` elements) and that the member's declared size
        matches its header."""
        if key not in self.members:
            self._fail("is missing", key)
        dtype = np.dtype(dtype)
        info = self.members[key]
        try:
            with self.zip.open(info) as fp:
                got, got_shape, fortran, head = self._header(key, fp)
                if got != dtype:
                    self._fail(f"has dtype {got}, expected {dtype}", key)
                if shape is not None and got_shape != tuple(shape):
                    self._fail(f"has shape {list(got_shape)}, expected {list(shape)}", key)
                if shape is None and ndim is not None and len(got_shape) != ndim:
                    self._fail(f"has shape {list(got_shape)}, expected {ndim} dimension(s)", key)
                count = int(np.prod(got_shape, dtype=np.int64)) if got_shape else 1
                if max_elements is not None and count > max_elements:
                    self._fail(f"holds {count} elements, more than the {max_elements} allowed",
                               key)
                if info.file_size != head + count * dtype.itemsize:
                    self._fail(f"is a member that declares {info.file_size} bytes where its header "
                               f"implies {head + count * dtype.itemsize}", key)
                flat = np.empty(count, dtype)
                view = memoryview(flat).cast("B")
                done = 0
                while done < len(view):
                    k = fp.readinto(view[done:])
                    if not k:
                        self._fail(f"is truncated after {done} of {len(view)} data bytes", key)
                    done += k
                fp.read(1)  # reach the end of the member: its CRC is checked there
        except XnorcdlError:
            raise
        except DAMAGED as exc:
            self._fail(f"is damaged ({type(exc).__name__}: {exc})", key)
        if fortran:
            return np.ascontiguousarray(flat.reshape(got_shape[::-1]).T)
        return flat.reshape(got_shape)
