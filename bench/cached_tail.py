"""A second question about a screenshot, in the engine: what the screenshot cache's path costs.

    python -m bench.cached_tail CHECKPOINT [--sizes 1920x1080,1280x720] [--reps 20]

Per size: the whole forward (first question), then questions about the same screenshot alone and
eight at once (one run), each as the engine's prepare + run; the tail forward's host time (building
the graph, nothing evaluated) and its whole time (built and evaluated). Then what the first batch of B questions about a
screenshot size costs (new shapes), with B rows or rows padded to a power of two (the engine's way). Medians of --reps, mx.synchronize() around each.
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
    # The first batch of B questions about a screenshot size meets new shapes (attention plans,
    # compiled kernels). Two screen sizes not seen above, one per way of batching, B = 1..8 in turn.
    w, h = (int(v) for v in a.sizes.split(",")[0].split("x"))
    cols = {}
    for pad, size in ((False, (w - 28, h - 28)), (True, (w - 56, h - 56))):
        eng.pad_questions = pad
        img = png_bytes(*size, seed=8)
        eng.run([eng.prepare(GroundingRequest("t", img, "click Button 0"))])
        for b in range(1, 9):
            batch = lambda: eng.run([eng.prepare(GroundingRequest("t", img, f"click Button {i}")) for i in range(b)])
            cols[(pad, b)] = (timed(batch, 1), timed(batch, 1))
    print(f"\n| questions at once ({w - 28}x{h - 28} / {w - 56}x{h - 56}) | first run, B rows ms | second ms | "
          "first run, rows padded to 1, 2, 4, 8 ms | second ms |\n|---|---|---|---|---|")
    for b in range(1, 9):
        (f0, s0), (f1, s1) = cols[(False, b)], cols[(True, b)]
        print(f"| {b} | {f0:.1f} | {s0:.1f} | {f1:.1f} | {s1:.1f} |")
    print(f"| all 8 | {sum(cols[(False, b)][0] for b in range(1, 9)):.0f} | | "
          f"{sum(cols[(True, b)][0] for b in range(1, 9)):.0f} | |", flush=True)


if __name__ == "__main__":
    main()
