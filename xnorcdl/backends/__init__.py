"""Backends: two executors of the prepared layers of :mod:`xnorcdl.model`, side by side.

* ``reference`` (:mod:`xnorcdl.backends.reference`): plain NumPy, written to be read; the oracle.
* ``fast`` (:mod:`xnorcdl.backends.fast`): the Numba and BLAS kernels of :mod:`xnorcdl.kernels`.

Algorithm 1 (:mod:`xnorcdl.engine`) sees a backend only through :class:`Executor`, so a backend
is free to keep activations in any layout between calls (its ``State``). Both agree bit for bit
at the edge (stem, edge blocks, exit logits, hence entropies and exit decisions) and within
float32 rounding in the cloud (BLAS), see :mod:`xnorcdl.backends.fast`.

``get(name)`` gives the executor class of a backend named in :data:`BACKENDS` (the commands'
``--backend``); ``get(name)(model)`` prepares it for one model.
"""
from __future__ import annotations

from ..errors import UsageError

import importlib
from typing import Any, Callable, Dict, Protocol, Tuple

import numpy as np

from ..model import Model

#: ``name -> (module, class, what it is)``; modules are imported on first use.
BACKENDS: Dict[str, Tuple[str, str, str]] = {
    "fast": ("xnorcdl.backends.fast", "FastExecutor", "Numba and BLAS kernels"),
    "reference": ("xnorcdl.backends.reference", "ReferenceExecutor", "plain NumPy, the oracle"),
}


class Executor(Protocol):
    """What Algorithm 1 calls; ``State`` is the backend's own batch of activations.

    * ``stem(images) -> state``       uint8 ``[N, 3, 32, 32]`` in: normalisation, stem conv, BN, ReLU
    * ``block(b, state) -> state``    residual block b
    * ``exit(k, state) -> logits``    early exit k on the output of its block, float32 ``[N, classes]``
    * ``head(state) -> logits``       global average pool and the final linear layer, float32
    * ``select(state, idx) -> state`` keep only the samples ``idx`` (those that go on)
    """

    name: str
    model: Model

    def stem(self, images: np.ndarray) -> Any: ...

    def block(self, b: int, state: Any) -> Any: ...

    def exit(self, k: int, state: Any) -> np.ndarray: ...

    def head(self, state: Any) -> np.ndarray: ...

    def select(self, state: Any, idx: np.ndarray) -> Any: ...


class BackendError(UsageError):
    """An unknown backend; reported as one line naming ``--backend``."""


def get(name: str) -> Callable[[Model], Executor]:
    """The executor class of backend ``name`` (a key of :data:`BACKENDS`)."""
    if name not in BACKENDS:
        raise BackendError(f"--backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    module, cls, _ = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)
