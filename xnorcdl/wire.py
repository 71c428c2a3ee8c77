"""The edge-cloud wire format (docs/PROTOCOL.md): one versioned binary message, no pickle.

Layout, little-endian throughout::

    offset size  field
    0      4     magic b"XCDL"
    4      2     version (uint16) = 1
    6      1     kind (uint8): 1 features (edge -> cloud), 2 logits (cloud -> edge)
    7      1     dtype (uint8): 1 float32, 2 float16
    8      1     compression (uint8): 0 none, 1 zlib (RFC 1950, lossless)
    9      1     ndim (uint8): 4 for features [N, C, H, W], 2 for logits [N, classes]
    10     2     reserved, 0
    12     32    model id: the sha256 of the source weights file (raw bytes)
    44     4     N, the number of samples (uint32)
    48     8 N   sample ids (uint64), one per sample, in payload order
    ..     4 nd  shape (uint32 each); shape[0] == N
    ..     8     payload length in bytes as sent (uint64)
    ..     ...   payload: the C-order array, compressed when compression is 1

:func:`decode` checks every field before it allocates anything and raises :class:`WireError`
naming the field; the payload's decoded size must equal N * prod(shape[1:]) * itemsize.
"""
from __future__ import annotations

import dataclasses
import struct
import zlib
from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import WireError

MAGIC = b"XCDL"
VERSION = 1
FEATURES, LOGITS = 1, 2
DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
DTYPE_CODES = {"float32": 1, "float16": 2}
COMPRESSIONS = {"none": 0, "zlib": 1}
CONTENT_TYPE = "application/x-xnorcdl"
_FIXED = struct.Struct("<4sHBBBBH32sI")     # 48 bytes
#: hard caps that keep a decoded message's memory bounded
MAX_SAMPLES = 1 << 16
MAX_PAYLOAD = 256 << 20


@dataclasses.dataclass(frozen=True)
class Message:
    kind: int
    model_id: str               # 64 hex digits
    ids: np.ndarray             # [N] uint64
    array: np.ndarray           # float32 (decoded), [N, ...]
    dtype: str                  # "float32" or "float16" as sent
    compression: str            # "none" or "zlib"
    wire_bytes: int             # length of the encoded message


def encode(kind: int, model_id: str, ids: Sequence[int], array: np.ndarray,
           dtype: str = "float32", compression: str = "none") -> bytes:
    """One message holding ``array`` ([N, ...], any float dtype) as ``dtype`` on the wire."""
    if kind not in (FEATURES, LOGITS):
        raise WireError(f"kind: expected {FEATURES} or {LOGITS}, got {kind!r}")
    if dtype not in DTYPE_CODES:
        raise WireError(f"dtype: expected one of {sorted(DTYPE_CODES)}, got {dtype!r}")
    if compression not in COMPRESSIONS:
        raise WireError(f"compression: expected one of {sorted(COMPRESSIONS)}, got {compression!r}")
    mid = bytes.fromhex(model_id)
    if len(mid) != 32:
        raise WireError("model id: expected 32 bytes (a sha256)")
    a = np.ascontiguousarray(array, dtype=DTYPES[DTYPE_CODES[dtype]])
    ids = np.ascontiguousarray(ids, dtype="<u8")
    if a.ndim < 1 or a.shape[0] != len(ids):
        raise WireError(f"shape: {len(ids)} sample ids for an array of shape {list(a.shape)}")
    payload = a.tobytes()
    if compression == "zlib":
        payload = zlib.compress(payload, 1)
    head = _FIXED.pack(MAGIC, VERSION, kind, DTYPE_CODES[dtype], COMPRESSIONS[compression],
                       a.ndim, 0, mid, len(ids))
    return b"".join([head, ids.tobytes(), struct.pack(f"<{a.ndim}I", *a.shape),
                     struct.pack("<Q", len(payload)), payload])


def decode(data: bytes, kind: int, model_id: Optional[str] = None,
           shape: Optional[Tuple[int, ...]] = None, max_samples: int = MAX_SAMPLES) -> Message:
    """Parse and check one message of ``kind``; ``shape`` (without N) and ``model_id`` when
    given must match. Raises :class:`WireError` naming the field (``field`` attribute too)."""
    view = memoryview(data)
    if len(view) < _FIXED.size:
        raise WireError(f"header: {len(view)} bytes, expected at least {_FIXED.size}", "header")
    magic, ver, knd, dt, comp, ndim, res, mid, n = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireError(f"magic: expected {MAGIC!r}, got {bytes(magic)!r}", "magic")
    if ver != VERSION:
        raise WireError(f"version: this engine speaks version {VERSION}, got {ver}", "version")
    if knd != kind:
        raise WireError(f"kind: expected {kind}, got {knd}", "kind")
    if dt not in DTYPES:
        raise WireError(f"dtype: expected 1 (float32) or 2 (float16), got {dt}", "dtype")
    if comp not in COMPRESSIONS.values():
        raise WireError(f"compression: expected 0 (none) or 1 (zlib), got {comp}", "compression")
    want_ndim = 4 if kind == FEATURES else 2
    if ndim != want_ndim:
        raise WireError(f"ndim: expected {want_ndim}, got {ndim}", "ndim")
    if res != 0:
        raise WireError(f"reserved: expected 0, got {res}", "reserved")
    if not 1 <= n <= max_samples:
        raise WireError(f"count: expected 1..{max_samples} samples, got {n}", "count")
    if model_id is not None and mid.hex() != model_id:
        raise WireError(f"model id: this side serves {model_id[:12]}..., the message is for "
                        f"{mid.hex()[:12]}...", "model_id")
    off = _FIXED.size
    need = off + 8 * n + 4 * ndim + 8
    if len(view) < need:
        raise WireError(f"header: {len(view)} bytes, expected at least {need} for {n} samples",
                        "header")
    ids = np.frombuffer(view, "<u8", n, off).copy()
    off += 8 * n
    dims = struct.unpack_from(f"<{ndim}I", view, off)
    off += 4 * ndim
    if dims[0] != n:
        raise WireError(f"shape: shape[0] = {dims[0]}, expected the sample count {n}", "shape")
    if shape is not None and tuple(dims[1:]) != tuple(shape):
        raise WireError(f"shape: expected [N, {', '.join(map(str, shape))}], got "
                        f"{list(dims)}", "shape")
    (length,) = struct.unpack_from("<Q", view, off)
    off += 8
    if length != len(view) - off:
        raise WireError(f"payload length: the header says {length} bytes, the message holds "
                        f"{len(view) - off}", "payload_length")
    dtype = DTYPES[dt]
    size = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if size > MAX_PAYLOAD:
        raise WireError(f"shape: {size} bytes decoded, more than {MAX_PAYLOAD}", "shape")
    body = view[off:]
    if comp == 1:
        try:
            d = zlib.decompressobj()
            raw = d.decompress(bytes(body), size + 1)
            if len(raw) != size or not d.eof or d.unused_data:
                raise WireError(f"payload: zlib stream decodes to a size other than {size} bytes",
                                "payload")
        except zlib.error as exc:
            raise WireError(f"payload: not a zlib stream ({exc})", "payload") from None
    else:
        raw = body
        if len(raw) != size:
            raise WireError(f"payload: {len(raw)} bytes, expected {size} for shape "
                            f"{list(dims)}", "payload")
    arr = np.frombuffer(raw, dtype).reshape(dims).astype(np.float32)
    if not np.isfinite(arr).all():
        raise WireError("payload: holds NaN or infinite values", "payload")
    name = {v: k for k, v in DTYPE_CODES.items()}[dt]
    cname = {v: k for k, v in COMPRESSIONS.items()}[comp]
    return Message(knd, mid.hex(), ids, arr, name, cname, len(view))
