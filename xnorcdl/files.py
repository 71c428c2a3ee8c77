"""File helpers every writer of the project shares: atomic writes and content hashes.

:func:`atomic_write` writes through a temporary file in the target's folder, flushes and
fsyncs it, and renames it over the target only once complete, so a failed or interrupted write
leaves the previous file (if any) as it was and no temporary file behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile


def sha256_of(path: str) -> str:
    """The sha256 of a file's bytes, as 64 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", suffix: str = ""):
    """``with atomic_write(path) as f: f.write(...)``: ``path`` appears (mode 0644) only once
    the block has completed; on any exception the temporary file is removed and the target is
    untouched. ``mode`` is ``"wb"`` or ``"w"``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".xnorcdl-", suffix=suffix or os.path.splitext(path)[1],
                               dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_path(path: str):
    """A temporary path beside ``path`` for writers that take a file name (matplotlib's
    ``savefig``): ``with atomic_path(p) as tmp: write(tmp)`` renames ``tmp`` over ``p`` at the
    end, or removes it on failure."""
    return _AtomicPath(path)


class _AtomicPath:
    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> str:
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(prefix=".xnorcdl-", suffix=os.path.splitext(self.path)[1],
                                        dir=folder)
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
            return
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
