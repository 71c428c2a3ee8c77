import numpy as np
import pytest
from threadpoolctl import threadpool_limits

# One BLAS thread for the whole suite: the engine runs small batch-1 GEMMs next to Numba
# kernels, and on two cores a multi-threaded BLAS mostly spins (tens of times slower here).
_BLAS_LIMIT = threadpool_limits(1)

from xnorcdl.format import random_weights, save_weights
from xnorcdl.spec import ExitSpec, ModelSpec


def make_spec(**kw) -> ModelSpec:
    """A small valid description; keywords override fields (exits as (after_conv, threshold) pairs)."""
    exits = kw.pop("exits", ())
    spec = ModelSpec(**{"depth": 8, **kw}, exits=tuple(ExitSpec(a, t) for a, t in exits))
    spec.validate()
    return spec


@pytest.fixture
def weights_file(tmp_path):
    """Write a random weights file for a spec and return its path."""
    def make(spec: ModelSpec, seed: int = 0, name: str = "w.npz"):
        path = tmp_path / name
        save_weights(str(path), spec, random_weights(spec, seed))
        return str(path)
    return make


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
