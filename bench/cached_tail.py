"""A second question about a screenshot, in the engine: what the screenshot cache's path costs.

    python -m bench.cached_tail CHECKPOINT [--sizes 1920x1080,1280x720] [--reps 20]

Per size: the whole forward (first question), then questions about the same screenshot alone and
eight at once (one run), each as the engine's prepare + run; the tail forward's host time (building
the graph, nothing evaluated) and its whole time (built and evaluated). Medians of --reps, mx.synchronize() around each.
"""
from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from bench.screens import png_bytes
from common.config import ModelSpec
from workers.engine import EngineOptions, GroundingRequest
from workers.mlx.backbone import pointer_state_after
from workers.mlx.engine import MlxEngine


def timed(fn, reps: int) -> float:
    """Median milliseconds of fn() with the device drained before and after."""
    out = []
    for _ in range(reps):
        mx.synchronize()
        t = time.perf_counter()
        fn()
        mx.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--sizes", default="1920x1080,1280x720")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    eng = MlxEngine(ModelSpec(path=a.checkpoint, max_pixels=5_720_064, warmup=[]), EngineOptions("tail", "/tmp", 1 << 30))
    eng.load()
    print("| size | whole forward ms (prepare + run) | same screen, 1 question ms | 8 questions in one run ms | "
          "tail graph, host only ms | tail ms |\n|---|---|---|---|---|---|")
    for s in a.sizes.split(","):
        w, h = (int(v) for v in s.split("x"))
        img = png_bytes(w, h, seed=7)
        ask = lambda text: eng.prepare(GroundingRequest("t", img, text))
        eng._cache.clear()
        whole = timed(lambda: (eng._cache.clear(), eng.run([ask("click Button 1")])), max(3, a.reps // 4))
        eng.run([ask("click Button 1")])                      # stored again
        one = timed(lambda: eng.run([ask("click Button 2")]), a.reps)
        eight = timed(lambda: eng.run([ask(f"click Button {i}") for i in range(8)]), a.reps)
        job = ask("open the second menu")
        entry = job.cached
        args = (eng._model, eng._lm, entry.kept, [job.input_ids[entry.prefix:]], [job.position_ids[:, entry.prefix:]])
        host = timed(lambda: pointer_state_after(*args), a.reps)          # built, never evaluated
        once = timed(lambda: mx.eval(pointer_state_after(*args)), a.reps)
        print(f"| {s} | {whole:.1f} | {one:.1f} | {eight:.1f} | {host:.1f} | {once:.1f} |", flush=True)


if __name__ == "__main__":
    main()
