"""The whole edge of a network as one jitted call: a flat *program* of prepared layers.

Calling each edge kernel from Python costs a few microseconds per layer (argument checks,
dispatch, temporaries), about a third of the edge path at batch 1. Here the layers of the edge
(normalization + stem, binary blocks, k-bit convs, shortcut additions, exits) are rows of an
``int64`` table ``meta [n_ops, FIELDS]``, their parameters slices of six flat pools (float32,
float64, uint64, int32, int16, uint8), and :func:`run_program` runs rows ``first .. stop-1``
for every sample of a batch in one call, on three activation buffers and work buffers (float32,
uint8 nibble planes, int16 counts) allocated once per program. The table and the pools have the
same types for every network, so one compiled (cached) version serves every weights file.

Every row calls the jitted kernel the per-layer path calls (:mod:`~xnorcdl.kernels.binaryblock`,
:mod:`~xnorcdl.kernels.bitconv`, :mod:`~xnorcdl.kernels.codeconv`, :mod:`~xnorcdl.kernels.ordered`,
:mod:`~xnorcdl.kernels.exits`, :mod:`~xnorcdl.kernels.normalize`) on views of those buffers,
so a program's outputs are those of the per-layer kernels bit for bit, and through them the
reference's. The exits' entropies are left to the caller (NumPy's ``exp`` and ``log``, whose
last bits the reference's decisions depend on; a jitted libm call may differ on some machines).

Rows (field 0 is the opcode; ``src``/``dst`` name one of the three activation buffers):

=============  ==========================================================================
``STEM``       uint8 images -> normalize -> fixed-order 3x3 conv (on the padded images, no
               im2col) -> BN -> ReLU, into dst
``BINARY``     a fused binary block (``binary_block_forward``); a 1x1-conv shortcut is computed
               first, in the fixed order, into the work buffer
``NIBBLE``     the same block by nibble tables (``nibble_block_forward``); each
               geometry's nibble planes have their own region of the uint8 work buffer, so
               their padding bytes, zeroed once, stay 0
``WORDS``      the same block on pixel words (``word_block_forward``), its planes of 16-,
               32- or 64-bit words in the uint8 work buffer like the nibble planes
``QUANT``      one k-bit conv, bit planes (``bitconv_forward``) or direct int16 codes
               (``codeconv_forward``), src -> dst
``ADD``        dst += shortcut(x) of a k-bit block (identity, zero-pad, fixed-order 1x1 conv)
``EXIT``       pooled fixed-order linear of src into ``logits[n, slot]``
=============  ==========================================================================
"""
from __future__ import annotations

import numpy as np

from .binaryblock import binary_block_forward
from .nibbleblock import NibbleBlock, nibble_block_forward
from .nibbleconv import geometry as nibble_geometry, geometry_jit
from .wordblock import WordBlock, word_block_forward
from .bitconv import bitconv_forward
from .codeconv import codeconv_forward, phase_geometry
from .exits import avg_pool_flat
from .gemmconv import affine_channels, im2col, pad_images
from .jit import numba
from .normalize import normalize_into
from .ordered import ordered_conv3x3, ordered_gemm, ordered_linear
from .quantize import batchnorm

STEM, BINARY, QUANT, ADD, EXIT, NIBBLE, WORDS = 1, 2, 3, 4, 5, 6, 7
_POOLS = (np.float32, np.float64, np.uint64, np.int32, np.int16, np.uint8)
FIELDS = 40
# common fields
OP, SRC, DST, C_IN, H, W, O_N, HO, WO, STRIDE = range(10)
# per-op fields from 10 on (offsets are element offsets into a pool)
F0 = 10


@numba.njit(cache=True, nogil=True, inline="always")
def _f32(pool, off, n):
    return pool[off:off + n]


@numba.njit(cache=True, nogil=True, inline="always")
def _copy(dst, src):
    """dst[:] = src for two 1-d arrays, as a loop: Numba's slice assignment first copies src to
    a temporary in case the two overlap (2.8x slower for the 64 KB activations here)."""
    for i in range(src.shape[0]):
        dst[i] = src[i]


@numba.njit(cache=True, nogil=True)
def _ordered_conv(x, f32, wk, m, o, out):
    """The fixed-order float32 conv + BN of a row (``m[o:o+6]``: k, pad, off_w, off_scale,
    off_shift, relu) on x ``[1, C, H, W]`` into out ``[1, O, Ho, Wo]``, scratch from wk."""
    _, c_in, h, w = x.shape
    o_n, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    k, pad = m[o], m[o + 1]
    hp, wp = h + 2 * pad, w + 2 * pad
    kk = c_in * k * k
    xp = wk[:c_in * hp * wp].reshape(1, c_in, hp, wp)
    cols = wk[c_in * hp * wp:c_in * hp * wp + kk * ho * wo].reshape(1, kk, ho * wo)
    if pad:
        pad_images(x, pad, xp)
        im2col(xp, k, m[STRIDE], ho, wo, cols)
    else:
        im2col(x, k, m[STRIDE], ho, wo, cols)
    y = out.reshape(1, o_n, ho * wo)
    ordered_gemm(_f32(f32, m[o + 2], o_n * kk).reshape(o_n, kk), cols, y)
    affine_channels(y, _f32(f32, m[o + 3], o_n), _f32(f32, m[o + 4], o_n), m[o + 5] != 0)
    return out


@numba.njit(cache=True, nogil=True)
def _words(x, f32, u64, i32, i16, m, given, xw1, xw2, acc, tmp64, tmpw, tmp32, y):
    """A WORDS row (fields in :meth:`EdgeProgram._add_word_block`) on planes of its types."""
    c_in, h, w = x.shape[1], x.shape[2], x.shape[3]
    o_n, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    stride = m[STRIDE]
    q1 = geometry_jit(h, w, stride, 64 // xw1.itemsize)[5]
    q2 = geometry_jit(ho, wo, 1, 64 // xw2.itemsize)[5]
    word_block_forward(
        x, _f32(f32, m[F0 + 1], c_in), _f32(f32, m[F0 + 2], c_in),
        u64[m[F0 + 3]:m[F0 + 3] + o_n * 9].reshape(o_n, 9), i32[m[F0 + 4]:m[F0 + 4] + 9],
        i16[m[F0 + 5]:m[F0 + 5] + o_n * q1].reshape(o_n, q1), i16[m[F0 + 6]:m[F0 + 6] + o_n],
        i16[m[F0 + 7]:m[F0 + 7] + o_n], stride,
        u64[m[F0 + 8]:m[F0 + 8] + o_n * 9].reshape(o_n, 9), i32[m[F0 + 9]:m[F0 + 9] + 9],
        i16[m[F0 + 10]:m[F0 + 10] + o_n * q2].reshape(o_n, q2), _f32(f32, m[F0 + 11], o_n),
        m[F0], m[F0 + 12], given, xw1, xw2, acc[:o_n * max(q1, q2)],
        tmp64.reshape(1, 1, h, w), tmpw, tmp32[:q2], y)


@numba.njit(cache=True, nogil=True)
def run_program(meta, f32, f64, u64, i32, i16, u8, first, stop, images, x_in, x_out, logits,
                bufs, wk, wk8, wk16):
    """Rows ``first .. stop-1`` of ``meta`` for each sample n.

    The input is ``images[n]`` (uint8) when row ``first`` is a STEM, else ``x_in[n]`` (float32,
    the src of row ``first``); the dst of row ``stop - 1`` (the last row that is not an EXIT) is
    copied to ``x_out[n]``; EXIT rows write ``logits[n, slot]``. ``bufs [3, L]``, ``wk``,
    ``wk8`` and ``wk16`` are the program's scratch (so a program is not for concurrent use)."""
    n_s = x_out.shape[0]
    last = stop - 1
    while meta[last, OP] == EXIT:
        last -= 1
    for n in range(n_s):
        if meta[first, OP] != STEM:
            m = meta[first]
            size = m[C_IN] * m[H] * m[W]
            _copy(bufs[m[SRC], :size], x_in[n].reshape(size))
        for r in range(first, stop):
            m = meta[r]
            op = m[OP]
            c_in, h, w, o_n, ho, wo = m[C_IN], m[H], m[W], m[O_N], m[HO], m[WO]
            x = bufs[m[SRC], :c_in * h * w].reshape(1, c_in, h, w)
            y = bufs[m[DST], :o_n * ho * wo].reshape(1, o_n, ho, wo)
            if op == STEM:
                # fields: off_mean, off_std, then the conv (k=3, pad=1, w, scale, shift, relu):
                # the fixed-order sums read the padded images directly (ordered_conv3x3)
                hp, wp = h + 2, w + 2
                xp = wk[:c_in * hp * wp].reshape(1, c_in, hp, wp)
                normalize_into(images[n:n + 1], _f32(f32, m[F0], c_in),
                               _f32(f32, m[F0 + 1], c_in), 1, xp)
                q_n = ho * wp
                base = c_in * hp * wp + 2
                acc = wk[base:base + o_n * q_n].reshape(o_n, q_n)
                ordered_conv3x3(_f32(f32, m[F0 + 4], o_n * c_in * 9).reshape(o_n, c_in * 9),
                                wk[:base], hp * wp, wp, q_n, acc)
                scale, shift = _f32(f32, m[F0 + 5], o_n), _f32(f32, m[F0 + 6], o_n)
                zero = np.float32(0.0)
                for o in range(o_n):
                    s, t = scale[o], shift[o]
                    for oy in range(ho):
                        src = acc[o, oy * wp:oy * wp + wo]
                        dst = y[0, o, oy]
                        for ox in range(wo):
                            dst[ox] = max(batchnorm(src[ox], s, t), zero)
            elif op == BINARY:
                # fields: kind, pad_ch, off_bn1s, off_bn1t, off_wp1, rw1, off_base1, off_lo,
                # off_hi, off_wp2, rw2, off_base2, off_s2, then the shortcut conv (6 fields)
                kind, rw1, rw2 = m[F0], m[F0 + 5], m[F0 + 10]
                p_n = ho * wo
                given = bufs[3 - m[SRC] - m[DST], :o_n * p_n].reshape(1, o_n, ho, wo)
                if kind == 2:
                    _ordered_conv(x, f32, wk, m, F0 + 13, given)
                binary_block_forward(
                    x, _f32(f32, m[F0 + 2], c_in), _f32(f32, m[F0 + 3], c_in),
                    u64[m[F0 + 4]:m[F0 + 4] + o_n * 3 * rw1].reshape(o_n, 1, 3, rw1),
                    i32[m[F0 + 6]:m[F0 + 6] + o_n * p_n].reshape(o_n, p_n),
                    i32[m[F0 + 7]:m[F0 + 7] + o_n], i32[m[F0 + 8]:m[F0 + 8] + o_n], m[STRIDE],
                    u64[m[F0 + 9]:m[F0 + 9] + o_n * 3 * rw2].reshape(o_n, 1, 3, rw2),
                    _f32(f32, m[F0 + 11], o_n * p_n).reshape(o_n, p_n),
                    _f32(f32, m[F0 + 12], o_n), kind, m[F0 + 1], given, y)
            elif op == NIBBLE:
                # fields: kind, off_bn1s, off_bn1t, off_lut1, terms1, off_offs1, off_base1, off_lo,
                # off_hi, off_lut2, terms2, off_offs2, off_base2, off_s2, pad_ch, off_xn1, n_xn1,
                # off_xn2, n_xn2, off_tmp8, n_tmp8, then the shortcut conv (6 fields); base1,
                # base2, lo, hi are int16. wk[:Q2] is free here (the shortcut conv has written
                # given).
                kind, t1, t2, stride = m[F0], m[F0 + 4], m[F0 + 10], m[STRIDE]
                q1 = geometry_jit(h, w, stride)[5]
                q2 = geometry_jit(ho, wo, 1)[5]
                given = bufs[3 - m[SRC] - m[DST], :o_n * ho * wo].reshape(1, o_n, ho, wo)
                if kind == 2:
                    _ordered_conv(x, f32, wk, m, F0 + 21, given)
                nibble_block_forward(
                    x, _f32(f32, m[F0 + 1], c_in), _f32(f32, m[F0 + 2], c_in),
                    u8[m[F0 + 3]:m[F0 + 3] + o_n * t1 * 16].reshape(o_n // 4, t1, 4, 16),
                    i32[m[F0 + 5]:m[F0 + 5] + t1],
                    i16[m[F0 + 6]:m[F0 + 6] + o_n * q1].reshape(o_n, q1),
                    i16[m[F0 + 7]:m[F0 + 7] + o_n], i16[m[F0 + 8]:m[F0 + 8] + o_n], stride,
                    u8[m[F0 + 9]:m[F0 + 9] + o_n * t2 * 16].reshape(o_n // 4, t2, 4, 16),
                    i32[m[F0 + 11]:m[F0 + 11] + t2],
                    i16[m[F0 + 12]:m[F0 + 12] + o_n * q2].reshape(o_n, q2),
                    _f32(f32, m[F0 + 13], o_n), kind, m[F0 + 14], given,
                    wk8[m[F0 + 15]:m[F0 + 15] + m[F0 + 16]],
                    wk8[m[F0 + 17]:m[F0 + 17] + m[F0 + 18]], wk16[:o_n * max(q1, q2)],
                    wk8[m[F0 + 19]:m[F0 + 19] + m[F0 + 20]], wk[:q2], y)
            elif op == WORDS:
                # fields: kind, off_bn1s, off_bn1t, off_wt1, off_offs1, off_base1, off_lo,
                # off_hi, off_wt2, off_offs2, off_base2, off_s2, pad_ch, bits1, bits2, then
                # (offset, bytes) in wk8 of xw1, xw2, tmpw, tmp64, then the shortcut conv
                given = bufs[3 - m[SRC] - m[DST], :o_n * ho * wo].reshape(1, o_n, ho, wo)
                if m[F0] == 2:
                    _ordered_conv(x, f32, wk, m, F0 + 23, given)
                b1, b2 = m[F0 + 13], m[F0 + 14]
                r1 = wk8[m[F0 + 15]:m[F0 + 15] + m[F0 + 16]]
                r2 = wk8[m[F0 + 17]:m[F0 + 17] + m[F0 + 18]]
                rw = wk8[m[F0 + 19]:m[F0 + 19] + m[F0 + 20]]
                t64 = wk8[m[F0 + 21]:m[F0 + 21] + m[F0 + 22]].view(np.uint64)
                if b1 == 16 and b2 == 16:
                    _words(x, f32, u64, i32, i16, m, given, r1.view(np.uint16),
                           r2.view(np.uint16), wk16, t64, rw.view(np.uint16), wk, y)
                elif b1 == 16:
                    _words(x, f32, u64, i32, i16, m, given, r1.view(np.uint16),
                           r2.view(np.uint32), wk16, t64, rw.view(np.uint32), wk, y)
                elif b1 == 32 and b2 == 32:
                    _words(x, f32, u64, i32, i16, m, given, r1.view(np.uint32),
                           r2.view(np.uint32), wk16, t64, rw.view(np.uint32), wk, y)
                elif b1 == 32:
                    _words(x, f32, u64, i32, i16, m, given, r1.view(np.uint32),
                           r2.view(np.uint64), wk16, t64, rw.view(np.uint64), wk, y)
                else:
                    _words(x, f32, u64, i32, i16, m, given, r1.view(np.uint64),
                           r2.view(np.uint64), wk16, t64, rw.view(np.uint64), wk, y)
            elif op == QUANT:
                # fields: kernel (0 planes, 1 direct), bits, off_bns, off_bnt, off_scale, off_v0 (f64),
                # planes: off_wp, rw, off_base; direct: off_w9, hq, wq, off_offs, src_len
                bits = m[F0 + 1]
                bns, bnt = _f32(f32, m[F0 + 2], c_in), _f32(f32, m[F0 + 3], c_in)
                sc = _f32(f32, m[F0 + 4], o_n)
                v0 = f64[m[F0 + 5]]
                if m[F0] == 0:
                    rw = m[F0 + 7]
                    wp = u64[m[F0 + 6]:m[F0 + 6] + o_n * bits * 3 * rw].reshape(o_n, bits, 3, rw)
                    base = _f32(f32, m[F0 + 8], o_n * ho * wo).reshape(o_n, ho * wo)
                    bitconv_forward(x, bns, bnt, bits, v0, wp, sc, m[STRIDE], base, y)
                else:
                    w9 = i16[m[F0 + 6]:m[F0 + 6] + o_n * c_in * 9].reshape(o_n, c_in, 9)
                    offs = i32[m[F0 + 9]:m[F0 + 9] + 9]
                    codeconv_forward(x, bns, bnt, bits, v0, m[STRIDE], w9, sc, m[F0 + 7],
                                     m[F0 + 8], offs, m[F0 + 10], y)
            elif op == ADD:
                # fields: kind (0 identity, 1 zero-pad, 2 conv), pad_ch, then the conv (6 fields)
                kind = m[F0]
                yf = y.reshape(o_n * ho * wo)
                if kind == 0:
                    xf = x.reshape(c_in * h * w)
                    for i in range(yf.shape[0]):
                        yf[i] += xf[i]
                elif kind == 1:
                    p = m[F0 + 1]
                    for c in range(c_in):
                        for oy in range(ho):
                            for ox in range(wo):
                                y[0, p + c, oy, ox] += x[0, c, 2 * oy, 2 * ox]
                else:
                    g = bufs[3 - m[SRC] - m[DST], :o_n * ho * wo]
                    _ordered_conv(x, f32, wk, m, F0 + 2, g.reshape(1, o_n, ho, wo))
                    for i in range(yf.shape[0]):
                        yf[i] += g[i]
            elif op == EXIT:
                # fields: slot, pool, features, classes, off_wt, off_bias, columns of wt
                k, feats, classes, ldw = m[F0 + 1], m[F0 + 2], m[F0 + 3], m[F0 + 6]
                f = wk[:feats].reshape(1, feats)
                avg_pool_flat(x, k, f)
                ordered_linear(f, _f32(f32, m[F0 + 4], feats * ldw).reshape(feats, ldw),
                               _f32(f32, m[F0 + 5], classes), logits[n, m[F0]:m[F0] + 1])
        m = meta[last]
        size = m[O_N] * m[HO] * m[WO]
        _copy(x_out[n].reshape(size), bufs[m[DST], :size])
    return x_out


class EdgeProgram:
    """A program under construction, then run: ``add_*`` append rows (each returns its row
    index) from prepared kernel objects, :meth:`finish` packs the pools, :meth:`run` runs rows.

    Activations live in three buffers; ``cur`` is the one holding the current layer's output.
    """

    def __init__(self):
        self._rows = []
        self._pools = {t: [] for t in _POOLS}
        self._sizes = dict.fromkeys(self._pools, 0)
        self._act, self._work, self._work16 = 1, 1, 1
        self._planes = {}          # key -> (offset, length) in the uint8 work buffer
        self._work8 = 0
        self.cur = 0
        self.exits = 0

    def _put(self, arr, dtype) -> int:
        arr = np.ascontiguousarray(arr, dtype=dtype).reshape(-1)
        off = self._sizes[dtype]
        self._pools[dtype].append(arr)
        self._sizes[dtype] += arr.size
        return off

    def _row(self, op, src, dst, c_in, h, w, o_n, ho, wo, stride, fields) -> int:
        row = [op, src, dst, c_in, h, w, o_n, ho, wo, stride] + [int(f) for f in fields]
        assert len(row) <= FIELDS
        row += [0] * (FIELDS - len(row))
        self._rows.append(row)
        self._act = max(self._act, c_in * h * w, o_n * ho * wo)
        return len(self._rows) - 1

    def _conv_fields(self, conv, relu):
        """(k, pad, off_w, off_scale, off_shift, relu) of a fixed-order FloatGemmConv."""
        return [conv.k, conv.pad, self._put(conv.wmat, np.float32),
                self._put(conv.bn_scale, np.float32), self._put(conv.bn_shift, np.float32),
                int(relu)]

    def _conv_work(self, c_in, h, w, conv, ho, wo):
        hp, wp = h + 2 * conv.pad, w + 2 * conv.pad
        self._work = max(self._work, c_in * hp * wp + c_in * conv.k * conv.k * ho * wo)

    def add_stem(self, normalize, conv, in_shape) -> int:
        c, h, w = in_shape
        _, o_n, ho, wo = conv.output_shape((1, c, h, w))
        fields = [self._put(normalize.mean, np.float32), self._put(normalize.std, np.float32),
                  0, 0] + self._conv_fields(conv, True)[2:5]
        self._work = max(self._work, c * (h + 2) * (w + 2) + 2 + o_n * ho * (w + 2))
        self.cur = 0
        return self._row(STEM, 0, 0, c, h, w, o_n, ho, wo, conv.stride, fields)

    def _plane_region(self, key, n) -> int:
        """Offset of the uint8 work buffer's region for ``key`` (a geometry and its role), n
        bytes; rows of the same key share it (nibble planes of one geometry keep their
        padding at 0 whichever row wrote the interior last)."""
        if key not in self._planes:
            self._planes[key] = (self._work8, n)
            self._work8 += -(-n // 64) * 64         # regions start on 64 bytes: word views
        return self._planes[key][0]

    def add_binary_block(self, block, shortcut_conv, in_shape) -> int:
        """A binary block: a NIBBLE row for a :class:`NibbleBlock` and a WORDS row for a
        :class:`WordBlock` that applies to it, else a BINARY row of the popcount block."""
        if isinstance(block, (NibbleBlock, WordBlock)):
            if block.applies:
                add = (self._add_word_block if isinstance(block, WordBlock)
                       else self._add_nibble_block)
                return add(block, shortcut_conv, in_shape)
            block = block.block
        c, h, w = in_shape
        c1, c2 = block.conv1, block.conv2
        ho, wo, base1, base2 = block._planes(h, w)
        src, dst = self.cur, (self.cur + 1) % 3
        fields = [block.kind, block.pad_channels, self._put(c1.bn_scale, np.float32),
                  self._put(c1.bn_shift, np.float32), self._put(c1.wp, np.uint64),
                  c1.wp.shape[3], self._put(base1, np.int32), self._put(block.lo, np.int32),
                  self._put(block.hi, np.int32), self._put(c2.wp, np.uint64), c2.wp.shape[3],
                  self._put(base2, np.float32), self._put(c2.out_scale, np.float32)]
        if shortcut_conv is not None:
            fields += self._conv_fields(shortcut_conv, False)
            self._conv_work(c, h, w, shortcut_conv, ho, wo)
        self.cur = dst
        return self._row(BINARY, src, dst, c, h, w, c1.out_channels, ho, wo, c1.stride, fields)

    def _add_nibble_block(self, nb, shortcut_conv, in_shape) -> int:
        c, h, w = in_shape
        b = nb.block
        c1, c2 = b.conv1, b.conv2
        o_n = c1.out_channels
        ho, wo = nibble_geometry(h, w, nb.stride)[:2]
        offs1, offs2, base1, base2 = nb.prepared(h, w)
        n1, n2, n_acc, n8, n32 = nb.scratch_sizes(h, w)
        src, dst = self.cur, (self.cur + 1) % 3
        fields = [nb.kind, self._put(c1.bn_scale, np.float32), self._put(c1.bn_shift, np.float32),
                  self._put(nb.lut1, np.uint8), len(offs1), self._put(offs1, np.int32),
                  self._put(base1, np.int16), self._put(nb.lo, np.int16),
                  self._put(nb.hi, np.int16), self._put(nb.lut2, np.uint8), len(offs2),
                  self._put(offs2, np.int32), self._put(base2, np.int16),
                  self._put(c2.out_scale, np.float32), nb.pad_channels,
                  self._plane_region((0, c, h, w, nb.stride), n1), n1,
                  self._plane_region((1, o_n, ho, wo), n2), n2,
                  self._plane_region((2, n8), n8), n8]
        if shortcut_conv is not None:
            fields += self._conv_fields(shortcut_conv, False)
            self._conv_work(c, h, w, shortcut_conv, ho, wo)
        self._work16 = max(self._work16, n_acc)
        self._work = max(self._work, n32)                  # the float32 rows of the epilogue
        self.cur = dst
        return self._row(NIBBLE, src, dst, c, h, w, o_n, ho, wo, nb.stride, fields)

    def _add_word_block(self, wb, shortcut_conv, in_shape) -> int:
        c, h, w = in_shape
        b = wb.block
        c1, c2 = b.conv1, b.conv2
        o_n = c1.out_channels
        ho, wo = nibble_geometry(h, w, wb.stride)[:2]
        offs1, offs2, base1, base2 = wb.prepared(h, w)
        n1, n2, n_acc, n_w, n32 = wb.scratch_sizes(h, w)
        b1, b2 = wb.bits
        src, dst = self.cur, (self.cur + 1) % 3
        fields = [wb.kind, self._put(c1.bn_scale, np.float32), self._put(c1.bn_shift, np.float32),
                  self._put(wb.wt1, np.uint64), self._put(offs1, np.int32),
                  self._put(base1, np.int16), self._put(wb.lo, np.int16),
                  self._put(wb.hi, np.int16), self._put(wb.wt2, np.uint64),
                  self._put(offs2, np.int32), self._put(base2, np.int16),
                  self._put(c2.out_scale, np.float32), wb.pad_channels, b1, b2]
        for key, n_bytes in (((3, b1, h, w, wb.stride), n1 * b1 // 8),
                             ((4, b2, ho, wo), n2 * b2 // 8), ((5, b2, n_w), n_w * b2 // 8),
                             ((6, h, w), 8 * h * w)):
            fields += [self._plane_region(key, n_bytes), n_bytes]
        if shortcut_conv is not None:
            fields += self._conv_fields(shortcut_conv, False)
            self._conv_work(c, h, w, shortcut_conv, ho, wo)
        self._work16 = max(self._work16, n_acc)
        self._work = max(self._work, n32)                  # the float32 rows of the epilogue
        self.cur = dst
        return self._row(WORDS, src, dst, c, h, w, o_n, ho, wo, wb.stride, fields)

    def add_quant_conv(self, conv, in_shape, src, dst) -> int:
        """A k-bit conv: a bit-plane :class:`~xnorcdl.kernels.bitconv.BitConv` or a
        :class:`~xnorcdl.kernels.codeconv.CodeConv`."""
        c, h, w = in_shape
        _, o_n, ho, wo = conv.output_shape((1, c, h, w))
        fields = [0, conv.bits, self._put(conv.bn_scale, np.float32),
                  self._put(conv.bn_shift, np.float32), self._put(conv.out_scale, np.float32),
                  self._put([conv.v0], np.float64)]
        if hasattr(conv, "wp"):
            fields += [self._put(conv.wp, np.uint64), conv.wp.shape[3],
                       self._put(conv.geometry(h, w)[2], np.float32)]
        else:
            hq, wq, offs, src_len = phase_geometry(h, w, conv.stride)
            fields[0] = 1
            fields += [self._put(conv.w9, np.int16), hq, wq, self._put(offs, np.int32), src_len]
        return self._row(QUANT, src, dst, c, h, w, o_n, ho, wo, conv.stride, fields)

    def add_quant_block(self, conv1, conv2, kind, pad_channels, shortcut_conv, in_shape) -> int:
        """conv2(conv1(x)) + shortcut(x): three rows (the index of the first is returned)."""
        x, t, y = self.cur, (self.cur + 1) % 3, (self.cur + 2) % 3
        c, h, w = in_shape
        _, o_n, ho, wo = conv1.output_shape((1, c, h, w))
        first = self.add_quant_conv(conv1, in_shape, x, t)
        self.add_quant_conv(conv2, (o_n, ho, wo), t, y)
        code = {"identity": 0, "zero_pad": 1, "conv1x1": 2}[kind]
        fields = [code, pad_channels]
        if shortcut_conv is not None:
            fields += self._conv_fields(shortcut_conv, False)
            self._conv_work(c, h, w, shortcut_conv, ho, wo)
        self._row(ADD, x, y, c, h, w, o_n, ho, wo, conv1.stride, fields)
        self.cur = y
        return first

    def add_exit(self, slot, exit_layer, in_shape) -> int:
        c, h, w = in_shape
        k = exit_layer.pool
        feats, ldw = exit_layer.weight_t.shape      # ldw >= classes (padded columns)
        classes = exit_layer.bias.shape[0]
        self._work = max(self._work, feats)
        self.exits = max(self.exits, slot + 1)
        self.classes = classes
        fields = [slot, k, feats, classes, self._put(exit_layer.weight_t, np.float32),
                  self._put(exit_layer.bias, np.float32), ldw]
        return self._row(EXIT, self.cur, self.cur, c, h, w, c, h, w, 1, fields)

    def finish(self) -> "EdgeProgram":
        self.meta = np.array(self._rows, np.int64).reshape(-1, FIELDS)
        pools = [np.concatenate(self._pools[t]) if self._pools[t] else np.zeros(1, t)
                 for t in _POOLS]
        self.f32, self.f64, self.u64, self.i32, self.i16, self.u8 = pools
        self.bufs = np.zeros((3, self._act), np.float32)
        self.wk = np.zeros(self._work, np.float32)
        self.wk8 = np.zeros(max(1, self._work8), np.uint8)     # nibble planes: padding stays 0
        self.wk16 = np.zeros(self._work16, np.int16)
        self._shapes = {}
        self._no_images = np.zeros((1, 1, 1, 1), np.uint8)    # the input run() was not given
        self._no_x = np.zeros((1, 1, 1, 1), np.float32)
        return self

    def output_shape(self, stop):
        """(C, H, W) of the activation after rows ``.. stop-1``."""
        shape = self._shapes.get(stop)
        if shape is None:
            last = stop - 1
            while self.meta[last, OP] == EXIT:
                last -= 1
            shape = self._shapes[stop] = tuple(int(v) for v in self.meta[last, [O_N, HO, WO]])
        return shape

    def run(self, first, stop, images=None, x=None):
        """(activation ``[N, C, H, W]`` after row stop-1, logits ``[N, exits, classes]``)."""
        n = len(images) if images is not None else len(x)
        out = np.empty((n,) + self.output_shape(stop), np.float32)
        logits = np.zeros((n, max(1, self.exits), getattr(self, "classes", 1)), np.float32)
        run_program(self.meta, self.f32, self.f64, self.u64, self.i32, self.i16, self.u8, first,
                    stop, self._no_images if images is None else images,
                    self._no_x if x is None else x, out, logits, self.bufs, self.wk, self.wk8,
                    self.wk16)
        return out, logits
