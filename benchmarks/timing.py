"""Throughput timing shared by the benchmark scripts (no dependencies: it also runs in the
anomalib venv of peers_anomalib_worker.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def images_per_second(step: Callable[[], int], calls: int = 3, seconds: float = 1.0) -> float:
    """Warm-up (two calls; one when ``calls`` is 1), then at least ``calls`` calls and
    ``seconds`` seconds; images/s. ``step`` returns the number of images it processed."""
    for _ in range(2 if calls > 1 else 1):
        step()
    images, n, started = 0, 0, time.perf_counter()
    while True:
        images += step()
        n += 1
        elapsed = time.perf_counter() - started
        if n >= calls and elapsed >= seconds:
            return images / elapsed


def cpu_model(default: str = "?") -> str:
    """The CPU's model name from /proc/cpuinfo (``default`` where it is not there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default
