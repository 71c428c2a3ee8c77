#!/usr/bin/env python
"""Average several weights files of one network (a uniform "model soup") and re-estimate BN.

    python weights/recipe/weight_soup.py --weights A.npz B.npz [C.npz ...] --out OUT.npz
        [--augment 2 --seed S] [--images 45000]

Wortsman et al., "Model soups" (ICML 2022): networks fine-tuned from one starting point often
lie in one basin, and the mean of their weights can beat each of them. With K files,

    theta_soup = (1/K) sum_k theta_k

for every parameter: float conv and linear weights, the real-valued latent weights of the
quantized convs (whose exported codes are then those of the mean: sign and alpha of eq. (3)
and (2) for 1 bit, as in ``weight_average.py``), BN gammas and betas, biases. BN running means
and variances are not averaged (they belong to the weights that produced them): they are
recomputed for theta_soup over training images as ``bn_restat.py`` does (plain, or ``--augment
E`` augmented passes). The files must describe the same network (every field of the
description but the exit thresholds and the provenance); the soup keeps the first file's
thresholds (recalibrate with ``python -m xnorcdl.tradeoff --write``) and records every source
and its sha256 under ``provenance.weight_soup``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the recipe's own modules

from xnorcdl.format import load_weights, save_weights  # noqa: E402
from xnorcdl.spec import ModelSpec  # noqa: E402

from bn_restat import recompute  # noqa: E402
from cifar_batches import VAL_SIZE, Data  # noqa: E402
from qat_resnet import HybridResNet, export_arrays, named_tensors  # noqa: E402
from run_records import sha256_of  # noqa: E402

RUNNING = (".bn.mean", ".bn.var")


def _network(spec: ModelSpec) -> dict:
    d = spec.to_json_dict()
    d.pop("provenance", None)
    d["exits"] = [e["after_conv"] for e in d["exits"]]
    return d


def soup_arrays(paths: List[str]) -> Tuple[ModelSpec, Dict[str, np.ndarray]]:
    """The first file's description, and the mean over ``paths`` of every array but the BN
    running statistics (taken from the first file); refuses files of different networks."""
    first_spec, first = load_weights(paths[0])
    net = _network(first_spec)
    total = {k: v.astype(np.float64) for k, v in first.items() if not k.endswith(RUNNING)}
    for p in paths[1:]:
        spec, arrays = load_weights(p)
        other = _network(spec)
        diff = sorted(k for k in set(net) | set(other) if net.get(k) != other.get(k))
        if diff:
            raise ValueError(f"{p}: describes another network than {paths[0]} (fields "
                             f"{', '.join(diff)} differ); a soup averages one network's files")
        for k in total:
            total[k] += arrays[k]
    out = dict(first)
    out.update({k: (v / len(paths)).astype(first[k].dtype) for k, v in total.items()})
    return first_spec, out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", nargs="+", required=True, help="two or more weights files")
    ap.add_argument("--out", required=True, help="weights file to write")
    ap.add_argument("--images", type=int, default=50000 - VAL_SIZE,
                    help="BN statistics over the first N training images (at most 45000)")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--augment", type=int, default=0, metavar="E",
                    help="E passes of augmented batches instead of one plain pass")
    ap.add_argument("--seed", type=int, default=0, help="--augment: seed of the batches")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--synthetic", action="store_true", help="random images (tests)")
    args = ap.parse_args(argv)
    if len(args.weights) < 2:
        raise SystemExit("error: --weights: a soup needs at least two files")
    if not 0 < args.images <= 50000 - VAL_SIZE or args.batch < 2 or args.augment < 0:
        raise SystemExit(f"error: --images must lie in 1..{50000 - VAL_SIZE}, --batch be >= 2 "
                         "and --augment >= 0")
    if os.path.abspath(args.out) in {os.path.abspath(p) for p in args.weights}:
        raise SystemExit("error: --out must differ from every --weights file")
    torch.set_num_threads(args.threads)
    try:
        spec, arrays = soup_arrays(args.weights)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    model = HybridResNet(spec)
    with torch.no_grad():
        for k, t in named_tensors(model).items():
            t.copy_(torch.from_numpy(arrays[k]))
    data = Data(VAL_SIZE, args.images, None, synthetic=args.synthetic)
    n_bn = recompute(model, data, args.batch, args.augment, args.seed)
    prov = dict(spec.provenance or {})
    prov["weight_soup"] = {"sources": [{"path": p, "sha256": sha256_of(p)} for p in args.weights],
                           "images": len(data.x_train), "batch": args.batch,
                           "augment": args.augment, "seed": args.seed if args.augment else None,
                           "data": data.source, "batch_norms": n_bn}
    save_weights(args.out, dataclasses.replace(spec, provenance=prov), export_arrays(model))
    print(f"{args.out}: mean of {len(args.weights)} files, running statistics of {n_bn} batch "
          f"norms re-estimated over {len(data.x_train)} training images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
