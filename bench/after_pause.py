"""Why a question about a screenshot sent ahead (bench.agent_loop: ~19 ms at 1080p) is slower than
a second question asked back to back (bench.e2e's same-screen rows: ~13 ms): a fresh cache entry,
or the pause before it (the device idle while the agent thinks)?

    python -m bench.after_pause CHECKPOINT [--size 1920x1080] [--pause-ms 150] [--reps 12]

In the engine (prepare + run, timed between device syncs), one question from the screenshot cache
per case, medians of --reps: about the entry asked before or about one just stored by a whole
forward, right away or after --pause-ms of sleep (nothing running).
"""
from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from bench.screens import png_bytes
from common.config import ModelSpec
from workers.engine import EngineOptions, GroundingRequest
from workers.mlx.engine import MlxEngine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--pause-ms", type=float, default=150)
    ap.add_argument("--reps", type=int, default=12)
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    eng = MlxEngine(ModelSpec(path=a.checkpoint, max_pixels=5_720_064, warmup=[a.size]),
                    EngineOptions("pause", "/tmp", 1 << 30))
    eng.load()
    seeds = iter(range(1000, 10**6))
    old = png_bytes(w, h, seed=1)
    eng.run([eng.prepare(GroundingRequest("w", old, "click Button 0"))])

    def ask(image: bytes) -> float:
        mx.synchronize()
        t = time.perf_counter()
        (r,) = eng.run([eng.prepare(GroundingRequest("q", image, "click Button 1"))])
        mx.synchronize()
        assert r.cached_tokens > 0, "not from the cache"
        return (time.perf_counter() - t) * 1e3

    cases = {}
    for name, fresh, pause in [("entry asked before, right away", False, 0),
                               ("entry just stored, right away", True, 0),
                               (f"entry asked before, after {a.pause_ms:g} ms idle", False, a.pause_ms),
                               (f"entry just stored, after {a.pause_ms:g} ms idle", True, a.pause_ms)]:
        times = []
        eng.run([eng.prepare(GroundingRequest("o", old, "click Button 0"))])   # stored (again: LRU)
        for _ in range(a.reps):
            image = old
            if fresh:
                image = png_bytes(w, h, seed=next(seeds))
                eng.run([eng.prepare(GroundingRequest("f", image, "click Button 0"))])
            else:
                ask(old)                                     # the device busy just before, as above
            time.sleep(pause / 1e3)
            times.append(ask(image))
        cases[name] = statistics.median(times)
    print(f"| {a.size} question from the cache | ms (median of {a.reps}) |\n|---|---|")
    for name, ms in cases.items():
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
