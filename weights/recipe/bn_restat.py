#!/usr/bin/env python
"""Re-estimate the batch-norm statistics of a weights file over training images.

    python weights/recipe/bn_restat.py --weights IN.npz --out OUT.npz [--images 45000]
        [--augment EPOCHS --seed S]

Training leaves each BN's running mean and variance as an exponential average over the last
(augmented) batches. Here they are recomputed as the cumulative average over the first
``--images`` unaugmented CIFAR-10 training images (never the validation split: images
45000..49999 are not read): one no-grad pass with the model in train mode and every BN's
``momentum`` set to None, so each BN normalises with batch statistics and accumulates
mean_hat = (1/B) sum_b mu_b, var_hat = (1/B) sum_b var_b (the unbiased batch variance); this
is ``torch.optim.swa_utils.update_bn``. ``--augment E`` draws the batches as training does
instead (random crops of the zero-padded images and flips, ``cifar_batches.Data.batches``,
seed ``--seed``), E passes over the images: the statistics the running average approximates,
without its noise. Every other array is copied unchanged; the exit thresholds are kept
(recalibrate with ``python -m xnorcdl.tradeoff --write``); the provenance records the source
file and its sha256 under ``bn_restat``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import List, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.optim.swa_utils import update_bn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the recipe's own modules

from xnorcdl.format import load_weights, save_weights  # noqa: E402

from cifar_batches import VAL_SIZE, Data  # noqa: E402
from qat_resnet import export_arrays, model_from_file  # noqa: E402
from run_records import sha256_of  # noqa: E402


def recompute(model: nn.Module, data: Data, batch: int, augment: int = 0, seed: int = 0) -> int:
    """Replace every BN's running statistics of ``model`` by their cumulative average over
    ``data``'s training images (plain, or ``augment`` augmented passes drawn with ``seed``);
    returns the number of batch norms."""
    if augment:
        gen = torch.Generator().manual_seed(seed)
        batches = (b for _ in range(augment) for b in data.batches(batch, gen))
    else:
        batches = (data.x_train[s:s + batch] for s in range(0, len(data.x_train), batch))
    update_bn(batches, model)  # batches or (batch, labels): it runs model(batch)
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="weights file (.npz)")
    ap.add_argument("--out", required=True, help="weights file to write")
    ap.add_argument("--images", type=int, default=50000 - VAL_SIZE,
                    help="first N training images (at most the 45000 before the validation split)")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--augment", type=int, default=0, metavar="E",
                    help="E passes of augmented batches (as training draws them) instead of "
                         "one pass over the plain images")
    ap.add_argument("--seed", type=int, default=0, help="--augment: seed of the batches")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--synthetic", action="store_true", help="random images (tests)")
    args = ap.parse_args(argv)
    if not 0 < args.images <= 50000 - VAL_SIZE or args.batch < 2 or args.augment < 0:
        raise SystemExit(f"error: --images must lie in 1..{50000 - VAL_SIZE}, --batch be >= 2 "
                         "and --augment >= 0")
    if os.path.abspath(args.out) == os.path.abspath(args.weights):
        raise SystemExit("error: --out must differ from --weights")
    torch.set_num_threads(args.threads)
    spec, arrays = load_weights(args.weights)
    model = model_from_file(args.weights)
    data = Data(VAL_SIZE, args.images, None, synthetic=args.synthetic)
    n_bn = recompute(model, data, args.batch, args.augment, args.seed)
    new = export_arrays(model)
    changed = sorted(k for k in new if not np.array_equal(new[k], arrays[k]))
    assert all(k.endswith((".bn.mean", ".bn.var")) for k in changed), changed
    prov = dict(spec.provenance or {})
    prov["bn_restat"] = {"source": args.weights, "source_sha256": sha256_of(args.weights),
                         "images": len(data.x_train), "batch": args.batch,
                         "augment": args.augment, "seed": args.seed if args.augment else None,
                         "data": data.source, "batch_norms": n_bn}
    save_weights(args.out, dataclasses.replace(spec, provenance=prov), new)
    print(f"{args.out}: running statistics of {n_bn} batch norms re-estimated over "
          f"{len(data.x_train)} training images ({len(changed)} arrays changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
