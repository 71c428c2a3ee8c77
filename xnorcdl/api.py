"""The Python API: load a weights file, run Algorithm 1 on images, read what happened.

    import xnorcdl
    net = xnorcdl.load("weights/r32_20E.npz")
    images, labels = xnorcdl.load_cifar10("test")
    res = net.run(images[:1000], backend="fast")   # uint8 [N, 3, 32, 32]
    res.predictions, res.exits, res.entropies, res.energy.total

Algorithm 1 (:mod:`xnorcdl.engine`): a sample leaves at the first early exit k whose softmax
entropy ``H = -sum_c p_c ln p_c`` (nats, eq. 7) is strictly below its threshold ``t_k``;
otherwise it continues through the cloud layers to the head. ``Result.exits[i]`` is k, or
:data:`CLOUD` (-1) for a sample the head decided. Energies are the paper's Table I model
(:mod:`xnorcdl.energy`), split between the edge and the cloud. These are the figures
``python -m xnorcdl infer`` prints, computed by the same code.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import engine
from .errors import DataError, UsageError

CLOUD = engine.FINAL  # exit index of a sample that went on to the cloud and the head (-1)
BACKENDS = ("fast", "reference")


def make_executor(model, backend: str, option: str = "backend"):
    """The executor named ``backend`` for a prepared ``model`` (:func:`xnorcdl.backends.get`):
    ``reference`` (NumPy, the oracle) or ``fast`` (Numba kernels)."""
    from . import backends
    if backend not in backends.BACKENDS:
        raise UsageError(f"{option}: expected one of {', '.join(backends.BACKENDS)}, got "
                         f"{backend!r}", where=option)
    return backends.get(backend)(model)


def check_thresholds(values: Sequence[float], n_exits: int, option: str = "thresholds"
                     ) -> List[float]:
    """One threshold (nats) per exit, or one for all; finite and >= 0."""
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UsageError(f"{option}: expected numbers (nats), got {values!r}",
                         where=option) from None
    if len(values) == 1 and n_exits > 1:
        values = values * n_exits
    if len(values) != n_exits:
        raise UsageError(f"{option}: {len(values)} value(s) for {n_exits} exit(s)", where=option)
    if any(not np.isfinite(v) or v < 0 for v in values):
        raise UsageError(f"{option}: values must be finite and >= 0 (nats), got {values}",
                         where=option)
    return values


def check_images(images) -> np.ndarray:
    """``images`` as a uint8 ``[N, 3, 32, 32]`` array (pixels 0..255, planes R, G, B)."""
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[1:] != (3, 32, 32):
        raise DataError(f"images: expected uint8 [N, 3, 32, 32], got {a.dtype} {list(a.shape)}",
                        where="images")
    return a


@dataclasses.dataclass
class Energy:
    """What a run cost (pJ, the energy table's model).

    ``per_sample``: arrays ``[N]`` ``edge_pJ``, ``cloud_pJ``, ``compute_pJ``, ``memory_pJ``,
    ``total_pJ``, plus ``comm_bytes`` (sent to the cloud) and ``macs``; ``report``: the summary
    ``python -m xnorcdl infer --json`` writes (means, totals, outcomes, baselines, reductions)."""
    per_sample: Dict[str, np.ndarray]
    report: dict

    @property
    def total(self) -> Dict[str, float]:
        """pJ over all samples: edge, cloud, compute, memory, total."""
        return dict(self.report["total_pJ"])

    @property
    def mean(self) -> Dict[str, Optional[float]]:
        """pJ per sample: edge, cloud, compute, memory, total."""
        return dict(self.report["mean_pJ_per_sample"])

    @property
    def reduction(self) -> Optional[float]:
        """Mean energy of the full-precision network without exits / this run's mean."""
        return self.report["reduction"]["vs_full_precision_no_exit"]


@dataclasses.dataclass
class Result:
    """Per-sample outcome of Algorithm 1 over N images with K early exits.

    ``predictions`` int64 ``[N]``; ``exits`` int64 ``[N]``: the exit taken, :data:`CLOUD` (-1)
    for the head; ``entropies`` float64 ``[N, K]`` nats, NaN where an exit was not reached;
    ``logits`` float32 ``[N, classes]`` of the output that decided; ``thresholds`` used."""
    predictions: np.ndarray
    exits: np.ndarray
    entropies: np.ndarray
    logits: np.ndarray
    thresholds: List[float]
    energy: Energy

    @property
    def at_edge(self) -> np.ndarray:
        """bool ``[N]``: the sample left at an early exit."""
        return self.exits != CLOUD

    def accuracy(self, labels) -> float:
        """Fraction of ``predictions`` equal to ``labels``."""
        labels = np.asarray(labels)
        if labels.shape != self.predictions.shape:
            raise DataError(f"labels: expected shape {list(self.predictions.shape)}, got "
                            f"{list(labels.shape)}", where="labels")
        return float((self.predictions == labels).mean()) if len(labels) else float("nan")


class Network:
    """A loaded, validated and prepared weights file (:func:`load`)."""

    def __init__(self, model, path: Optional[str] = None):
        self.model, self.path = model, path
        self._executors: Dict[str, object] = {}

    @property
    def spec(self):
        """The file's description (:class:`xnorcdl.spec.ModelSpec`)."""
        return self.model.spec

    @property
    def thresholds(self) -> List[float]:
        """The exit thresholds stored in the file (nats), one per early exit."""
        return [e.threshold for e in self.model.exits]

    def executor(self, backend: str = "fast"):
        """The backend's executor, built on first use (the fast one prepares its kernels)."""
        if backend not in self._executors:
            self._executors[backend] = make_executor(self.model, backend)
        return self._executors[backend]

    def executors(self, backend: str, n: int) -> list:
        """``n`` executors of the backend, one per worker (each keeps its own buffers), built on
        first use; the first is :meth:`executor`'s."""
        pool = self._executors.setdefault(f"{backend} workers", [self.executor(backend)])
        pool[len(pool):] = [make_executor(self.model, backend) for _ in range(n - len(pool))]
        return pool[:n]

    def run(self, images, backend: str = "fast", thresholds: Optional[Sequence[float]] = None,
            batch_size: Optional[int] = None, energy_table=None, threads: Optional[int] = 1,
            progress=None, workers: int = 1) -> Result:
        """Algorithm 1 over ``images`` (uint8 ``[N, 3, 32, 32]``).

        ``thresholds``: nats, one per exit or one for all (``None``: the file's); ``batch_size``
        (default 1 fast, 100 reference) changes speed, never a decision; ``energy_table``: a
        path or :class:`xnorcdl.energy.EnergyTable` (``None``: the paper's Table I);
        ``threads``: BLAS threads for the float32 layers while it runs (batch-1 inference is
        fastest on one; ``None``: as configured); ``progress``: a
        :class:`xnorcdl.progress.Progress` to update; ``workers``: threads that each run
        Algorithm 1 on chunks of the images, taken in turn, with an executor of their own (the
        fast backend's kernels release the GIL), for throughput on several cores; the
        results are those of one worker, sample for sample."""
        from .energy import energy_summary, load_energy_table, per_sample_energy
        images = check_images(images)
        thr = (self.thresholds if thresholds is None
               else check_thresholds(np.atleast_1d(thresholds), len(self.model.exits)))
        from .energy import EnergyTable
        if energy_table is not None and not isinstance(energy_table,
                                                       (str, os.PathLike, EnergyTable)):
            raise UsageError(f"energy_table: expected a path or an EnergyTable, got "
                             f"{type(energy_table).__name__}", where="energy_table")
        _check_count(batch_size, "batch_size")
        _check_count(threads, "threads")
        _check_count(workers, "workers")
        batch = batch_size or (1 if backend == "fast" else 100)
        table = (load_energy_table(energy_table) if isinstance(energy_table, (str, os.PathLike))
                 else energy_table)
        with _blas_threads(threads):
            raw = self._run(images, backend, thr, batch, progress, workers)
        energy = Energy(per_sample_energy(self.model, raw.exit_index, table),
                        energy_summary(self.model, raw.exit_index, table))
        return Result(raw.predictions, raw.exit_index, raw.entropies, raw.logits, thr, energy)

    def _run(self, images, backend, thr, batch, progress, workers) -> engine.Results:
        """engine.run over ``images``, in chunks of whole batches that ``workers`` threads take
        in turn from a shared counter (a worker that drew cheaper samples, more exits, takes
        more chunks), results put back in image order.

        Chunks are whole batches, so every batch holds the samples it holds with one worker:
        BLAS-backed layers may round differently with another batch composition."""
        n_batches = -(-len(images) // batch)
        workers = min(workers, max(1, n_batches))
        if workers == 1:
            return engine.run(self.model, images, self.executor(backend), thr, batch, progress)
        import concurrent.futures
        import itertools
        import threading
        from .progress import Locked
        executors = self.executors(backend, workers)
        lock = threading.Lock()
        shared = None if progress is None else Locked(progress)  # one bar, every worker
        # about 32 chunks per worker: the last chunk to finish costs 1/32 of a share at most
        step = max(1, n_batches // (32 * workers)) * batch
        starts = list(range(0, len(images), step))
        parts = [None] * len(starts)
        counter = itertools.count()

        def work(w):
            while True:
                with lock:
                    c = next(counter)
                if c >= len(starts):
                    return
                a = starts[c]
                parts[c] = engine.run(self.model, images[a:a + step], executors[w], thr, batch,
                                      shared)

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(workers)))
        return engine.Results(*(np.concatenate([getattr(p, f.name) for p in parts])
                                for f in dataclasses.fields(engine.Results)))

    def __repr__(self) -> str:
        s = self.spec
        return (f"Network({self.path!r}: ResNet-{s.depth}, {s.edge_convs} {s.edge_bits}-bit edge "
                f"convs, exits after conv {[e.after_conv for e in s.exits]}, "
                f"thresholds {self.thresholds})")


def _check_count(value, name: str) -> None:
    """``value`` is None or a positive int (a bool or a float is refused)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                              or value < 1):
        raise UsageError(f"{name}: expected a positive integer, got {value!r}", where=name)


def _blas_threads(threads: Optional[int]):
    if threads is None:
        import contextlib
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits
    return threadpool_limits(threads)


def load(path) -> Network:
    """Load, validate and prepare a weights file (docs/FORMAT.md); raises
    :class:`xnorcdl.errors.WeightsError` naming the file and the problem."""
    from .model import load_model
    path = os.fspath(path)
    return Network(load_model(path), path)
