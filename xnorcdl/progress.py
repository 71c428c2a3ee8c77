"""A minimal progress bar on stderr (shown only when stderr is a terminal, or when forced)."""
from __future__ import annotations

import sys
import time


class Locked:
    """``Locked(progress)``: the same ``update(n)``, serialised by a lock, so that several worker
    threads can advance one progress object (any object with ``update``)."""

    def __init__(self, progress):
        import threading
        self.progress, self.lock = progress, threading.Lock()

    def update(self, n: int) -> None:
        with self.lock:
            self.progress.update(n)


class Progress:
    """``with Progress(total, "infer") as p: p.update(n)`` draws ``infer  42% 4200/10000 ...``."""

    def __init__(self, total: int, label: str, enabled: bool | None = None, stream=None):
        self.total, self.label, self.done = max(int(total), 0), label, 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = self._last = time.perf_counter()

    def __enter__(self) -> "Progress":
        return self

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            frac = self.done / self.total if self.total else 1.0
            bar = "#" * int(frac * 30)
            self.stream.write(f"\r{self.label} {frac:4.0%} [{bar:<30}] {self.done}/{self.total}"
                              f" {rate:,.0f}/s")
            self.stream.flush()

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
