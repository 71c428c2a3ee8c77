"""Read, validate and write weights files (docs/FORMAT.md, version 1).

Loading checks everything before anything is used and raises :class:`WeightsError` naming the
file, the array or field, and what was expected. Writing is atomic: a temporary file in the same
folder is renamed over the target only once it is complete, so no half-written file remains.
"""
from __future__ import annotations

import json
import os
import zipfile
from typing import Dict, Tuple

import numpy as np

from .errors import WeightsError
from .spec import ModelSpec, SpecError, expected_arrays

META_KEY = "meta.json"


def _check_arrays(path: str, spec: ModelSpec, arrays: Dict[str, np.ndarray]) -> None:
    expected = expected_arrays(spec)
    missing = [k for k in expected if k not in arrays]
    if missing:
        shape, meaning = expected[missing[0]]
        raise WeightsError(
            f"{path}: missing array '{missing[0]}' (expected float32 {list(shape)}: {meaning})"
            + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else ""))
    extra = sorted(k for k in arrays if k not in expected)
    if extra:
        raise WeightsError(f"{path}: unexpected array(s) {extra} for this description "
                           f"(edge_convs={spec.edge_convs}, shortcut={spec.shortcut!r}, "
                           f"{len(spec.exits)} exit(s))", where=path)
    for name, (shape, meaning) in expected.items():
        a = arrays[name]
        if a.dtype != np.float32:
            raise WeightsError(f"{path}: array '{name}' has dtype {a.dtype}, expected float32",
                               where=path)
        if a.shape != shape:
            raise WeightsError(f"{path}: array '{name}' has shape {list(a.shape)}, "
                               f"expected {list(shape)} ({meaning})", where=path)
        if not np.isfinite(a).all():
            bad = int(np.size(a) - np.isfinite(a).sum())
            raise WeightsError(f"{path}: array '{name}' holds {bad} NaN/inf value(s)", where=path)
        if name.endswith(".bn.var") and (a < 0).any():
            raise WeightsError(f"{path}: array '{name}' holds negative variances", where=path)


def load_weights(path: str) -> Tuple[ModelSpec, Dict[str, np.ndarray]]:
    """Load and validate a weights file; returns the description and the arrays."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file", where=path) from None
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read ({exc})", where=path) from None
    if magic != b"PK\x03\x04":
        raise WeightsError(f"{path}: not a readable .npz archive (no zip signature); "
                           "weights files are written by xnorcdl.format.save_weights", where=path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file", where=path) from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise WeightsError(f"{path}: not a readable .npz archive ({exc})", where=path) from None
    except ValueError as exc:  # object arrays need pickle, which is never allowed
        raise WeightsError(f"{path}: holds an array that needs pickle ({exc}); "
                           "only numeric arrays are allowed", where=path) from None
    if META_KEY not in arrays:
        raise WeightsError(f"{path}: missing array '{META_KEY}' (the JSON description, "
                           "uint8 UTF-8 bytes); is this an xnorcdl weights file?", where=path)
    raw = arrays.pop(META_KEY)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise WeightsError(f"{path}: array '{META_KEY}' must be 1-D uint8 UTF-8 JSON, "
                           f"got {raw.dtype} with shape {list(raw.shape)}", where=path)
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: '{META_KEY}' is not valid UTF-8 JSON ({exc})",
                           where=path) from None
    try:
        spec = ModelSpec.from_json_dict(meta)
    except SpecError as exc:
        raise WeightsError(f"{path}: {META_KEY}: {exc}", where=path) from None
    _check_arrays(path, spec, arrays)
    return spec, arrays


def save_weights(path: str, spec: ModelSpec, arrays: Dict[str, np.ndarray]) -> None:
    """Validate, then write atomically (the target appears only once complete)."""
    path = os.fspath(path)
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
