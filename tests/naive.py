"""An independent, straightforward forward pass written from docs/FORMAT.md alone.

It reads the raw arrays (not the prepared layers of xnorcdl.model), quantizes with the paper's
equations in float64, convolves by direct shift-and-add loops over output channels, input channels
and kernel taps, and runs Algorithm 1 one sample at a time. Slow, small and obvious on purpose.
"""
import math

import numpy as np


def bn(x, a, prefix, eps):
    g, b, m, v = (a[f"{prefix}.bn.{p}"].astype(np.float64) for p in ("gamma", "beta", "mean", "var"))
    return (x - m[:, None, None]) / np.sqrt(v[:, None, None] + eps) * g[:, None, None] + b[:, None, None]


def conv(x, w, stride, pad):
    """Direct convolution of one sample x [C, H, W] with w [O, C, k, k]: loops over c, i, j,
    each adding one shifted input plane times one weight per output channel."""
    c, h, wd = x.shape
    o, _, k, _ = w.shape
    xp = np.zeros((c, h + 2 * pad, wd + 2 * pad))
    xp[:, pad:pad + h, pad:pad + wd] = x
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((o, ho, wo))
    for ic in range(c):
        for i in range(k):
            for j in range(k):
                plane = xp[ic, i:i + stride * ho:stride, j:j + stride * wo:stride]
                out += w[:, ic, i, j, None, None] * plane[None]
    return out


def quantize(v, bits, v0, v1, v2):
    """eq. (1)/(3) with clipping to [-v0, v0]; sign with sign(0) = +1 for one bit."""
    if bits == 1:
        return np.where(v >= 0, 1.0, -1.0)
    z = 2 ** bits - 1
    vc = np.clip(v, -v0, v0)
    return v1 * (np.floor((vc + v0) / v1 * z + 0.5) / z - v2)


def qconv(x, a, i, stride, meta):
    q = meta["quantizer"]
    bits = meta["edge_bits"]
    w = a[f"conv{i}.weight"].astype(np.float64)
    alpha = np.abs(w).reshape(w.shape[0], -1).sum(axis=1) / (w[0].size)  # eq. (2): ||W||_1 / n
    xq = quantize(bn(x, a, f"conv{i}", meta["bn_eps"]), bits, q["v0"], q["v1"], q["v2"])
    wq = quantize(w, bits, q["v0"], q["v1"], q["v2"])
    return conv(xq, wq, stride, 1) * alpha[:, None, None]


def fconv(x, a, prefix, wname, stride, pad, eps):
    return bn(conv(x, a[wname].astype(np.float64), stride, pad), a, prefix, eps)


def forward(meta, a, image):
    """Algorithm 1 for one uint8 image [3, 32, 32]: (logits, exit index or -1, entropies)."""
    eps = meta["bn_eps"]
    n = (meta["depth"] - 2) // 6
    mean = np.array(meta["normalize"]["mean"])[:, None, None]
    std = np.array(meta["normalize"]["std"])[:, None, None]
    x = (image / 255.0 - mean) / std
    x = np.maximum(fconv(x, a, "stem", "stem.conv.weight", 1, 1, eps), 0)
    exits = {e["after_conv"]: (k, e["threshold"]) for k, e in enumerate(meta["exits"])}
    entropies = []
    for b in range(3 * n):
        i, j = 2 * b + 1, 2 * b + 2
        down = b % n == 0 and b > 0
        stride = 2 if down else 1
        if not down:
            sc = x
        elif meta["shortcut"] == "zero_pad":
            p = x.shape[0] // 2
            sub = x[:, ::2, ::2]
            sc = np.concatenate([np.zeros((p,) + sub.shape[1:]), sub, np.zeros((p,) + sub.shape[1:])])
        else:
            sc = fconv(x, a, f"shortcut{b}", f"shortcut{b}.conv.weight", 2, 0, eps)
        if j <= meta["edge_convs"]:
            x = qconv(qconv(x, a, i, stride, meta), a, j, 1, meta) + sc
        else:
            t = np.maximum(fconv(x, a, f"conv{i}", f"conv{i}.weight", stride, 1, eps), 0)
            x = np.maximum(fconv(t, a, f"conv{j}", f"conv{j}.weight", 1, 1, eps) + sc, 0)
        if j in exits:
            k, thr = exits[j]
            c, h, w = x.shape
            pooled = np.zeros((c, h // 3, w // 3))
            for r in range(h // 3):
                for s in range(w // 3):
                    pooled[:, r, s] = x[:, 3 * r:3 * r + 3, 3 * s:3 * s + 3].mean(axis=(1, 2))
            logits = a[f"exit{k}.weight"] @ pooled.reshape(-1) + a[f"exit{k}.bias"]
            p = np.exp(logits - logits.max())
            p /= p.sum()
            h_ = -sum(pc * math.log(pc) for pc in p if pc > 0)
            entropies.append(h_)
            if h_ < thr:
                return logits, k, entropies
    logits = a["head.weight"] @ x.mean(axis=(1, 2)) + a["head.bias"]
    return logits, -1, entropies
