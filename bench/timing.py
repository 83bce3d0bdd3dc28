"""Timing for the benches: on the device, warm up, then time each repeat between mx.synchronize
calls; on the host, the median of calls, each optionally after the thread slept."""
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


def taking_turns_ms(fns, reps: int, calls: int) -> list[float]:
    """Milliseconds per call of each of `fns`, each timed as `calls` calls in one graph, the median of
    `reps`. The functions take turns, repeat after repeat: the card's clock drifts as it heats, and one
    timed after a long run of the others would pay for their heat."""
    batches = [lambda fn=fn: [fn() for _ in range(calls)] for fn in fns]
    times = [device_times(b, 1, warmup=1) for b in batches]
    for _ in range(reps - 1):
        for t, b in zip(times, batches):
            t += device_times(b, 1, warmup=0)
    return [statistics.median(t) * 1e3 / calls for t in times]


def host_median_ms(fn, reps: int, gap_s: float = 0.0) -> float:
    """Median milliseconds of `fn()` on the host, each call after `gap_s` asleep: as between a
    single client's requests, or on the compute thread after a forward's wait, caches go cold."""
    ts = []
    for _ in range(reps):
        if gap_s:
            time.sleep(gap_s)
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3
