"""The one set of network configurations every network-level test runs (tests/test_network_grid.py).

It spans edge precisions 1, 2 and 4 bits (and a non-default v0), both downsampling shortcuts,
no exit to three exits, depth 8 (n = 1, odd) and 14 (n = 2, even) of the 6n+2 family, and edge
splits from 0 (all float) to every conv. Weights are ``xnorcdl.format.random_weights``; images
are random uint8 pixels. With NUMBA_DISABLE_JIT=1 the fast kernels run as Python: there the
grid keeps its depth-8 networks and draws fewer samples (:data:`SAMPLES`).
"""
import dataclasses
from typing import Tuple

import numba

from xnorcdl.format import random_weights
from xnorcdl.model import Model, build_model
from xnorcdl.spec import ExitSpec, ModelSpec

SLOW = numba.config.DISABLE_JIT
#: samples per configuration: against the naive forward pass, and fast against reference
SAMPLES, SAMPLES_EDGE = (3, 3) if SLOW else (8, 48)


@dataclasses.dataclass(frozen=True)
class Net:
    depth: int
    edge_convs: int
    edge_bits: int
    shortcut: str
    exits: Tuple[int, ...] = ()         # after_conv of each exit
    v0: float = 1.0
    num_classes: int = 10
    seed: int = 0

    @property
    def id(self) -> str:
        q = f"-v0={self.v0:g}" if self.v0 != 1.0 else ""
        return (f"d{self.depth}-edge{self.edge_convs}-{self.edge_bits}bit{q}-{self.shortcut}"
                f"-exits{'_'.join(map(str, self.exits)) or 'none'}")

    def spec(self, thresholds=None) -> ModelSpec:
        thr = thresholds if thresholds is not None else [0.0] * len(self.exits)
        spec = ModelSpec(depth=self.depth, edge_convs=self.edge_convs, edge_bits=self.edge_bits,
                         shortcut=self.shortcut, v0=self.v0, v1=2 * self.v0,
                         num_classes=self.num_classes,
                         exits=tuple(ExitSpec(a, float(t)) for a, t in zip(self.exits, thr)))
        spec.validate()
        return spec

    def arrays(self):
        return random_weights(self.spec(), self.seed)

    def model(self, thresholds=None) -> Model:
        return build_model(self.spec(thresholds), self.arrays())


GRID = [
    Net(8, 0, 1, "zero_pad"),
    Net(8, 0, 1, "conv1x1", num_classes=7),
    Net(8, 2, 1, "zero_pad", (2,), seed=1),
    Net(8, 4, 1, "conv1x1", (2, 4), seed=2),
    Net(8, 6, 1, "zero_pad", (2, 4, 6), seed=3),
    Net(8, 4, 2, "zero_pad", (4,), seed=4),
    Net(8, 6, 2, "conv1x1", (2, 6), seed=5),
    Net(8, 6, 4, "conv1x1", (2,), seed=6),
    Net(8, 4, 4, "zero_pad", (2, 4), v0=0.5, seed=7),
    Net(14, 0, 1, "conv1x1", seed=8),
    Net(14, 4, 1, "conv1x1", (2, 4), seed=9),
    Net(14, 12, 1, "zero_pad", (4, 8, 12), seed=10),
    Net(14, 8, 2, "conv1x1", (4, 8), seed=11),
    Net(14, 6, 4, "zero_pad", (2, 6), seed=12),
    Net(14, 12, 4, "conv1x1", (6, 12), seed=13),
]
if SLOW:
    GRID = [net for net in GRID if net.depth == 8]
