"""The network description of a weights file (docs/FORMAT.md) and the arrays it implies.

A :class:`ModelSpec` is the parsed ``meta.json``; :func:`expected_arrays` derives from it the
name, shape and meaning of every array the file must hold, so that the loader, the writer, the
model builder and the training export all agree on one list.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

from .errors import WeightsError

FORMAT_NAME = "xnorcdl-weights"
FORMAT_VERSION = 1
ARCH = "resnet-cifar"
EDGE_BITS = (1, 2, 4)
SHORTCUTS = ("zero_pad", "conv1x1")
STEM_WIDTH = 16
IMAGE_SHAPE = (3, 32, 32)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
#: limits that keep a description's arrays (and the memory a loader needs) bounded
MAX_DEPTH = 1202            # ResNet-1202, n = 200: about 19 M parameters
MAX_CLASSES = 1000
MAX_EXITS = 3 * ((MAX_DEPTH - 2) // 6)
MAX_ABS = 1e6               # largest magnitude of a quantizer constant, mean or std
MIN_V0, MAX_V0 = 1e-6, 1e6
MIN_STD = 1e-6
MAX_EPS = 1.0


class SpecError(WeightsError):
    """A description that breaks a rule of docs/FORMAT.md; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ExitSpec:
    after_conv: int
    threshold: float


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    depth: int = 32
    num_classes: int = 10
    edge_convs: int = 0
    edge_bits: int = 1
    v0: float = 1.0
    v1: float = 2.0
    v2: float = 0.5
    shortcut: str = "zero_pad"
    exits: Tuple[ExitSpec, ...] = ()
    mean: Tuple[float, float, float] = CIFAR10_MEAN
    std: Tuple[float, float, float] = CIFAR10_STD
    bn_eps: float = 1e-5
    provenance: Optional[dict] = None

    # ---- derived geometry -------------------------------------------------
    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6

    @property
    def num_blocks(self) -> int:
        return 3 * self.blocks_per_stage

    @property
    def num_convs(self) -> int:
        return 2 * self.num_blocks

    def block_geometry(self, b: int) -> Tuple[int, int, int, int]:
        """(stage, in width, out width, stride) of block ``b`` (0-based)."""
        n = self.blocks_per_stage
        s = b // n
        w_out = STEM_WIDTH << s
        first = b % n == 0 and s > 0
        w_in = w_out // 2 if first else w_out
        return s, w_in, w_out, 2 if first else 1

    def block_output_shape(self, b: int) -> Tuple[int, int, int]:
        s, _, w_out, _ = self.block_geometry(b)
        side = IMAGE_SHAPE[1] >> s
        return w_out, side, side

    def is_edge_conv(self, i: int) -> bool:
        return i <= self.edge_convs

    def exit_features(self, after_conv: int) -> int:
        c, h, w = self.block_output_shape(after_conv // 2 - 1)
        return c * (h // 3) * (w // 3)

    def with_thresholds(self, thresholds: List[float]) -> "ModelSpec":
        if len(thresholds) != len(self.exits):
            raise SpecError(
                f"{len(thresholds)} threshold(s) given for {len(self.exits)} exit(s)")
        exits = tuple(ExitSpec(e.after_conv, float(t)) for e, t in zip(self.exits, thresholds))
        out = dataclasses.replace(self, exits=exits)
        out.validate()
        return out

    # ---- validation -------------------------------------------------------
    def validate(self) -> None:
        """Check every field exactly (a bool is not an int, a float is not an int) and within
        the ranges of docs/FORMAT.md; :class:`SpecError` names the field."""
        def need(ok: bool, field: str, expected: str, got) -> None:
            if not ok:
                raise SpecError(f"field '{field}': expected {expected}, got {got!r}")

        def integer(v) -> bool:  # JSON gives int, float or bool: only an int is an integer
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v, lo: float = -MAX_ABS, hi: float = MAX_ABS) -> bool:
            return (isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) and lo <= v <= hi)

        need(integer(self.depth) and 8 <= self.depth <= MAX_DEPTH and (self.depth - 2) % 6 == 0,
             "depth", f"an integer 6n+2 with 1 <= n <= {(MAX_DEPTH - 2) // 6} (8, 14, 20, 32, ...)",
             self.depth)
        need(integer(self.num_classes) and 2 <= self.num_classes <= MAX_CLASSES,
             "num_classes", f"an integer in [2, {MAX_CLASSES}]", self.num_classes)
        need(integer(self.edge_convs) and 0 <= self.edge_convs <= self.num_convs
             and self.edge_convs % 2 == 0, "edge_convs",
             f"an even integer in [0, {self.num_convs}] (the split must fall between residual blocks)",
             self.edge_convs)
        need(integer(self.edge_bits) and self.edge_bits in EDGE_BITS, "edge_bits",
             "the integer 1, 2 or 4", self.edge_bits)
        for name in ("v0", "v1", "v2"):
            v = getattr(self, name)
            need(number(v), f"quantizer.{name}", f"a finite number within +-{MAX_ABS:g}", v)
        need(MIN_V0 <= self.v0 <= MAX_V0 and math.isclose(self.v1, 2 * self.v0)
             and math.isclose(self.v2, 0.5), "quantizer",
             f"a symmetric quantizer: {MIN_V0:g} <= v0 <= {MAX_V0:g}, v1 = 2*v0, v2 = 0.5",
             {"v0": self.v0, "v1": self.v1, "v2": self.v2})
        need(type(self.shortcut) is str and self.shortcut in SHORTCUTS, "shortcut",
             " or ".join(SHORTCUTS), self.shortcut)
        need(isinstance(self.exits, (tuple, list))
             and all(isinstance(e, ExitSpec) for e in self.exits), "exits", "a list of exits",
             self.exits)
        previous = 0
        for k, e in enumerate(self.exits):
            need(integer(e.after_conv) and e.after_conv % 2 == 0
                 and 2 <= e.after_conv <= self.edge_convs and e.after_conv > previous,
                 f"exits[{k}].after_conv",
                 f"an even integer conv index in [2, edge_convs={self.edge_convs}], after the "
                 "previous exit", e.after_conv)
            need(number(e.threshold, 0.0, math.inf), f"exits[{k}].threshold",
                 "a finite number >= 0 (nats)", e.threshold)
            previous = e.after_conv
        for name in ("mean", "std"):
            v = getattr(self, name)
            need(isinstance(v, (tuple, list)) and len(v) == 3 and all(number(x) for x in v),
                 f"normalize.{name}", f"3 finite numbers within +-{MAX_ABS:g}", v)
        need(all(MIN_STD <= s <= MAX_ABS for s in self.std), "normalize.std",
             f"3 numbers in [{MIN_STD:g}, {MAX_ABS:g}]", self.std)
        need(number(self.bn_eps) and 0 < self.bn_eps <= MAX_EPS, "bn_eps",
             f"a finite number in (0, {MAX_EPS:g}]", self.bn_eps)
        prov = self.provenance
        need(prov is None or isinstance(prov, dict), "provenance", "an object", prov)
        if prov:
            for key, kinds, expected in (("partial", (dict, type(None)), "an object or null"),
                                         ("recalibrations", (list,), "a list"),
                                         ("strategy", (str,), "a string")):
                if key in prov:
                    need(isinstance(prov[key], kinds), f"provenance.{key}", expected, prov[key])

    # ---- JSON -------------------------------------------------------------
    def to_json_dict(self) -> dict:
        d = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "arch": ARCH,
            "depth": self.depth, "num_classes": self.num_classes,
            "edge_convs": self.edge_convs, "edge_bits": self.edge_bits,
            "quantizer": {"v0": self.v0, "v1": self.v1, "v2": self.v2},
            "shortcut": self.shortcut,
            "exits": [{"after_conv": e.after_conv, "threshold": e.threshold} for e in self.exits],
            "normalize": {"mean": list(self.mean), "std": list(self.std)},
            "bn_eps": self.bn_eps,
        }
        if self.provenance is not None:
            d["provenance"] = self.provenance
        return d

    @classmethod
    def from_json_dict(cls, d) -> "ModelSpec":
        """The description of a decoded ``meta.json``, every field checked
        (:meth:`validate`); :class:`SpecError` names the field."""
        if type(d) is not dict:
            raise SpecError(f"description: expected a JSON object, got {type(d).__name__}")
        for field, want in (("format", FORMAT_NAME), ("arch", ARCH)):
            if type(d.get(field)) is not str or d.get(field) != want:
                raise SpecError(f"field '{field}': expected {want!r}, got {d.get(field)!r}")
        if type(d.get("version")) is not int or d.get("version") != FORMAT_VERSION:
            raise SpecError(
                f"field 'version': this engine reads version {FORMAT_VERSION}, got "
                f"{d.get('version')!r}; re-export the weights or use a matching xnorcdl release")
        known = {"format", "version", "arch", "depth", "num_classes", "edge_convs", "edge_bits",
                 "quantizer", "shortcut", "exits", "normalize", "bn_eps", "provenance"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError(f"unknown field(s) {unknown}; known fields: {sorted(known)}")
        missing = sorted(known - {"provenance"} - set(d))
        if missing:
            raise SpecError(f"missing field(s) {missing}")
        q = _object(d["quantizer"], "quantizer", ("v0", "v1", "v2"))
        norm = _object(d["normalize"], "normalize", ("mean", "std"))
        exits = d["exits"]
        if type(exits) is not list or len(exits) > MAX_EXITS:
            raise SpecError(f"field 'exits': expected a list of at most {MAX_EXITS} exits, got "
                            f"{_short(exits)}")
        exits = tuple(ExitSpec(*_object(e, f"exits[{k}]", ("after_conv", "threshold")).values())
                      for k, e in enumerate(exits))
        for name in ("mean", "std"):
            if type(norm[name]) is not list:
                raise SpecError(f"field 'normalize.{name}': expected a list of 3 numbers, got "
                                f"{_short(norm[name])}")
        spec = cls(depth=d["depth"], num_classes=d["num_classes"],
                   edge_convs=d["edge_convs"], edge_bits=d["edge_bits"],
                   v0=q["v0"], v1=q["v1"], v2=q["v2"], shortcut=d["shortcut"], exits=exits,
                   mean=tuple(norm["mean"]), std=tuple(norm["std"]),
                   bn_eps=d["bn_eps"], provenance=d.get("provenance"))
        spec.validate()
        return spec


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _object(v, field: str, keys: Tuple[str, ...]) -> dict:
    """``v`` as an object holding exactly ``keys`` (in that order)."""
    if type(v) is not dict or set(v) != set(keys):
        raise SpecError(f"field '{field}': expected an object with keys {list(keys)}, got "
                        f"{_short(v)}")
    return {k: v[k] for k in keys}

def _bn(prefix: str, channels: int, where: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    return {f"{prefix}.bn.{p}": ((channels,), f"BatchNorm {p} {where}")
            for p in ("gamma", "beta", "mean", "var")}


def expected_arrays(spec: ModelSpec) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """Every float32 array the file must hold: ``{name: (shape, meaning)}``."""
    out: Dict[str, Tuple[Tuple[int, ...], str]] = {
        "stem.conv.weight": ((STEM_WIDTH, 3, 3, 3), "stem conv [out, in, kh, kw]")}
    out.update(_bn("stem", STEM_WIDTH, "after the stem conv"))
    for b in range(spec.num_blocks):
        _, w_in, w_out, stride = spec.block_geometry(b)
        for i, cin in ((2 * b + 1, w_in), (2 * b + 2, w_out)):
            edge = spec.is_edge_conv(i)
            out[f"conv{i}.weight"] = ((w_out, cin, 3, 3),
                                      f"{'edge (latent real)' if edge else 'cloud'} conv {i}")
            out.update(_bn(f"conv{i}", cin if edge else w_out,
                           "before the quantized conv" if edge else "after the conv"))
        if stride == 2 and spec.shortcut == "conv1x1":
            out[f"shortcut{b}.conv.weight"] = ((w_out, w_in, 1, 1), f"1x1 shortcut of block {b}")
            out.update(_bn(f"shortcut{b}", w_out, "after the 1x1 shortcut"))
    for k, e in enumerate(spec.exits):
        f = spec.exit_features(e.after_conv)
        out[f"exit{k}.weight"] = ((spec.num_classes, f), f"exit {k} linear after conv {e.after_conv}")
        out[f"exit{k}.bias"] = ((spec.num_classes,), f"exit {k} bias")
    out["head.weight"] = ((spec.num_classes, STEM_WIDTH * 4), "head linear")
    out["head.bias"] = ((spec.num_classes,), "head bias")
    return out
