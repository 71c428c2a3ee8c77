"""The edge, and with it every exit decision, is the same on every machine.

A float32 dot product's rounding depends on the order of its additions, and BLAS chooses that
order per processor. OpenBLAS (NumPy's BLAS) lets the processor kernel be forced with
``OPENBLAS_CORETYPE``; these tests run the edge of a network in child processes under different
kernels and require identical bits: stem output, every edge block's output, the exit logits and
the entropies, for both executors. With BLAS sums at the edge the 1-bit layers turn last-bit
differences into different signs and the exit entropies move by up to tenths of a nat (measured
on a trained 20E+10C network before the edge's float layers got their fixed order).
"""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="OPENBLAS_CORETYPE names x86-64 kernels")

# Kernels every x86-64 processor runs: SSE3 (Prescott) and AVX (Sandybridge) sgemm.
CORES = ("Prescott", "Sandybridge")

CHILD = r"""
import sys
import numpy as np
from threadpoolctl import threadpool_limits
threadpool_limits(1)
from xnorcdl.backends.fast import FastExecutor
from xnorcdl.backends.reference import ReferenceExecutor
from xnorcdl.format import random_weights
from xnorcdl.model import build_model
from xnorcdl.spec import ExitSpec, ModelSpec

edge_bits, shortcut, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
spec = ModelSpec(depth=20, edge_convs=12, edge_bits=edge_bits, shortcut=shortcut,
                 exits=(ExitSpec(6, 0.5), ExitSpec(12, 0.5)))
spec.validate()
model = build_model(spec, random_weights(spec, 7))
images = np.random.default_rng(11).integers(0, 256, (40, 3, 32, 32), dtype=np.uint8)
arrays = {}
for ex in (ReferenceExecutor(model), FastExecutor(model)):
    x = ex.stem(images)
    arrays[ex.name + ".stem"] = x
    for b, blk in enumerate(model.blocks):
        if not blk.edge:
            break
        x = ex.block(b, x)
        arrays[f"{ex.name}.block{b}"] = x
        for k, e in enumerate(model.exits):
            if e.after_block == b:
                arrays[f"{ex.name}.exit{k}"] = ex.exit(k, x)
np.savez(out, **arrays)
"""


def _edge_arrays(tmp_path, core, edge_bits, shortcut):
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    if core is not None:
        env["OPENBLAS_CORETYPE"] = core
    out = tmp_path / f"{core}-{edge_bits}-{shortcut}.npz"
    subprocess.run([sys.executable, "-c", CHILD, str(edge_bits), shortcut, str(out)],
                   env=env, check=True, capture_output=True, timeout=600)
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("edge_bits,shortcut", [(1, "zero_pad"), (2, "conv1x1")])
def test_edge_is_bit_identical_under_every_blas_kernel(tmp_path, edge_bits, shortcut):
    base = _edge_arrays(tmp_path, None, edge_bits, shortcut)
    assert any(k.endswith(".exit1") for k in base)
    for core in CORES:
        other = _edge_arrays(tmp_path, core, edge_bits, shortcut)
        assert sorted(other) == sorted(base)
        differ = [k for k in base if not np.array_equal(base[k], other[k])]
        assert not differ, f"OPENBLAS_CORETYPE={core}: {differ} differ from the default kernel"
    # both executors give the same edge
    for k in base:
        if k.startswith("reference."):
            assert np.array_equal(base[k], base["fast." + k[len("reference."):]]), k
