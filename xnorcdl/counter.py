"""Exact static operation, parameter and memory counts per layer, per sample (paper section III).

The paper prices inference by "multiplying the number of full-precision and binary operations with
corresponding energy listed in Table I". This module produces those numbers, one
:class:`LayerCount` per layer of the prepared :class:`~xnorcdl.model.Model` (the same objects every
executor runs), in the order Algorithm 1 runs them. Nothing here depends on the data: what a sample
costs depends only on where it left (:func:`sample_counts`). Every rule, with its formula, is in
docs/COUNTING.md; the short version:

* a **MAC** is one multiply-accumulate of one weight with one input value. ``macs_valid`` counts
  only taps that fall inside the input (zero padding contributes nothing, the kernels need not
  do it); ``macs_dense`` counts every tap of the padded window (Larq's "weights x output pixels").
  MAC precision = max(input bits, weight bits), as in Larq: p for an edge conv, 32 otherwise.
* BatchNorm (inference) is one 32-bit multiply and one 32-bit add per element (``mul32``,
  ``add32``); with Table I a multiply is priced as MAC minus add, so BN costs one MAC's energy.
* ``cmp32`` counts comparisons (ReLU, sign, clipping, max, the exit threshold),
  ``special32`` exp, log and divide (softmax and entropy at the exits).
* memory traffic is compulsory traffic per sample: every parameter read once at its stored bits,
  every activation read once and written once at its stored bits (float32 residual stream,
  p-bit packed codes for quantized conv operands, uint8 pixels).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .engine import FINAL
from .kernels.shapes import out_size
from .model import Block, FloatConv, Linear, Model, QuantConv, Shortcut
from .spec import IMAGE_SHAPE

FLOAT_BITS = 32     # float32 activations, float weights, BN scale/shift, output scales
PIXEL_BITS = 8      # uint8 input pixels

EDGE, CLOUD = "edge", "cloud"

#: integer fields of :class:`LayerCount` that add up over layers and samples
COUNT_FIELDS = ("params", "param_bits", "macs_dense", "macs_valid", "add32", "mul32", "cmp32",
                "special32", "read_bits", "write_bits", "relu", "quantize", "softmax", "entropy")


@dataclasses.dataclass(frozen=True)
class LayerCount:
    """What one layer does for one sample. Integers, exact; rules in docs/COUNTING.md.

    ``precision`` is the bit-depth of the layer's arithmetic (its MACs: max(input, weight) bits).
    ``block`` is the residual block the row belongs to (-1: stem, num_blocks: head; an exit carries
    the block it reads), ``exit`` the exit index for exit rows (else -1).
    """
    name: str
    kind: str                   # stem, conv, qconv, relu, shortcut, add, exit, head
    placement: str              # edge or cloud
    precision: int
    output_shape: Tuple[int, ...]
    block: int = -1
    exit: int = -1
    params: int = 0             # parameters the layer holds (as prepared: BN as scale + shift)
    param_bits: int = 0         # their storage, bits; also the weight traffic per sample
    macs_dense: int = 0         # every tap of the padded window
    macs_valid: int = 0         # taps inside the input
    add32: int = 0
    mul32: int = 0
    cmp32: int = 0
    special32: int = 0          # exp, log, divide
    read_bits: int = 0          # activations read
    write_bits: int = 0         # activations written
    relu: int = 0               # elements through a ReLU
    quantize: int = 0           # elements quantized (sign for p = 1, eq. (1) for p > 1)
    softmax: int = 0            # class probabilities computed
    entropy: int = 0            # entropies computed

    @property
    def memory_bits(self) -> int:
        """Weights read + activations read + activations written, bits per sample."""
        return self.param_bits + self.read_bits + self.write_bits

    def macs(self, convention: str = "valid") -> int:
        if convention not in ("valid", "dense"):
            raise ValueError(f"MAC convention: expected 'valid' or 'dense', got {convention!r}")
        return self.macs_valid if convention == "valid" else self.macs_dense

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output_shape"] = list(self.output_shape)
        d["memory_bits"] = self.memory_bits
        return d


# ---- geometry ---------------------------------------------------------------------------------

def valid_taps_1d(size: int, k: int, stride: int, pad: int) -> int:
    """Pairs (output position o, tap t) whose input index o*s - p + t lies in [0, size).

    Closed form per tap t: o runs from ceil((p - t) / s) to floor((size - 1 + p - t) / s), clipped
    to [0, out - 1]. In 2-D the valid taps factor: valid(H) * valid(W). For 3x3, pad 1, stride 1
    this is 3n - 2 (the two border rows each lose one tap).
    """
    n_out = out_size(size, k, stride, pad)
    total = 0
    for t in range(k):
        lo = max(0, -((t - pad) // stride))          # ceil((p - t) / s)
        hi = min(n_out - 1, (size - 1 + pad - t) // stride)
        total += max(0, hi - lo + 1)
    return total


def touched_1d(size: int, k: int, stride: int, pad: int) -> int:
    """Input indices in [0, size) read by at least one valid tap (1x1 stride 2: half of them)."""
    n_out = out_size(size, k, stride, pad)
    seen = np.zeros(size, dtype=bool)
    for t in range(k):
        idx = np.arange(n_out) * stride - pad + t
        seen[idx[(idx >= 0) & (idx < size)]] = True
    return int(seen.sum())


# ---- layers -----------------------------------------------------------------------------------

def _float_conv(conv_shape, stride: int, pad: int, in_shape, name: str, kind: str,
                placement: str, block: int) -> LayerCount:
    """float32 conv + BN over the O output channels (stem, cloud convs, 1x1 shortcut)."""
    o, c, kh, kw = conv_shape
    _, h, w = in_shape
    ho, wo = out_size(h, kh, stride, pad), out_size(w, kw, stride, pad)
    out_el = o * ho * wo
    params = o * c * kh * kw + 2 * o                       # weights + BN scale, shift
    return LayerCount(
        name, kind, placement, FLOAT_BITS, (o, ho, wo), block=block,
        params=params, param_bits=FLOAT_BITS * params,
        macs_dense=o * c * kh * kw * ho * wo,
        macs_valid=o * c * valid_taps_1d(h, kh, stride, pad) * valid_taps_1d(w, kw, stride, pad),
        add32=out_el, mul32=out_el,                        # BN: x * scale + shift per output
        read_bits=FLOAT_BITS * c * touched_1d(h, kh, stride, pad) * touched_1d(w, kw, stride, pad),
        write_bits=FLOAT_BITS * out_el)


def _quant_conv(layer: QuantConv, in_shape, placement: str, block: int) -> LayerCount:
    """QuanConv of Fig. 2: BN on the C input channels, quantize (eq. 1), p-bit conv, s[o] scale.

    The float32 input is read once, BN'd and quantized into a p-bit packed buffer (written once,
    read once by the conv); the float32 output is written once.
    """
    o, c, kh, kw = layer.shape
    p, s, pad = layer.bits, layer.stride, layer.pad
    _, h, w = in_shape
    ho, wo = out_size(h, kh, s, pad), out_size(w, kw, s, pad)
    in_el = c * touched_1d(h, kh, s, pad) * touched_1d(w, kw, s, pad)
    out_el = o * ho * wo
    if p == 1:      # sign: one comparison with 0
        q_cmp, q_add, q_mul = 1, 0, 0
    else:           # clip (2 cmp), (y + v0) * Z/v1 (add, mul), + 1/2 (add); floor: int convert
        q_cmp, q_add, q_mul = 2, 2, 1
    codes = o * c * kh * kw
    return LayerCount(
        layer.name, "qconv", placement, p, (o, ho, wo), block=block,
        params=codes + o + 2 * c,                          # codes + s[o] + BN scale, shift
        param_bits=p * codes + FLOAT_BITS * (o + 2 * c),
        macs_dense=codes * ho * wo,
        macs_valid=o * c * valid_taps_1d(h, kh, s, pad) * valid_taps_1d(w, kw, s, pad),
        add32=in_el * (1 + q_add), mul32=in_el * (1 + q_mul) + out_el, cmp32=in_el * q_cmp,
        quantize=in_el,
        read_bits=(FLOAT_BITS + p) * in_el, write_bits=p * in_el + FLOAT_BITS * out_el)


def conv_counts(layer, in_shape, placement: str = EDGE, block: int = -1,
                full_precision: bool = False) -> LayerCount:
    """Counts of one conv layer object (:class:`QuantConv` or :class:`FloatConv`, with its BN) on
    an input of ``in_shape`` (C, H, W); ``full_precision`` counts a QuantConv as float32."""
    if isinstance(layer, QuantConv):
        if full_precision:
            return _float_conv(layer.shape, layer.stride, layer.pad, in_shape, layer.name, "conv",
                               placement, block)
        return _quant_conv(layer, in_shape, placement, block)
    if isinstance(layer, FloatConv):
        return _float_conv(layer.shape, layer.stride, layer.pad, in_shape, layer.name, "conv",
                           placement, block)
    raise TypeError(f"cannot count a layer of type {type(layer).__name__}")


def _relu(name: str, shape, placement: str, block: int) -> LayerCount:
    """max(x, 0): one comparison per element, applied as the producing layer writes (no traffic)."""
    n = int(np.prod(shape))
    return LayerCount(name, "relu", placement, FLOAT_BITS, tuple(shape), block=block,
                      cmp32=n, relu=n)


def _stem(model: Model, placement: str) -> LayerCount:
    """Normalisation folded to one multiply-add per pixel, float conv + BN; reads uint8 pixels."""
    st = model.stem
    c, h, w = IMAGE_SHAPE
    base = _float_conv(st.shape, st.stride, st.pad, (c, h, w), "stem", "stem", placement, -1)
    pixels = c * h * w
    norm = 2 * c                                           # per-channel scale and shift
    return dataclasses.replace(
        base, params=base.params + norm, param_bits=base.param_bits + FLOAT_BITS * norm,
        add32=base.add32 + pixels, mul32=base.mul32 + pixels, read_bits=PIXEL_BITS * pixels)


def _shortcut(sc: Shortcut, blk: Block, placement: str) -> Tuple[LayerCount, int]:
    """The shortcut row and the number of elements it contributes to the residual add."""
    name = f"block{blk.index}.shortcut"
    o, ho, wo = blk.out_shape
    if sc.kind == "identity":
        return LayerCount(name, "shortcut", placement, FLOAT_BITS, blk.in_shape,
                          block=blk.index), int(np.prod(blk.in_shape))
    if sc.kind == "zero_pad":   # x[:, ::2, ::2] read and written; the zero channels never exist
        c_in = blk.in_shape[0]
        n = c_in * ho * wo
        return LayerCount(name, "shortcut", placement, FLOAT_BITS, (o, ho, wo), block=blk.index,
                          read_bits=FLOAT_BITS * n, write_bits=FLOAT_BITS * n), n
    if sc.kind == "conv1x1":
        row = _float_conv(sc.conv.shape, sc.conv.stride, sc.conv.pad, blk.in_shape, name,
                          "shortcut", placement, blk.index)
        return row, o * ho * wo
    raise ValueError(f"cannot count shortcut kind {sc.kind!r}")


def _block(blk: Block, full_precision: bool) -> List[LayerCount]:
    placement = CLOUD if full_precision or not blk.edge else EDGE
    cloud_style = full_precision or not blk.edge
    b = blk.index
    rows = [conv_counts(blk.conv1, blk.in_shape, placement, b, full_precision)]
    if cloud_style:
        rows.append(_relu(f"{blk.conv1.name}.relu", rows[0].output_shape, placement, b))
    rows.append(conv_counts(blk.conv2, rows[0].output_shape, placement, b, full_precision))
    sc_row, sc_elements = _shortcut(blk.shortcut, blk, placement)
    rows.append(sc_row)
    out_el = int(np.prod(blk.out_shape))
    rows.append(LayerCount(f"block{b}.add", "add", placement, FLOAT_BITS, blk.out_shape, block=b,
                           add32=sc_elements, read_bits=FLOAT_BITS * (out_el + sc_elements),
                           write_bits=FLOAT_BITS * out_el))
    if cloud_style:
        rows.append(_relu(f"block{b}.relu", blk.out_shape, placement, b))
    return rows


def softmax_entropy_ops(classes: int) -> Dict[str, int]:
    """Ops of the exit rule on C logits, as xnorcdl.engine.entropy computes it.

    m = max l (C-1 cmp); z = l - m (C add); e = exp z (C special); s = sum e (C-1 add);
    p = e / s (C special); H = log s (1 special) - sum p z (C mul, C-1 add; 1 add);
    H = max(H, 0) (1 cmp); H < threshold (1 cmp).
    """
    c = classes
    return {"cmp32": c + 1, "add32": 3 * c - 1, "mul32": c, "special32": 2 * c + 1}


def _linear(layer: Linear, k: int, placement: str, block: int) -> LayerCount:
    """Early exit (avg pool 3/3, floor; linear; softmax + entropy + threshold) or head
    (global average pool; linear; argmax)."""
    c, h, w = layer.in_shape
    classes, features = layer.weight.shape
    params = classes * features + classes
    if layer.pool:
        ph, pw = h // layer.pool, w // layer.pool
        pooled = c * ph * pw
        window = layer.pool * layer.pool
        ops = softmax_entropy_ops(classes)
        read = c * (ph * layer.pool) * (pw * layer.pool)       # floor mode drops the border
        kind, extra = "exit", dict(softmax=classes, entropy=1)
    else:
        pooled, window = c, h * w
        ops = {"cmp32": classes - 1, "add32": 0, "mul32": 0, "special32": 0}     # argmax
        read = c * h * w
        kind, extra = "head", {}
    if pooled != features:
        raise ValueError(f"{layer.name}: {features} features but pooling gives {pooled}")
    macs = classes * features
    return LayerCount(
        layer.name, kind, placement, FLOAT_BITS, (classes,), block=block, exit=k,
        params=params, param_bits=FLOAT_BITS * params, macs_dense=macs, macs_valid=macs,
        add32=pooled * (window - 1) + classes + ops["add32"],      # pool sums, bias, softmax
        mul32=pooled + ops["mul32"],                                # pool: x (1 / window)
        cmp32=ops["cmp32"], special32=ops["special32"],
        read_bits=FLOAT_BITS * read, write_bits=FLOAT_BITS * classes, **extra)


# ---- the network ------------------------------------------------------------------------------

def layer_counts(model: Model, full_precision: bool = False, exits: bool = True
                 ) -> List[LayerCount]:
    """One row per layer in the order Algorithm 1 runs them: stem, blocks (with each exit right
    after the block it reads), head.

    ``full_precision=True`` counts the same network as the paper's baseline, a full-precision
    standalone network: every conv float32 with BN after it and ReLUs (cloud blocks), all rows
    placed in the cloud; use with ``exits=False`` for the "no exits" baseline.
    """
    if not isinstance(model, Model):
        raise TypeError(f"layer_counts needs an xnorcdl.model.Model, got {type(model).__name__}")
    rows = [_stem(model, CLOUD if full_precision else EDGE)]
    rows.append(_relu("stem.relu", rows[0].output_shape, rows[0].placement, -1))
    by_block: Dict[int, List[int]] = {}
    for k, e in enumerate(model.exits):
        by_block.setdefault(e.after_block, []).append(k)
    for blk in model.blocks:
        rows.extend(_block(blk, full_precision))
        if exits:
            for k in by_block.get(blk.index, ()):
                e = model.exits[k]
                rows.append(_linear(e, k, CLOUD if full_precision else (EDGE if e.edge else CLOUD),
                                    blk.index))
    head = model.head
    rows.append(_linear(head, -1, CLOUD if full_precision or not head.edge else EDGE,
                        len(model.blocks)))
    return rows


def outcome_masks(model: Model, rows: Sequence[LayerCount]) -> np.ndarray:
    """bool ``[K + 1, L]``: row l runs for a sample with outcome o (o = k: left at exit k;
    o = K: continued to the head). Exit k at block B runs the stem, blocks 0..B and exits 0..k."""
    n_exits = len(model.exits)
    masks = np.zeros((n_exits + 1, len(rows)), dtype=bool)
    for k, e in enumerate(model.exits):
        for i, r in enumerate(rows):
            if r.kind == "exit":
                masks[k, i] = r.exit <= k
            elif r.kind != "head":
                masks[k, i] = r.block <= e.after_block
    masks[n_exits, :] = True
    return masks


def outcome_index(model: Model, exit_index) -> np.ndarray:
    """Map engine exit indices (k, or FINAL = -1) to outcome rows (k, or K); validates them."""
    idx = np.asarray(exit_index)
    n_exits = len(model.exits)
    if idx.ndim != 1:
        raise ValueError(f"exit_index: expected a 1-D array, got shape {list(idx.shape)}")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"exit_index: expected integers (exit k or {FINAL}), got {idx.dtype}")
    idx = idx.astype(np.int64)
    bad = (idx < FINAL) | (idx >= n_exits)
    if bad.any():
        raise ValueError(f"exit_index: value {int(idx[bad][0])} is neither an exit of this model "
                         f"(0..{n_exits - 1}) nor {FINAL} (continued to the head)")
    return np.where(idx == FINAL, n_exits, idx)


def total(rows: Sequence[LayerCount]) -> Dict[str, int]:
    """Sum of every count field over ``rows``, plus MACs split by precision."""
    out = {f: sum(getattr(r, f) for r in rows) for f in COUNT_FIELDS}
    out["memory_bits"] = sum(r.memory_bits for r in rows)
    for conv in ("valid", "dense"):
        by_p: Dict[str, int] = {}
        for r in rows:
            m = r.macs(conv)
            if m:
                by_p[str(r.precision)] = by_p.get(str(r.precision), 0) + m
        out[f"macs_{conv}_by_bits"] = dict(sorted(by_p.items(), key=lambda kv: int(kv[0])))
    return out


def sample_counts(model: Model, exit_index: int, rows: Optional[Sequence[LayerCount]] = None
                  ) -> List[LayerCount]:
    """The rows one sample ran: exit k (or FINAL for a sample that continued to the head)."""
    rows = layer_counts(model) if rows is None else rows
    o = int(outcome_index(model, np.array([exit_index]))[0])
    mask = outcome_masks(model, rows)[o]
    return [r for r, m in zip(rows, mask) if m]


def edge_output_bytes(model: Model) -> int:
    """Bytes a cloud-bound sample sends: the float32 output of the last edge layer (the last edge
    block, or the stem when M = 0); 0 when the whole network is at the edge."""
    if model.head.edge:
        return 0
    n_edge = model.edge_blocks
    if n_edge:
        shape = model.blocks[n_edge - 1].out_shape
    else:
        shape = (model.stem.shape[0],) + IMAGE_SHAPE[1:]
    return int(np.prod(shape)) * FLOAT_BITS // 8
