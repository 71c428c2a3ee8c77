"""The hybrid ResNet as prepared layer objects (paper section II.A, Fig. 1-3).

:func:`build_model` turns a validated description and its arrays into layers whose parameters
are ready to run: BatchNorm reduced to one float32 scale and shift per channel, edge weights
reduced to integer codes and one float32 output scale per filter (eq. 2-3). Every backend
executes these same objects, and the operation counter reads them.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np

from .spec import IMAGE_SHAPE, ModelSpec


@dataclasses.dataclass(frozen=True)
class FloatConv:
    """float32 conv followed by inference BN: ``BN(conv(x, weight))`` (stem, cloud, 1x1 shortcut)."""
    name: str
    weight: np.ndarray          # [O, C, k, k] float32
    bn_scale: np.ndarray        # [O]
    bn_shift: np.ndarray        # [O]
    stride: int
    pad: int
    edge: bool

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return self.weight.shape


@dataclasses.dataclass(frozen=True)
class QuantConv:
    """QuanConv of Fig. 2: ``s[o] * sum(Q_a(BN(x)) * Q_w(W))`` over a 3x3, pad-1 window (eq. 1-3).

    ``w_codes`` are the integer weight codes (in {-1, +1} for 1 bit, odd in [-Z, Z] otherwise);
    ``out_scale`` is s[o] = alpha[o] (v0/Z)^2, see :func:`xnorcdl.quant.output_scale`.
    """
    name: str
    w_codes: np.ndarray         # [O, C, 3, 3] int8
    out_scale: np.ndarray       # [O] float32
    bn_scale: np.ndarray        # [C] float32, BN on the input channels
    bn_shift: np.ndarray        # [C]
    bits: int
    v0: float
    stride: int
    pad: int = 1
    edge: bool = True

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return self.w_codes.shape


@dataclasses.dataclass(frozen=True)
class Shortcut:
    """``identity``, ``zero_pad`` (x[:, ::2, ::2] plus pad_channels zero channels on each side)
    or ``conv1x1`` (a strided :class:`FloatConv`)."""
    kind: str
    pad_channels: int = 0
    conv: Optional[FloatConv] = None


@dataclasses.dataclass(frozen=True)
class Block:
    """Residual block b: convs 2b+1 and 2b+2; ``edge`` blocks are quantized and have no ReLU."""
    index: int
    stage: int
    edge: bool
    conv1: object               # QuantConv (edge) or FloatConv (cloud)
    conv2: object
    shortcut: Shortcut
    in_shape: Tuple[int, int, int]
    out_shape: Tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Linear:
    """An exit or the head: pooling then ``weight @ f + bias``.

    ``pool`` is 3 for an early exit (avg pool kernel 3 stride 3, floor, flatten (c, h, w)) and 0
    for the head (global average pool).
    """
    name: str
    weight: np.ndarray          # [classes, features] float32
    bias: np.ndarray            # [classes]
    pool: int
    in_shape: Tuple[int, int, int]
    after_block: int
    threshold: float = 0.0
    edge: bool = True


@dataclasses.dataclass(frozen=True)
class Model:
    spec: ModelSpec
    mean: np.ndarray            # [3] float32
    std: np.ndarray             # [3] float32
    stem: FloatConv
    blocks: List[Block]
    exits: List[Linear]
    head: Linear

    @property
    def edge_blocks(self) -> int:
        return self.spec.edge_convs // 2


def bn_affine(arrays: Dict[str, np.ndarray], prefix: str, eps: float):
    """BN(x) = x * scale + shift, scale = gamma / sqrt(var + eps), shift = beta - mean * scale."""
    g, b = arrays[f"{prefix}.bn.gamma"], arrays[f"{prefix}.bn.beta"]
    m, v = arrays[f"{prefix}.bn.mean"], arrays[f"{prefix}.bn.var"]
    scale = g.astype(np.float64) / np.sqrt(v.astype(np.float64) + eps)
    shift = b.astype(np.float64) - m.astype(np.float64) * scale
    return scale.astype(np.float32), shift.astype(np.float32)


def _float_conv(arrays, prefix, w_name, stride, pad, eps, edge) -> FloatConv:
    scale, shift = bn_affine(arrays, prefix, eps)
    w = np.ascontiguousarray(arrays[w_name], dtype=np.float32)
    return FloatConv(prefix, w, scale, shift, stride, pad, edge)


def _quant_conv(arrays, prefix, stride, spec: ModelSpec) -> QuantConv:
    scale, shift = bn_affine(arrays, prefix, spec.bn_eps)
    w = arrays[f"{prefix}.weight"]
    from . import quant  # imports the jitted quantizers: only when a quantized conv is built
    return QuantConv(prefix, quant.codes(w, spec.edge_bits, spec.v0),
                     quant.output_scale(w, spec.edge_bits, spec.v0), scale, shift,
                     spec.edge_bits, float(spec.v0), stride)


def build_model(spec: ModelSpec, arrays: Dict[str, np.ndarray]) -> Model:
    """Prepare every layer once (codes, scales, BN affine): nothing is recomputed per sample."""
    eps = spec.bn_eps
    stem = _float_conv(arrays, "stem", "stem.conv.weight", 1, 1, eps, True)
    blocks = []
    for b in range(spec.num_blocks):
        stage, w_in, w_out, stride = spec.block_geometry(b)
        edge = spec.is_edge_conv(2 * b + 2)
        i, j = 2 * b + 1, 2 * b + 2
        if edge:
            c1 = _quant_conv(arrays, f"conv{i}", stride, spec)
            c2 = _quant_conv(arrays, f"conv{j}", 1, spec)
        else:
            c1 = _float_conv(arrays, f"conv{i}", f"conv{i}.weight", stride, 1, eps, False)
            c2 = _float_conv(arrays, f"conv{j}", f"conv{j}.weight", 1, 1, eps, False)
        if stride == 1:
            sc = Shortcut("identity")
        elif spec.shortcut == "zero_pad":
            sc = Shortcut("zero_pad", pad_channels=w_in // 2)
        else:
            sc = Shortcut("conv1x1", conv=_float_conv(
                arrays, f"shortcut{b}", f"shortcut{b}.conv.weight", 2, 0, eps, edge))
        side_in = IMAGE_SHAPE[1] >> (stage - (1 if stride == 2 else 0))
        blocks.append(Block(b, stage, edge, c1, c2, sc, (w_in, side_in, side_in),
                            spec.block_output_shape(b)))
    exits = []
    for k, e in enumerate(spec.exits):
        b = e.after_conv // 2 - 1
        exits.append(Linear(f"exit{k}", arrays[f"exit{k}.weight"], arrays[f"exit{k}.bias"], 3,
                            spec.block_output_shape(b), b, float(e.threshold), True))
    last = spec.num_blocks - 1
    head = Linear("head", arrays["head.weight"], arrays["head.bias"], 0,
                  spec.block_output_shape(last), last, 0.0, spec.is_edge_conv(spec.num_convs))
    return Model(spec, np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32),
                 stem, blocks, exits, head)


def load_model(path: str) -> Model:
    """Load, validate and prepare a weights file."""
    from .format import load_weights
    spec, arrays = load_weights(path)
    return build_model(spec, arrays)
