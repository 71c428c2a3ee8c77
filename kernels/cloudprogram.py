"""The cloud blocks of a network and its head as one jitted call.

Called from Python, a cloud block costs several microseconds besides its convs (the argument
checks, the dispatch of its 27 arguments, the output's allocation), and the head (global
average pool and the final linear layer) about 10 us in NumPy at batch 1: together a tenth of
the cloud's time at batch 1 on a 2.6 GHz Zen 4. Here the blocks' weights are slices of one
float32 pool and their scratch slices of one float32 and one int64 work pool per chunk size,
each slice described inline in a row of an ``int64`` table by ``(offset, d0, d1, d2, d3)``;
:func:`run_cloud` runs blocks ``first .. stop-1`` (and the head) on every chunk of a batch in
one call, each block through the :func:`~xnorcdl.kernels.cloudblock.block_chunk` that
:class:`~xnorcdl.kernels.cloudblock.CloudBlock` calls on the same buffers, so the blocks'
outputs are CloudBlock's bit for bit. The head is the exits' pool and fixed-order linear
(:func:`~xnorcdl.kernels.exits.avg_pool_flat` with one window over the whole H x H image, then
:data:`~xnorcdl.kernels.ordered.ordered_linear`): within float32 rounding of the reference's
head (NumPy's mean and matmul, another summation order), the bound every cloud layer is held
to.

Each block runs on the chunks of :data:`~xnorcdl.kernels.cloudblock.CHUNK` samples in turn,
as CloudBlock does, before the next block (at batch 32, running the five blocks of a chunk in a
row measured 1.7 % slower: the blocks' weights, 1.3 MB, do not stay in L2); a batch that is not
a whole number of chunks takes a second call for the rest (its own work pools). A program is not for concurrent use (its work pools are shared by its calls).
"""
from __future__ import annotations

import numpy as np

from .cloudblock import CHUNK, CloudBlock, block_chunk
from .exits import avg_pool_flat
from .jit import numba
from .ordered import ordered_linear, pad_classes
from .shapes import out_size

# fields of a block row: its sizes, then (offset, d0, d1, d2, d3) per weight array
STRIDE, KIND, PAD, HO, WO, O_N = range(6)
W1, W1T, B1, W2T, B2, WSC, AP1, AP2 = (6 + 5 * i for i in range(8))
FIELDS = 6 + 5 * 8
# a work row of one chunk size: conv1's and conv2's output row lengths, then (offset, dims)
# per scratch array (BOFF1, BOFF2 in the int64 pool)
ROW1, ROW2 = 0, 1
XP, COLS1, COLS_SC, T1, TP, T2, SC, BOFF1, BOFF2 = (2 + 5 * i for i in range(9))
WORK_FIELDS = 2 + 5 * 9


@numba.njit(cache=True, nogil=True, inline="always")
def _v1(pool, row, f):
    return pool[row[f]:row[f] + row[f + 1]]


@numba.njit(cache=True, nogil=True, inline="always")
def _v2(pool, row, f):
    a, b = row[f + 1], row[f + 2]
    return pool[row[f]:row[f] + a * b].reshape((a, b))


@numba.njit(cache=True, nogil=True, inline="always")
def _v3(pool, row, f):
    a, b, c = row[f + 1], row[f + 2], row[f + 3]
    return pool[row[f]:row[f] + a * b * c].reshape((a, b, c))


@numba.njit(cache=True, nogil=True, inline="always")
def _v4(pool, row, f):
    a, b, c, d = row[f + 1], row[f + 2], row[f + 3], row[f + 4]
    return pool[row[f]:row[f] + a * b * c * d].reshape((a, b, c, d))


@numba.njit(cache=True, nogil=True, inline="always")
def _samples(x, a, nc):
    """Samples ``a .. a+nc-1`` of a C-contiguous ``[N, C, H, W]`` array, as a C-layout view."""
    size = x.shape[1] * x.shape[2] * x.shape[3]
    return x.reshape(x.size)[a * size:(a + nc) * size].reshape(
        (nc, x.shape[1], x.shape[2], x.shape[3]))


@numba.njit(cache=True, nogil=True)
def head_into(a, weight_t, bias, logits):
    """The head on a ``[N, C, H, H]``: the global average pool in the exits' window order,
    then ``logits = f weight_t + bias`` summed in feature order (``weight_t`` the ``[C, O']``
    transpose of the layer's weight, classes padded by :func:`~xnorcdl.kernels.ordered.pad_classes`)."""
    f = np.empty((a.shape[0], a.shape[1]), np.float32)
    avg_pool_flat(a, a.shape[2], f)
    return ordered_linear(f, weight_t, bias, logits)


@numba.njit(cache=True, nogil=True)
def run_cloud(sgemm, meta, f32, work_meta, wk, wk64, first, stop, nc, x, out, head_wt, head_b,
              logits, head):
    """Blocks ``first .. stop-1`` (rows of ``meta``) on x ``[N, C, H, W]`` (N a multiple of
    nc), the last block's output into ``out``; then, where ``head``, the head into ``logits
    [N, classes]``. Block after block, each on every chunk of nc samples in turn (so a block's
    weights stay in cache over the batch); every block's scratch is the slices of ``wk`` /
    ``wk64`` that ``work_meta`` (this chunk size's) describes, the activations between blocks
    two buffers of the whole batch."""
    n_s = x.shape[0]
    most = 0
    for r in range(first, stop - 1):
        most = max(most, meta[r, O_N] * meta[r, HO] * meta[r, WO])
    mid = np.empty((2, n_s * most), np.float32)
    src = x
    for r in range(first, stop):
        m, k = meta[r], work_meta[r]
        if r == stop - 1:
            dst = out
        else:
            size = m[O_N] * m[HO] * m[WO]
            dst = mid[(r - first) % 2, :n_s * size].reshape((n_s, m[O_N], m[HO], m[WO]))
        for a in range(0, n_s, nc):
            block_chunk(sgemm, _samples(src, a, nc), m[STRIDE], m[KIND], m[PAD],
                        _v2(f32, m, W1), _v3(f32, m, W1T), _v1(f32, m, B1), _v3(f32, m, W2T),
                        _v1(f32, m, B2), _v2(f32, m, WSC), _v3(wk, k, XP), _v3(wk, k, COLS1),
                        _v3(wk, k, COLS_SC), _v3(wk, k, T1), _v3(wk, k, TP), _v3(wk, k, T2),
                        _v3(wk, k, SC), k[ROW1], m[HO], m[WO], _samples(dst, a, nc),
                        _v3(f32, m, AP1), _v1(wk64, k, BOFF1), _v3(f32, m, AP2),
                        _v1(wk64, k, BOFF2), k[ROW2])
        src = dst
    if head:
        head_into(out, head_wt, head_b, logits)
    return out


class _Pool:
    """Arrays laid end to end in one flat pool; ``put`` returns ``(offset, d0, d1, d2, d3)``."""

    def __init__(self, dtype):
        self.dtype, self.parts, self.size = dtype, [], 0

    def put(self, arr):
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        field = [self.size] + list(arr.shape) + [1] * (4 - arr.ndim)
        self.parts.append(arr.reshape(-1))
        self.size += arr.size
        return field

    def array(self):
        return np.concatenate(self.parts) if self.parts else np.zeros(1, self.dtype)


class CloudProgram:
    """``CloudProgram(blocks, head_weight, head_bias)``: the :class:`CloudBlock` s of a
    network's cloud (in order, each the input of the next) and its head ``[classes, C]``,
    ``[classes]``. ``run(first, stop, x, head)`` -> (output of block stop-1, head logits or
    None): blocks ``first .. stop-1`` of this list, one or two jitted calls."""

    def __init__(self, blocks, head_weight, head_bias, in_shape):
        if not blocks or not all(isinstance(b, CloudBlock) for b in blocks):
            raise ValueError("blocks: expected one or more CloudBlock")
        if blocks[0]._sgemm is None:
            raise ValueError("a cloud program calls NumPy's sgemm from jitted code; none found")
        self.blocks = list(blocks)
        self.sgemm = blocks[0]._sgemm
        self.shapes = [tuple(int(v) for v in in_shape)]    # (C, H, W) into each block, then out
        pool, rows = _Pool(np.float32), []
        for blk in self.blocks:
            c, h, w = self.shapes[-1]
            if c != blk.in_channels:
                raise ValueError(f"blocks: {blk.in_channels} input channels after {c}")
            ho, wo = out_size(h, 3, blk.stride, 1), out_size(w, 3, blk.stride, 1)
            row = [blk.stride, blk.kind, blk.pad_channels, ho, wo, blk.out_channels]
            wsc = blk._no_wsc if blk.wsc is None else blk.wsc
            for arr in (blk.w1, blk.w1_taps, blk.b1, blk.w2_taps, blk.b2, wsc, blk.ap1,
                        blk.ap2):
                row += pool.put(arr)
            rows.append(row)
            self.shapes.append((blk.out_channels, ho, wo))
        self.meta = np.array(rows, np.int64).reshape(-1, FIELDS)
        self.f32 = pool.array()
        head_w = np.asarray(head_weight, dtype=np.float32)
        c, h, w = self.shapes[-1]
        if head_w.ndim != 2 or head_w.shape[1] != c:
            raise ValueError(f"head_weight: expected [classes, {c}], got {head_w.shape}")
        if h != w:
            raise ValueError(f"blocks: the head pools a square image, got {h} x {w}")
        self.classes = head_w.shape[0]
        self.head_wt = pad_classes(np.ascontiguousarray(head_w.T))
        self.head_b = np.ascontiguousarray(head_bias, dtype=np.float32)
        self._no_logits = np.zeros((1, self.classes), np.float32)   # run() without the head
        self._work = {}

    def _work_for(self, nc):
        """(work rows, float32 pool, int64 pool) for chunks of nc samples, made once: each
        block's :meth:`CloudBlock.new_scratch` copied into the pools (their zero borders and
        row of ones included)."""
        got = self._work.get(nc)
        if got is None:
            fp, ip, rows = _Pool(np.float32), _Pool(np.int64), []
            for r, blk in enumerate(self.blocks):
                b = blk.new_scratch((nc,) + self.shapes[r])
                row = [b["row1"], b["row2"]]
                for key in ("xp", "cols1", "cols_sc", "t1", "tp", "t2", "sc"):
                    row += fp.put(b[key])
                row += ip.put(b["boff1"]) + ip.put(b["boff2"])
                rows.append(row)
            got = self._work[nc] = (np.array(rows, np.int64).reshape(-1, WORK_FIELDS),
                                    fp.array(), ip.array())
        return got

    def run(self, first, stop, x, head=False):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != self.shapes[first]:
            raise ValueError(f"x: expected float32 [N, {', '.join(map(str, self.shapes[first]))}"
                             f"], got shape {x.shape}")
        n = x.shape[0]
        out = np.empty((n,) + self.shapes[stop], np.float32)
        logits = np.empty((n, self.classes), np.float32) if head else None
        full = n - n % CHUNK
        for a, b, nc in ((0, full, CHUNK), (full, n, n - full)):
            if b > a:
                work_meta, wk, wk64 = self._work_for(nc)
                run_cloud(self.sgemm, self.meta, self.f32, work_meta, wk, wk64, first, stop, nc,
                          x[a:b], out[a:b], self.head_wt, self.head_b,
                          logits[a:b] if head else self._no_logits, head)
        return out, logits
