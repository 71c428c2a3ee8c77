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
        def need(ok: bool, field: str, expected: str, got) -> None:
            if not ok:
                raise SpecError(f"field '{field}': expected {expected}, got {got!r}")

        need(isinstance(self.depth, int) and self.depth >= 8 and (self.depth - 2) % 6 == 0,
             "depth", "an integer 6n+2 with n >= 1 (8, 14, 20, 32, ...)", self.depth)
        need(isinstance(self.num_classes, int) and self.num_classes >= 2,
             "num_classes", "an integer >= 2", self.num_classes)
        need(isinstance(self.edge_convs, int) and 0 <= self.edge_convs <= self.num_convs
             and self.edge_convs % 2 == 0, "edge_convs",
             f"an even integer in [0, {self.num_convs}] (the split must fall between residual blocks)",
             self.edge_convs)
        need(self.edge_bits in EDGE_BITS, "edge_bits", "1, 2 or 4", self.edge_bits)
        for name in ("v0", "v1", "v2"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v), f"quantizer.{name}",
                 "a finite number", v)
        need(self.v0 > 0 and math.isclose(self.v1, 2 * self.v0) and math.isclose(self.v2, 0.5),
             "quantizer", "a symmetric quantizer: v0 > 0, v1 = 2*v0, v2 = 0.5",
             {"v0": self.v0, "v1": self.v1, "v2": self.v2})
        need(self.shortcut in SHORTCUTS, "shortcut", " or ".join(SHORTCUTS), self.shortcut)
        previous = 0
        for k, e in enumerate(self.exits):
            need(isinstance(e.after_conv, int) and e.after_conv % 2 == 0
                 and 2 <= e.after_conv <= self.edge_convs and e.after_conv > previous,
                 f"exits[{k}].after_conv",
                 f"an even conv index in [2, edge_convs={self.edge_convs}], after the previous exit",
                 e.after_conv)
            need(isinstance(e.threshold, (int, float)) and math.isfinite(e.threshold)
                 and e.threshold >= 0, f"exits[{k}].threshold", "a finite number >= 0 (nats)",
                 e.threshold)
            previous = e.after_conv
        for name in ("mean", "std"):
            v = getattr(self, name)
            need(len(v) == 3 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v),
                 f"normalize.{name}", "3 finite numbers", v)
        need(all(s > 0 for s in self.std), "normalize.std", "3 positive numbers", self.std)
        need(isinstance(self.bn_eps, (int, float)) and self.bn_eps > 0, "bn_eps",
             "a positive number", self.bn_eps)

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
    def from_json_dict(cls, d: dict) -> "ModelSpec":
        if not isinstance(d, dict):
            raise SpecError(f"description: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT_NAME:
            raise SpecError(f"field 'format': expected {FORMAT_NAME!r}, got {d.get('format')!r}")
        if d.get("version") != FORMAT_VERSION:
            raise SpecError(
                f"field 'version': this engine reads version {FORMAT_VERSION}, got "
                f"{d.get('version')!r}; re-export the weights or use a matching xnorcdl release")
        if d.get("arch") != ARCH:
            raise SpecError(f"field 'arch': expected {ARCH!r}, got {d.get('arch')!r}")
        known = {"format", "version", "arch", "depth", "num_classes", "edge_convs", "edge_bits",
                 "quantizer", "shortcut", "exits", "normalize", "bn_eps", "provenance"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError(f"unknown field(s) {unknown}; known fields: {sorted(known)}")
        missing = sorted(known - {"provenance"} - set(d))
        if missing:
            raise SpecError(f"missing field(s) {missing}")
        try:
            q = d["quantizer"]
            exits = tuple(ExitSpec(e["after_conv"], e["threshold"]) for e in d["exits"])
            spec = cls(depth=d["depth"], num_classes=d["num_classes"],
                       edge_convs=d["edge_convs"], edge_bits=d["edge_bits"],
                       v0=q["v0"], v1=q["v1"], v2=q["v2"], shortcut=d["shortcut"], exits=exits,
                       mean=tuple(d["normalize"]["mean"]), std=tuple(d["normalize"]["std"]),
                       bn_eps=d["bn_eps"], provenance=d.get("provenance"))
        except (KeyError, TypeError) as exc:
            raise SpecError(f"malformed description: missing or ill-typed {exc}") from None
        spec.validate()
        return spec


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
