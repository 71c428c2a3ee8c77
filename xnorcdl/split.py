"""``python -m xnorcdl split``: a weights file as an edge artifact and a cloud artifact

``python -m xnorcdl split --weights W.npz --out DIR`` (docs/FORMAT.md, "Split deployment").

``DIR/edge.npz`` (format ``xnorcdl-edge``) holds what the device runs: the stem, the M quantized
convs with their weight codes bit-packed (1 bit: one bit per weight, set for -1; 2 and 4 bits:
the level q = (u + Z) / 2 in 2 or 4 bits), each conv's output scale s[o] (eq. 2) and input BN as
the engine's prepared float32 affine (BN folded into one scale and shift per channel, exactly the
numbers the engine computes at load, so nothing changes), edge 1x1 shortcuts, the early exits with
their thresholds, and the energy of every outcome priced on the whole network (so the edge can
report what ``infer`` reports). ``DIR/cloud.npz`` (``xnorcdl-cloud``) holds the cloud convs and
the head. Both carry the sha256 of the source weights as their model id; each loads alone and the
edge never reads a cloud array.

Loading returns :class:`~xnorcdl.model.Model` objects of one side: the edge model's ``blocks``
are the edge blocks and its ``head`` is None; the cloud model's ``blocks`` are the cloud blocks
(in order) and its ``stem`` is None. Every backend runs them unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, List, Tuple

import numpy as np

from .errors import ArtifactError
from .files import atomic_write, sha256_of
from .model import Block, FloatConv, Linear, Model, QuantConv, Shortcut
from .spec import ModelSpec, SpecError

EDGE_FORMAT, CLOUD_FORMAT, VERSION = "xnorcdl-edge", "xnorcdl-cloud", 1
META_KEY = "meta.json"
#: largest artifact read (bytes) and largest total its members may declare; a ResNet-32 cloud
#: is about 2 MB
MAX_BYTES = 256 << 20
MAX_ARRAY_BYTES = 512 << 20
MAX_MEMBERS = 20000
#: largest magnitude of a prepared parameter (the folded BN of docs/FORMAT.md stays below it)
MAX_ABS = 1e30
#: the keys of an outcome's energy record and of its pJ per sample
OUTCOME_KEYS = ("outcome", "pJ_per_sample", "comm_bytes", "macs_valid_by_bits",
                "macs_dense_by_bits")
PJ_KEYS = ("edge", "cloud", "compute", "memory", "total")


# ------------------------------------------------------------------------------ bit packing

def pack_codes(u: np.ndarray, bits: int) -> np.ndarray:
    """Integer weight codes -> uint8 bytes, LSB first over the C-order flattening.

    1 bit: bit j of the stream is set when code j is -1. 2 and 4 bits: the level q = (u + Z) / 2
    in {0..Z} takes ``bits`` consecutive bits, least significant first; the last byte is padded
    with zero bits."""
    flat = np.asarray(u, dtype=np.int16).ravel()
    if bits == 1:
        return np.packbits(flat < 0, bitorder="little")
    z = (1 << bits) - 1
    q = ((flat + z) // 2).astype(np.uint8)
    planes = ((q[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(bool).ravel()
    return np.packbits(planes, bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, shape: Tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_codes`: int8 codes of ``shape``."""
    n = int(np.prod(shape))
    stream = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")
    if bits == 1:
        if len(stream) < n:
            raise ValueError("packed codes: too few bytes")
        return np.where(stream[:n].astype(bool), np.int8(-1), np.int8(1)).reshape(shape)
    if len(stream) < n * bits:
        raise ValueError("packed codes: too few bytes")
    planes = stream[:n * bits].reshape(n, bits).astype(np.int16)
    q = (planes << np.arange(bits, dtype=np.int16)).sum(axis=1)
    return (2 * q - ((1 << bits) - 1)).astype(np.int8).reshape(shape)


# ------------------------------------------------------------------------------ writing

def _float_conv_arrays(prefix: str, c: FloatConv) -> Dict[str, np.ndarray]:
    return {f"{prefix}.weight": c.weight, f"{prefix}.bn_scale": c.bn_scale,
            f"{prefix}.bn_shift": c.bn_shift}


def _quant_conv_arrays(prefix: str, c: QuantConv) -> Dict[str, np.ndarray]:
    return {f"{prefix}.codes": pack_codes(c.w_codes, c.bits), f"{prefix}.out_scale": c.out_scale,
            f"{prefix}.bn_scale": c.bn_scale, f"{prefix}.bn_shift": c.bn_shift}


def _block_arrays(blk: Block) -> Dict[str, np.ndarray]:
    i, j = 2 * blk.index + 1, 2 * blk.index + 2
    out = {}
    for n, c in ((i, blk.conv1), (j, blk.conv2)):
        out.update(_quant_conv_arrays(f"conv{n}", c) if isinstance(c, QuantConv)
                   else _float_conv_arrays(f"conv{n}", c))
    if blk.shortcut.conv is not None:
        out.update(_float_conv_arrays(f"shortcut{blk.index}", blk.shortcut.conv))
    return out


def _spec_dict(spec: ModelSpec) -> dict:
    d = spec.to_json_dict()
    d.pop("provenance", None)
    return d


def _write(f, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
    raw = np.frombuffer(json.dumps(meta, indent=1).encode("utf-8"), np.uint8)
    np.savez_compressed(f, **{META_KEY: raw}, **arrays)


def split(weights: str, out_dir: str) -> dict:
    """Write ``out_dir/edge.npz`` and ``out_dir/cloud.npz`` from ``weights``; returns a report
    (paths, sizes, model id, and the float32 size of the edge layers for comparison)."""
    from .energy import profile
    from .model import load_model
    from .paths import check_io
    paths = {"edge": os.path.join(out_dir, "edge.npz"), "cloud": os.path.join(out_dir, "cloud.npz")}
    check_io([(k, p, False) for k, p in paths.items()], [("weights", weights)],
             [("out_dir", out_dir)])
    model = load_model(weights)
    spec = model.spec
    if model.head.edge:
        raise ArtifactError(f"{weights}: every layer is at the edge (edge_convs = "
                            f"{spec.edge_convs} of {spec.num_convs}); there is no cloud to split off")
    model_id = sha256_of(weights)
    n_edge = model.edge_blocks
    prof = profile(model)
    outcomes = [{"outcome": o["outcome"], "pJ_per_sample": o["pJ_per_sample"],
                 "comm_bytes": o["comm_bytes"], "macs_valid_by_bits": o["macs_valid_by_bits"],
                 "macs_dense_by_bits": o["macs_dense_by_bits"]} for o in prof.outcomes(model)]
    common = {"version": VERSION, "model_id": model_id, "source": os.path.basename(weights),
              "spec": _spec_dict(spec), "edge_blocks": n_edge}
    edge = _float_conv_arrays("stem", model.stem)
    for blk in model.blocks[:n_edge]:
        edge.update(_block_arrays(blk))
    for k, e in enumerate(model.exits):
        edge[f"exit{k}.weight"], edge[f"exit{k}.bias"] = e.weight, e.bias
    cloud = {}
    for blk in model.blocks[n_edge:]:
        cloud.update(_block_arrays(blk))
    cloud["head.weight"], cloud["head.bias"] = model.head.weight, model.head.bias
    os.makedirs(out_dir, exist_ok=True)
    # both halves are complete on disk before either is renamed into place, so an interrupted
    # split never leaves a new edge beside an old cloud
    with atomic_write(paths["edge"]) as fe, atomic_write(paths["cloud"]) as fc:
        _write(fe, {"format": EDGE_FORMAT, **common, "energy_outcomes": outcomes,
                    "energy_table": prof.table.to_dict(),
                    "baselines_pJ_per_sample": {"full_precision_no_exit": prof.fp_no_exit,
                                                "hybrid_no_exit": prof.hybrid_no_exit}}, edge)
        _write(fc, {"format": CLOUD_FORMAT, **common}, cloud)
    float32_edge = 4 * sum(int(np.prod(c.shape)) for blk in model.blocks[:n_edge]
                           for c in (blk.conv1, blk.conv2)) + 4 * sum(
        int(a.size) for k, a in edge.items() if not k.endswith(".codes"))
    return {"model_id": model_id, "edge": paths["edge"], "cloud": paths["cloud"],
            "edge_bytes": os.path.getsize(paths["edge"]),
            "cloud_bytes": os.path.getsize(paths["cloud"]),
            "edge_float32_bytes": float32_edge,
            "edge_arrays_bytes": int(sum(a.nbytes for a in edge.values()))}


# ------------------------------------------------------------------------------ loading

def _read(path: str, fmt: str):
    """(meta, checked archive) of an artifact of format ``fmt``."""
    from .format import read_meta
    from .npz import Npz
    path = os.fspath(path)
    archive = Npz(path, ArtifactError, MAX_BYTES, MAX_MEMBERS, MAX_ARRAY_BYTES, f"{fmt} artifact")
    meta = read_meta(archive, path, ArtifactError)

    def fail(message: str):
        raise ArtifactError(f"{path}: {message}", where=path)
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        fail(f"format {got!r}, expected {fmt!r}"
             + (" (the other half of a split?)" if got in (EDGE_FORMAT, CLOUD_FORMAT) else ""))
    if type(meta.get("version")) is not int or meta.get("version") != VERSION:
        fail(f"{fmt} version {meta.get('version')!r}, this engine reads version {VERSION}")
    mid = meta.get("model_id")
    if not (isinstance(mid, str) and len(mid) == 64 and all(c in "0123456789abcdef" for c in mid)):
        fail(f"model_id: expected 64 hex digits, got {mid!r}")
    try:
        spec = ModelSpec.from_json_dict(meta.get("spec"))
    except SpecError as exc:
        fail(f"spec: {exc}")
    meta["spec"] = spec
    eb = meta.get("edge_blocks")
    if type(eb) is not int or eb != spec.edge_convs // 2:
        fail(f"edge_blocks: expected {spec.edge_convs // 2}, got {eb!r}")
    return meta, archive


def _check_energy(path: str, meta: dict, n_outcomes: int) -> None:
    """The energy records an edge artifact carries: ``n_outcomes`` outcomes, each with finite
    pJ >= 0 per part, integer bytes and MAC counts; the table's MAC convention; the baselines."""
    def fail(field: str, expected: str, got):
        text = repr(got)
        raise ArtifactError(f"{path}: {field}: expected {expected}, got "
                            f"{text if len(text) <= 80 else text[:77] + '...'}", where=path)

    def pj(field: str, d) -> None:
        if type(d) is not dict or set(d) != set(PJ_KEYS) or not all(
                type(v) in (int, float) and math.isfinite(v) and v >= 0 for v in d.values()):
            fail(field, f"an object of finite pJ >= 0 for {list(PJ_KEYS)}", d)

    def counts(field: str, d) -> None:
        if type(d) is not dict or not all(type(k) is str and k.isdigit() and type(v) is int
                                          and v >= 0 for k, v in d.items()):
            fail(field, "an object of bit widths -> integer counts >= 0", d)

    outcomes = meta.get("energy_outcomes")
    if type(outcomes) is not list or len(outcomes) != n_outcomes:
        fail("energy_outcomes", f"a list of {n_outcomes} outcome records", outcomes)
    for k, o in enumerate(outcomes):
        where = f"energy_outcomes[{k}]"
        if type(o) is not dict or set(o) != set(OUTCOME_KEYS):
            fail(where, f"an object with keys {list(OUTCOME_KEYS)}", o)
        if type(o["outcome"]) is not str:
            fail(f"{where}.outcome", "a string", o["outcome"])
        pj(f"{where}.pJ_per_sample", o["pJ_per_sample"])
        if type(o["comm_bytes"]) is not int or o["comm_bytes"] < 0:
            fail(f"{where}.comm_bytes", "an integer >= 0", o["comm_bytes"])
        counts(f"{where}.macs_valid_by_bits", o["macs_valid_by_bits"])
        counts(f"{where}.macs_dense_by_bits", o["macs_dense_by_bits"])
    table = meta.get("energy_table")
    if type(table) is not dict or table.get("mac_convention") not in ("valid", "dense"):
        fail("energy_table", "an object with mac_convention 'valid' or 'dense'", table)
    base = meta.get("baselines_pJ_per_sample")
    if type(base) is not dict or set(base) != {"full_precision_no_exit", "hybrid_no_exit"}:
        fail("baselines_pJ_per_sample", "an object with full_precision_no_exit and "
                                        "hybrid_no_exit", base)
    for k, v in base.items():
        pj(f"baselines_pJ_per_sample.{k}", v)


def _take(path: str, archive, name: str, shape, dtype=np.float32) -> np.ndarray:
    """Array ``name`` of ``dtype`` and ``shape`` (checked before it is read); float arrays
    finite and within +-:data:`MAX_ABS`, scales >= 0."""
    a = archive.read(name, dtype, tuple(shape))
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ArtifactError(f"{path}: array '{name}' holds NaN/inf values", where=path)
        if (np.abs(a) > MAX_ABS).any():
            raise ArtifactError(f"{path}: array '{name}' holds values beyond +-{MAX_ABS:g}",
                                where=path)
        if name.endswith(".out_scale") and (a < 0).any():
            raise ArtifactError(f"{path}: array '{name}' holds negative scales", where=path)
    return a


def _blocks(path: str, spec: ModelSpec, arrays, indices, used: set) -> List[Block]:
    """The prepared blocks ``indices`` from an artifact's arrays (shapes from the spec)."""
    from .spec import IMAGE_SHAPE

    def take(name, shape, dtype=np.float32):
        used.add(name)
        return _take(path, arrays, name, shape, dtype)

    def fconv(prefix, o, c, k, stride, pad, edge):
        return FloatConv(prefix, take(f"{prefix}.weight", (o, c, k, k)),
                         take(f"{prefix}.bn_scale", (o,)), take(f"{prefix}.bn_shift", (o,)),
                         stride, pad, edge)

    def qconv(prefix, o, c, stride):
        bits = spec.edge_bits
        n = o * c * 9
        packed = take(f"{prefix}.codes", ((n * bits + 7) // 8,), np.uint8)
        return QuantConv(prefix, unpack_codes(packed, bits, (o, c, 3, 3)),
                         take(f"{prefix}.out_scale", (o,)), take(f"{prefix}.bn_scale", (c,)),
                         take(f"{prefix}.bn_shift", (c,)), bits, float(spec.v0), stride)

    out = []
    for b in indices:
        stage, w_in, w_out, stride = spec.block_geometry(b)
        edge = spec.is_edge_conv(2 * b + 2)
        i, j = 2 * b + 1, 2 * b + 2
        if edge:
            c1, c2 = qconv(f"conv{i}", w_out, w_in, stride), qconv(f"conv{j}", w_out, w_out, 1)
        else:
            c1 = fconv(f"conv{i}", w_out, w_in, 3, stride, 1, False)
            c2 = fconv(f"conv{j}", w_out, w_out, 3, 1, 1, False)
        if stride == 1:
            sc = Shortcut("identity")
        elif spec.shortcut == "zero_pad":
            sc = Shortcut("zero_pad", pad_channels=w_in // 2)
        else:
            sc = Shortcut("conv1x1", conv=fconv(f"shortcut{b}", w_out, w_in, 1, 2, 0, edge))
        side_in = IMAGE_SHAPE[1] >> (stage - (1 if stride == 2 else 0))
        out.append(Block(b, stage, edge, c1, c2, sc, (w_in, side_in, side_in),
                         spec.block_output_shape(b)))
    return out


def _no_extra(path: str, archive, used: set) -> None:
    extra = sorted(set(archive.names) - used - {META_KEY})
    if extra:
        raise ArtifactError(f"{path}: unexpected array(s) {extra[:5]}", where=path)


@dataclasses.dataclass(frozen=True)
class Part:
    """One side of a split: the prepared model of that side and the artifact's metadata."""
    model: Model
    meta: dict

    @property
    def model_id(self) -> str:
        return self.meta["model_id"]

    @property
    def feature_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of a cloud-bound sample's features: the output of the last edge block (or
        of the stem when M = 0)."""
        spec = self.meta["spec"]
        n = self.meta["edge_blocks"]
        return spec.block_output_shape(n - 1) if n else (16, 32, 32)


def load_edge(path: str) -> Part:
    """The edge half: stem, edge blocks and exits (head None)."""
    meta, arrays = _read(path, EDGE_FORMAT)
    spec, used = meta["spec"], set()
    stem = FloatConv("stem", _take(path, arrays, "stem.weight", (16, 3, 3, 3)),
                     _take(path, arrays, "stem.bn_scale", (16,)),
                     _take(path, arrays, "stem.bn_shift", (16,)), 1, 1, True)
    used.update({"stem.weight", "stem.bn_scale", "stem.bn_shift"})
    blocks = _blocks(path, spec, arrays, range(meta["edge_blocks"]), used)
    exits = []
    for k, e in enumerate(spec.exits):
        b = e.after_conv // 2 - 1
        feats = spec.exit_features(e.after_conv)
        w = _take(path, arrays, f"exit{k}.weight", (spec.num_classes, feats))
        bias = _take(path, arrays, f"exit{k}.bias", (spec.num_classes,))
        used.update({f"exit{k}.weight", f"exit{k}.bias"})
        exits.append(Linear(f"exit{k}", w, bias, 3, spec.block_output_shape(b), b,
                            float(e.threshold), True))
    _no_extra(path, arrays, used)
    _check_energy(path, meta, len(exits) + 1)
    model = Model(spec, np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32),
                  stem, blocks, exits, None)
    return Part(model, meta)


def load_cloud(path: str) -> Part:
    """The cloud half: the cloud blocks (in order) and the head (stem None, no exits)."""
    meta, arrays = _read(path, CLOUD_FORMAT)
    spec, used = meta["spec"], set()
    blocks = _blocks(path, spec, arrays, range(meta["edge_blocks"], spec.num_blocks), used)
    last = spec.num_blocks - 1
    head = Linear("head", _take(path, arrays, "head.weight", (spec.num_classes, 64)),
                  _take(path, arrays, "head.bias", (spec.num_classes,)), 0,
                  spec.block_output_shape(last), last, 0.0, False)
    used.update({"head.weight", "head.bias"})
    _no_extra(path, arrays, used)
    model = Model(spec, np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32),
                  None, blocks, [], head)
    return Part(model, meta)


# ------------------------------------------------------------------------------ command

def add_arguments(ap) -> None:
    from . import cli, paths
    cli.add_weights(ap)
    ap.add_argument("--out", required=True, type=paths.output_dir(),
                    help="folder for edge.npz and cloud.npz (created if missing)")
    cli.add_json(ap, "the report")


def io_paths(args) -> dict:
    """The two artifacts ``--out`` receives, for :func:`xnorcdl.paths.check_io`."""
    return {"outputs": [("--out", os.path.join(args.out, n), False)
                        for n in ("edge.npz", "cloud.npz")]}


def run(args) -> int:
    from . import cli
    from .report import emit_json
    rep = split(args.weights, args.out)
    out = cli.text_out(args)
    print(f"model id  {rep['model_id']}", file=out)
    print(f"edge      {rep['edge']}: {rep['edge_bytes']} bytes (the same layers in float32: "
          f"{rep['edge_float32_bytes']} bytes)", file=out)
    print(f"cloud     {rep['cloud']}: {rep['cloud_bytes']} bytes", file=out)
    return emit_json(rep, args.json) if args.json else 0


def main(argv=None) -> int:
    import sys
    from . import cli
    return cli.run(sys.modules[__name__], argv, "python -m xnorcdl split")


if __name__ == "__main__":
    import sys
    sys.exit(main())
