"""Read, validate and write weights files (docs/FORMAT.md, version 1).

Loading checks everything before anything is used and raises :class:`WeightsError` naming the
file, the array or field, and what was expected: the file's kind and size, the zip directory
(:mod:`xnorcdl.npz`), every field of the description with its exact type and range
(:mod:`xnorcdl.spec`), every array's dtype and shape before it is read, and its values.
Writing is atomic: a temporary file in the same folder is renamed over the target only once it
is complete, so no half-written file remains.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import numpy as np

from .errors import WeightsError
from .spec import ModelSpec, SpecError, expected_arrays

META_KEY = "meta.json"


#: largest weights file read (bytes) and largest total its members may declare; ResNet-32 in
#: float32 is about 2 MB, ResNet-1202 (the deepest description allowed) about 80 MB
MAX_FILE_BYTES = 256 << 20
MAX_ARRAY_BYTES = 512 << 20
#: largest meta.json (bytes) and most members a file may hold
MAX_META_BYTES = 1 << 20
MAX_MEMBERS = 20000
#: largest magnitude of a parameter and of a folded BatchNorm scale or shift (far inside
#: float32's range, so nothing overflows on the way)
MAX_BN_AFFINE = 1e30


def check_values(path: str, name: str, a: np.ndarray) -> None:
    """Refuse NaN/inf or a magnitude beyond :data:`MAX_BN_AFFINE` in an array, and a negative
    BN variance; the message names the array."""
    if not np.isfinite(a).all():
        bad = int(np.size(a) - np.isfinite(a).sum())
        raise WeightsError(f"{path}: array '{name}' holds {bad} NaN/inf value(s)", where=path)
    if (np.abs(a) > MAX_BN_AFFINE).any():
        raise WeightsError(f"{path}: array '{name}' holds values beyond +-{MAX_BN_AFFINE:g}",
                           where=path)
    if name.endswith(".bn.var"):
        if (a < 0).any():
            i = int(np.argmax(a < 0))
            raise WeightsError(f"{path}: array '{name}' holds negative variances (element {i} "
                               f"is {float(a[i]):g}); expected >= 0", where=path)


def check_batchnorm(path: str, arrays: Dict[str, np.ndarray], eps: float) -> None:
    """Refuse a BatchNorm whose folded scale gamma / sqrt(var + eps) or shift
    beta - mean * scale exceeds :data:`MAX_BN_AFFINE` (it would overflow float32 on the way);
    the message names the arrays."""
    for name in arrays:
        if not name.endswith(".bn.var"):
            continue
        p = name[:-len("var")]
        g, b, m, v = (arrays[p + k].astype(np.float64) for k in ("gamma", "beta", "mean", "var"))
        scale = g / np.sqrt(v + eps)
        shift = b - m * scale
        for what, x in (("scale gamma / sqrt(var + bn_eps)", scale),
                        ("shift beta - mean * scale", shift)):
            if not (np.abs(x) <= MAX_BN_AFFINE).all():
                i = int(np.argmax(~(np.abs(x) <= MAX_BN_AFFINE)))
                raise WeightsError(f"{path}: arrays '{p}*': the folded BatchNorm {what} of "
                                   f"channel {i} is {float(x[i]):g}, beyond +-{MAX_BN_AFFINE:g} "
                                   f"(bn_eps = {eps:g})", where=path)


def _check_arrays(path: str, spec: ModelSpec, arrays: Dict[str, np.ndarray]) -> None:
    expected = expected_arrays(spec)
    _check_names(path, spec, expected, arrays)
    for name, (shape, meaning) in expected.items():
        a = arrays[name]
        if a.dtype != np.float32:
            raise WeightsError(f"{path}: array '{name}' has dtype {a.dtype}, expected float32",
                               where=path)
        if a.shape != shape:
            raise WeightsError(f"{path}: array '{name}' has shape {list(a.shape)}, "
                               f"expected {list(shape)} ({meaning})", where=path)
        check_values(path, name, a)
    check_batchnorm(path, arrays, spec.bn_eps)


def _check_names(path: str, spec: ModelSpec, expected, names) -> None:
    missing = [k for k in expected if k not in names]
    if missing:
        shape, meaning = expected[missing[0]]
        raise WeightsError(
            f"{path}: missing array '{missing[0]}' (expected float32 {list(shape)}: {meaning})"
            + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else ""), where=path)
    extra = sorted(k for k in names if k not in expected)
    if extra:
        raise WeightsError(f"{path}: unexpected array(s) {extra[:5]} for this description "
                           f"(edge_convs={spec.edge_convs}, shortcut={spec.shortcut!r}, "
                           f"{len(spec.exits)} exit(s))", where=path)


def read_meta(archive, path: str, error=WeightsError):
    """The decoded ``meta.json`` of a checked archive (:class:`xnorcdl.npz.Npz`): a 1-D uint8
    array of at most :data:`MAX_META_BYTES` bytes of UTF-8 JSON, nesting bounded."""
    from .files import parse_json
    if META_KEY not in archive.members:
        raise error(f"{path}: missing array '{META_KEY}' (the JSON description, 1-D uint8 UTF-8 "
                    "bytes); is this an xnorcdl file?", where=path)
    raw = archive.read(META_KEY, np.uint8, ndim=1, max_elements=MAX_META_BYTES)
    return parse_json(raw, f"{path}: {META_KEY}", error)


def load_weights(path: str) -> Tuple[ModelSpec, Dict[str, np.ndarray]]:
    """Load and validate a weights file; returns the description and the arrays.

    The file must be a regular file of at most :data:`MAX_FILE_BYTES`; its zip directory is
    checked before anything is decompressed (:mod:`xnorcdl.npz`), its description before any
    array is read, and every array's dtype and shape before it is allocated. Every problem
    raises :class:`WeightsError` naming the file and the member or field."""
    from .npz import Npz
    path = os.fspath(path)
    archive = Npz(path, WeightsError, MAX_FILE_BYTES, MAX_MEMBERS, MAX_ARRAY_BYTES,
                  "weights file")
    meta = read_meta(archive, path)
    try:
        spec = ModelSpec.from_json_dict(meta)
    except SpecError as exc:
        raise WeightsError(f"{path}: {META_KEY}: {exc}", where=path) from None
    expected = expected_arrays(spec)
    names = [k for k in archive.names if k != META_KEY]
    _check_names(path, spec, expected, names)
    arrays = {}
    for name, (shape, _) in expected.items():
        arrays[name] = archive.read(name, np.float32, shape)
        check_values(path, name, arrays[name])
    check_batchnorm(path, arrays, spec.bn_eps)
    return spec, arrays


def save_weights(path: str, spec: ModelSpec, arrays: Dict[str, np.ndarray]) -> None:
    """Validate, then write atomically (the target appears only once complete). ``path`` must
    not be a folder, a symbolic link, a FIFO or a device (:func:`xnorcdl.paths.check_output`)."""
    from .paths import check_output
    path = os.fspath(path)
    check_output(path, "path", stdout=False)
    spec.validate()
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    _check_arrays(path, spec, arrays)
    meta = np.frombuffer(json.dumps(spec.to_json_dict(), indent=1).encode("utf-8"), np.uint8)
    from .files import atomic_write
    with atomic_write(path, "wb", ".npz") as f:
        np.savez(f, **{META_KEY: meta}, **arrays)


def random_weights(spec: ModelSpec, seed: int = 0) -> Dict[str, np.ndarray]:
    """Deterministic random arrays for ``spec`` (He-normal convs, unit-ish BN): for tests and demos.

    The statistics are chosen so that activations stay O(1) through every block, which makes
    the quantizers see a healthy spread of values on both sides of zero.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, _) in expected_arrays(spec).items():
        if name.endswith("weight") and len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            a = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif name.endswith("weight"):
            a = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
        elif name.endswith(".gamma"):
            a = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(".var"):
            a = rng.uniform(0.5, 2.0, shape)
        else:  # beta, mean, bias
            a = rng.normal(0.0, 0.2, shape)
        out[name] = a.astype(np.float32)
    return out
