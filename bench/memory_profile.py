"""Peak device memory and time of engine.run by how the forward is cut into chunks (GPU).

    python -m bench.memory_profile CHECKPOINT [--sizes 1280x720,1920x1080] [--reps 10] [--batch 8]

MLX allocates when the host encodes an op and frees once the device has run it, so the peak depends
on how far the host runs ahead (workers/mlx/run_ahead.py). Each configuration gives the vision
tower's and the language model's chunk sizes (blocks/layers per chunk; 0: one graph) and the
run-ahead depth (1: wait for each chunk; 2: encode the next chunk while the device runs one).
Steady state, as a server runs: the allocator's cache stays warm; the peak is reset before each
timed run and the largest is reported. Two rounds over all configurations show the noise.
"""
import argparse
import statistics
import time

import mlx.core as mx

from bench.gpu_ground import screenshot
from common.config import ModelSpec
from workers.engine import EngineOptions, GroundingRequest
from workers.mlx.engine import MlxEngine

# (vision blocks per chunk, language-model layers per chunk, run-ahead depth); the first is the
# code path before chunking the language model; None: mlx-vlm's language model
CONFIGS = [(4, 0, 1), (4, None, 1), (4, 7, 1), (4, 7, 2), (2, 7, 2), (2, 4, 2), (4, 4, 2), (8, 7, 2), (2, 7, 3)]
BATCH_CONFIGS = [(4, 0, 1), (4, 7, 2), (2, 7, 2)]


def measure(eng, jobs, reps: int, base: int) -> tuple[float, float]:
    """(largest peak over `base` GB, median ms) of `reps` engine.run calls after two warm-ups."""
    for _ in range(2):
        eng.run(jobs)
    peaks, times = [], []
    for _ in range(reps):
        mx.synchronize()
        mx.reset_peak_memory()
        t = time.perf_counter()
        eng.run(jobs)
        mx.synchronize()
        times.append(time.perf_counter() - t)
        peaks.append(mx.get_peak_memory())
    return (max(peaks) - base) / 1e9, statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--sizes", default="1280x720,1920x1080")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8, help="also this batch at the last size (0: no)")
    args = ap.parse_args()
    eng = MlxEngine(ModelSpec(path=args.checkpoint, dtype="bfloat16", max_context_length=65536, max_batch=64,
                              screenshot_cache_mb=0),
                    EngineOptions("m", "/tmp", 1 << 30))
    t = time.perf_counter()
    eng.load()
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    fast_lm = eng._lm
    print(f"load {time.perf_counter() - t:.1f}s, weights active {base / 1e9:.2f} GB, "
          f"language model: {'ours' if fast_lm else 'mlx-vlm'}", flush=True)
    print("\n| round | image | batch | vision blocks per chunk | LM layers per chunk | run-ahead depth | "
          "peak over weights GB | median ms |")
    print("|---|---|---|---|---|---|---|---|")
    sizes = [tuple(map(int, s.split("x"))) for s in args.sizes.split(",")]
    cases = [(size, 1, c) for size in sizes for c in CONFIGS]
    if args.batch:
        cases += [(sizes[-1], args.batch, c) for c in BATCH_CONFIGS]
    for rnd in (1, 2):
        for (w, h), batch, (v_every, l_every, depth) in cases:
            if l_every is not None and fast_lm is None:
                continue
            jobs = [eng.prepare(GroundingRequest(f"m{i}", screenshot(w, h), "click OK")) for i in range(batch)]
            eng._vision.eval_every, eng.run_ahead = v_every, depth
            eng._lm = fast_lm if l_every is not None else None
            if fast_lm is not None:
                fast_lm.eval_every = l_every or 0
            peak, ms = measure(eng, jobs, args.reps, base)
            lm = "mlx-vlm's" if l_every is None else l_every
            print(f"| {rnd} | {w}x{h} | {batch} | {v_every} | {lm} | {depth} | {peak:.2f} | {ms:.1f} |", flush=True)
    eng._lm = fast_lm


if __name__ == "__main__":
    main()
