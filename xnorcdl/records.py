"""Readers for CIFAR-style binary record files.

Every record is a few label bytes followed by 3072 pixel bytes: the R plane, the G plane and the
B plane of a 32x32 image, 1024 bytes each, row-major. Formats (``RECORD_FORMATS``):

- ``cifar10`` (the default): 1 label byte (0..9), then the pixels;
- ``cifar100``: 1 coarse label byte (0..19), 1 fine label byte (0..99), then the pixels;
- ``raw``: the pixels only, no label.

``read_records(path, fmt)`` reads the file into memory (a regular file of at most
:data:`MAX_BYTES`; never memory-mapped, so a file truncated by another program while it is read
gives an error, not a SIGBUS) and checks its size and every label; problems raise ``DataError``
naming the file and what was wrong.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .errors import DataError

IMAGE_SHAPE = (3, 32, 32)
PIXEL_BYTES = 3 * 32 * 32
#: largest record file read (bytes): about 700,000 CIFAR-10 records
MAX_BYTES = 2 << 30


@dataclass(frozen=True)
class RecordFormat:
    """A record layout: label fields (name, number of classes) in byte order, then the pixels."""

    name: str
    labels: Tuple[Tuple[str, int], ...]

    @property
    def label_bytes(self) -> int:
        return len(self.labels)

    @property
    def record_size(self) -> int:
        return self.label_bytes + PIXEL_BYTES


RECORD_FORMATS = {
    "cifar10": RecordFormat("cifar10", (("label", 10),)),
    "cifar100": RecordFormat("cifar100", (("coarse", 20), ("fine", 100))),
    "raw": RecordFormat("raw", ()),
}


def record_format(fmt: str) -> RecordFormat:
    """The layout named ``fmt``, or a DataError listing the known ones."""
    try:
        return RECORD_FORMATS[fmt]
    except (KeyError, TypeError):
        raise DataError(f"unknown record format {fmt!r}; known formats: "
                        f"{', '.join(RECORD_FORMATS)}") from None


def _record_count(path: str, rec: RecordFormat, size: int) -> int:
    rs = rec.record_size
    if size == 0:
        raise DataError(f"{path}: file is empty, expected {rec.name} records of {rs} bytes each",
                        where=path)
    n, rest = divmod(size, rs)
    if rest:
        raise DataError(f"{path}: size {size} bytes is not a multiple of the {rec.name} record size "
                        f"{rs}; the incomplete record {n} starts at byte offset {n * rs} "
                        f"({rest} of {rs} bytes present)", where=path)
    return n


def _check_labels(path: str, rec: RecordFormat, table: np.ndarray) -> None:
    for k, (field, classes) in enumerate(rec.labels):
        column = table[:, k]
        bad = np.flatnonzero(column >= classes)
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{path}: record {i} (byte offset {i * rec.record_size}): {field} label "
                            f"is {int(column[i])}, expected 0..{classes - 1} for {rec.name} "
                            f"({bad.size} record(s) out of range; is the format right?)",
                            where=path)


def read_records(path, fmt: str = "cifar10", limit: Optional[int] = None
                 ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Read a record file: ``(images, labels)``, the first ``limit`` records when given.

    ``images`` is a read-only uint8 array ``[N, 3, 32, 32]`` (a view of the bytes read);
    ``labels`` is an int64 array ``[N]`` (the fine label for ``cifar100``; ``None`` for ``raw``).
    ``fmt`` defaults to ``cifar10``. The file must be a regular file of at most
    :data:`MAX_BYTES` whose size is a whole number of records.
    """
    from .files import open_input, read_fd
    rec = record_format(fmt)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer))
                              or limit < 0):
        raise DataError(f"limit: expected an integer >= 0 or None, got {limit!r}", where="limit")
    path = os.fspath(path)
    rs = rec.record_size
    with open_input(path, MAX_BYTES, DataError, f"{rec.name} record file") as (fd, size):
        n = _record_count(path, rec, size)
        if limit is not None:
            n = min(n, int(limit))
        table = read_fd(fd, n * rs, size, path, DataError).reshape(n, rs)
    _check_labels(path, rec, table)
    images = table[:, rec.label_bytes:].reshape((n,) + IMAGE_SHAPE)
    labels = table[:, rec.label_bytes - 1].astype(np.int64) if rec.labels else None
    return images, labels


def pack_records(images, labels=None, fmt: str = "cifar10") -> np.ndarray:
    """The bytes of a record file as a uint8 array ``[N, record_size]``.

    ``images``: uint8 ``[N, 3, 32, 32]``; ``labels``: ``[N]`` for ``cifar10``, ``[N, 2]``
    (coarse, fine) for ``cifar100``, ``None`` for ``raw``. Labels are range-checked.
    """
    rec = record_format(fmt)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"images: expected uint8 [N, 3, 32, 32], got {images.dtype} "
                        f"{list(images.shape)}")
    n = len(images)
    out = np.empty((n, rec.record_size), dtype=np.uint8)
    out[:, rec.label_bytes:] = images.reshape(n, PIXEL_BYTES)
    if rec.labels:
        if labels is None:
            raise DataError(f"labels: the {rec.name} format needs labels")
        lab = np.asarray(labels)
        if lab.size != n * rec.label_bytes:
            raise DataError(f"labels: expected {n} x {rec.label_bytes} values for {n} {rec.name} "
                            f"records, got shape {list(lab.shape)}")
        lab = lab.reshape(n, rec.label_bytes)
        for k, (field, classes) in enumerate(rec.labels):
            if lab.size and (lab[:, k].min() < 0 or lab[:, k].max() >= classes):
                raise DataError(f"labels: {field} labels must lie in 0..{classes - 1}")
        out[:, :rec.label_bytes] = lab
    return out
