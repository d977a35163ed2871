"""The benchmarks' timer: the best of several calls after warm-up calls, the run least disturbed by other jobs on a
shared machine (``ops.py`` and ``norm_act.py`` interleave single calls of their variants instead)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_seconds(step: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The fastest of ``repeats`` timed calls of ``step``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)
