"""The training and validation images of the recipe, and their augmentation."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from xnorcdl.data import VAL_SIZE  # noqa: F401  (re-exported: the last training images, held out)


class Data:
    """CIFAR-10 train split as uint8 tensors: train = first 50000 - val_size, val = the rest."""

    def __init__(self, val_size: int, limit_train: Optional[int], limit_val: Optional[int],
                 synthetic: bool = False, seed: int = 0):
        if synthetic:
            g = np.random.default_rng(seed)
            n = (limit_train or 256) + (limit_val or 128)
            x = g.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
            y = g.integers(0, 10, n).astype(np.int64)
            val_size = limit_val or 128
            self.source = "synthetic random images (smoke test)"
        else:
            from xnorcdl.data import load_cifar10
            x, y = load_cifar10("train")
            self.source = (f"CIFAR-10 train split: images 0..{len(x) - val_size - 1} train, "
                           f"{len(x) - val_size}..{len(x) - 1} validation (never trained on)")
        n_tr = len(x) - val_size
        self.x_train = torch.from_numpy(np.ascontiguousarray(x[:n_tr]))
        self.y_train = torch.from_numpy(np.ascontiguousarray(y[:n_tr]))
        self.x_val = torch.from_numpy(np.ascontiguousarray(x[n_tr:]))
        self.y_val = torch.from_numpy(np.ascontiguousarray(y[n_tr:]))
        if limit_train:
            self.x_train, self.y_train = self.x_train[:limit_train], self.y_train[:limit_train]
        if limit_val:
            self.x_val, self.y_val = self.x_val[:limit_val], self.y_val[:limit_val]
        self.padded = F.pad(self.x_train, (4, 4, 4, 4))  # zero pixels, uint8

    def to(self, device) -> "Data":
        """Keep the (padded) training images and labels on ``device``: augmentation then runs
        there as one gather per batch."""
        self.padded = self.padded.to(device)
        self.y_train = self.y_train.to(device)
        return self

    def batches(self, batch: int, gen: torch.Generator):
        """Shuffled, augmented batches: a random 32x32 crop of the 4-padded image, flipped
        horizontally with probability 1/2, gathered for the whole batch at once.

        The random draws (permutation, x and y offsets, flips) come from ``gen`` on the CPU in
        a fixed order, so a seed gives the same batches on every device. Output pixel (c, i, j)
        is ``padded[c, oy + i, ox + j]``, or ``padded[c, oy + i, ox + 31 - j]`` when flipped.
        """
        n = len(self.x_train)
        dev = self.padded.device
        ar = torch.arange(32, device=dev)
        ch = torch.arange(3, device=dev)[None, :, None, None]
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - batch + 1 if n >= batch else 1, batch):
            idx = perm[s:s + batch]
            ox = torch.randint(0, 9, (len(idx),), generator=gen)
            oy = torch.randint(0, 9, (len(idx),), generator=gen)
            flip = torch.rand(len(idx), generator=gen) < 0.5
            idx, ox, oy, flip = (t.to(dev, non_blocking=True) for t in (idx, ox, oy, flip))
            rows = (oy[:, None] + ar)[:, None, :, None]
            cols = torch.where(flip[:, None], ox[:, None] + 31 - ar, ox[:, None] + ar)
            imgs = self.padded[idx[:, None, None, None], ch, rows, cols[:, None, None, :]]
            yield imgs, self.y_train[idx]

    def steps_per_epoch(self, batch: int) -> int:
        n = len(self.x_train)
        return max(1, n // batch)
