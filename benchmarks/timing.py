"""Timing shared by the benchmarks: interleaved repetitions, median seconds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_times(
    fns: dict[str, Callable[[], Any]], repeat: int, *, warmup: int = 0
) -> dict[str, float]:
    """Interleave the candidates so machine noise hits all alike; median seconds each.
    ``warmup`` untimed calls of each first (allocations, kernel selection)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
