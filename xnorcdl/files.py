"""File helpers every reader and writer of the project shares.

Writing: :func:`atomic_write` writes through a temporary file in the target's folder, flushes
and fsyncs it, and renames it over the target only once complete, so a failed or interrupted
write (an exception, Ctrl-C, SIGTERM under :mod:`xnorcdl.cli`) leaves the previous file (if any)
as it was and no temporary file behind. A failed write (a full disk, an I/O error) raises an
``OSError`` whose ``filename`` is the target.

Reading: :func:`open_input` and :func:`read_bytes` read a regular file into memory after
checking its kind and size on the opened descriptor (a FIFO, a device or a folder is refused without blocking, a file
over its limit before anything is read), and refuses a file that shrinks or grows while it is
read: inputs are never memory-mapped, so a file truncated by another program gives an error,
not a SIGBUS. :func:`parse_json` decodes JSON with bounded size and nesting, refusing duplicate
keys and the non-standard NaN/Infinity literals.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
from typing import Type

from .errors import XnorcdlError

TEMP_PREFIX = ".xnorcdl-"
#: bytes read per system call; signals are handled between calls
CHUNK = 8 << 20
#: deepest nesting of arrays and objects a JSON document may have
JSON_DEPTH = 32


def sha256_of(path: str) -> str:
    """The sha256 of a file's bytes, as 64 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- reading

def kind_of(mode: int) -> str:
    """What a file of ``mode`` is, in words (``"a regular file"``, ``"a FIFO"``...)."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _readinto(fd: int, view: memoryview) -> int:
    """One read into ``view``; the bytes read (0 at the end of the file)."""
    return os.readv(fd, [view])


@contextlib.contextmanager
def open_input(path, limit: int, error: Type[XnorcdlError], what: str = "file"):
    """``with open_input(path, limit, DataError) as (fd, size):`` the opened regular file and
    its size. Raises ``error`` (``where`` = the path) when the file is missing, unreadable, not
    a regular file (checked on the opened descriptor, which never blocks on a FIFO) or larger
    than ``limit`` bytes (checked before anything is read)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such file", where=path) from None
    except OSError as exc:
        raise error(f"{path}: cannot open ({exc.strerror or exc})", where=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: is {kind_of(st.st_mode)}, expected a regular {what}",
                        where=path)
        if st.st_size > limit:
            raise error(f"{path}: {st.st_size} bytes, more than the {limit} a {what} may hold",
                        where=path)
        yield fd, st.st_size
    finally:
        os.close(fd)


def read_fd(fd: int, n: int, size: int, path: str, error: Type[XnorcdlError]):
    """The first ``n`` bytes of the file ``fd`` (of ``size`` bytes when opened) as a read-only
    uint8 array; ``error`` when the file shrinks or changes size while it is read."""
    import numpy as np
    buf = np.empty(n, np.uint8)
    view = memoryview(buf)
    got = 0
    try:
        while got < n:
            k = _readinto(fd, view[got:got + CHUNK])
            if k == 0:
                raise error(f"{path}: the file shrank from {size} to {got} bytes while it was "
                            "read (another program is changing it)", where=path)
            got += k
        now = os.fstat(fd).st_size
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})", where=path) from None
    if now != size:
        raise error(f"{path}: the file changed size from {size} to {now} bytes while it was "
                    "read (another program is changing it)", where=path)
    buf.flags.writeable = False
    return buf


def read_bytes(path, limit: int, error: Type[XnorcdlError], what: str = "file"):
    """The whole regular file ``path`` as a read-only uint8 array, checked as
    :func:`open_input` and :func:`read_fd` do."""
    path = os.fspath(path)
    with open_input(path, limit, error, what) as (fd, size):
        return read_fd(fd, size, size, path, error)


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def _depth(raw: bytes) -> int:
    """The deepest nesting of [ and { outside strings (an upper bound for broken JSON)."""
    import numpy as np
    a = np.frombuffer(_STRING.sub(b'""', raw), np.uint8)
    step = np.isin(a, (ord("["), ord("{"))).astype(np.int64) - np.isin(a, (ord("]"), ord("}")))
    return int(np.cumsum(step).max()) if a.size else 0


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice in one object")
        out[k] = v
    return out


def parse_json(raw, where: str, error: Type[XnorcdlError], what: str = "UTF-8 JSON",
               depth: int = JSON_DEPTH):
    """Decode UTF-8 JSON ``raw`` (bytes or a uint8 array) whose size the caller has bounded;
    nesting deeper than ``depth``, a duplicate key, NaN or Infinity, bad UTF-8 or bad JSON
    raise ``error`` naming ``where``."""
    raw = bytes(memoryview(raw))
    d = _depth(raw)
    if d > depth:
        raise error(f"{where}: the JSON nests {d} levels deep, more than the {depth} allowed",
                    where=where)
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant,
                          object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not valid {what} (bad UTF-8: {exc})", where=where) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise error(f"{where}: not valid {what} ({exc})", where=where) from None


# ----------------------------------------------------------------------------- writing

def _named(exc: OSError, path: str) -> OSError:
    """``exc`` with ``path`` as its file name (so the error line names the target)."""
    if exc.filename is None:
        exc.filename = path
    return exc


def remove_temporary(tmp: str) -> None:
    """Remove ``tmp`` if it is there, with SIGINT and SIGTERM held back meanwhile (a second
    Ctrl-C cannot stop the cleanup half-way; the signal is delivered right after)."""
    import signal
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", suffix: str = ""):
    """``with atomic_write(path) as f: f.write(...)``: ``path`` appears (mode 0644) only once
    the block has completed; on any exception (including ``KeyboardInterrupt`` and the
    SIGTERM exception of :mod:`xnorcdl.cli`) the temporary file is removed and the target is
    untouched. ``mode`` is ``"wb"`` or ``"w"``. An ``OSError`` names ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX,
                                   suffix=suffix or os.path.splitext(path)[1], dir=folder)
    except OSError as exc:
        raise _named(exc, path) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except OSError as exc:
        remove_temporary(tmp)
        raise _named(exc, path) from None
    except BaseException:
        remove_temporary(tmp)
        raise


def atomic_path(path: str):
    """A temporary path beside ``path`` for writers that take a file name (matplotlib's
    ``savefig``): ``with atomic_path(p) as tmp: write(tmp)`` renames ``tmp`` over ``p`` at the
    end, or removes it on failure."""
    return _AtomicPath(os.fspath(path))


class _AtomicPath:
    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> str:
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, self.tmp = tempfile.mkstemp(prefix=TEMP_PREFIX,
                                            suffix=os.path.splitext(self.path)[1], dir=folder)
        except OSError as exc:
            raise _named(exc, self.path) from None
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            remove_temporary(self.tmp)
            return
        try:
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, self.path)
        except BaseException as e:
            remove_temporary(self.tmp)
            if isinstance(e, OSError):
                raise _named(e, self.path) from None
            raise
