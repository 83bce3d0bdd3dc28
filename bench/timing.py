"""Device timing for the GPU benches: warm up, then time each repeat between mx.synchronize calls."""
from __future__ import annotations

import statistics
import time

import mlx.core as mx


def device_times(fn, reps: int, warmup: int = 2) -> list[float]:
    """Seconds per call of `mx.eval(fn())`, `reps` times after `warmup` untimed calls."""
    for _ in range(warmup):
        mx.eval(fn())
    ts = []
    for _ in range(reps):
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        ts.append(time.perf_counter() - t)
    return ts


def median_ms(fn, reps: int, warmup: int = 2) -> float:
    return statistics.median(device_times(fn, reps, warmup)) * 1e3
