"""What the first request at a new screen size costs (compiles, attention plans, resize probe).

    python -m bench.first_request CHECKPOINT [--sizes 1920x1080,1280x720,...]

Loads the checkpoint through MlxEngine, then per size times prepare + run for the first, second
and fifth request of that size (a fresh screenshot each time), in order of the sizes given; then
`--rounds` rounds of one request per size in turn (a workload of mixed sizes).
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
    ap.add_argument("--sizes", default="1920x1080,1280x720,2560x1440,1440x900,1366x768,1536x864")
    ap.add_argument("--rounds", type=int, default=4, help="then requests cycling through all sizes")
    a = ap.parse_args()
    eng = MlxEngine(ModelSpec(path=a.checkpoint, max_pixels=5_720_064, screenshot_cache_mb=0), EngineOptions("first", "/tmp", 1 << 30))
    t = time.perf_counter()
    eng.load()
    print(f"load {time.perf_counter() - t:.1f} s", flush=True)
    print("| size | 1st request ms (prepare + forward + head) | 2nd | 5th |\n|---|---|---|---|")
    for s in a.sizes.split(","):
        w, h = (int(v) for v in s.split("x"))
        runs = [request(eng, w, h, i) for i in range(5)]
        print(f"| {s} | {runs[0][0]:.0f} ({runs[0][1]}) | {runs[1][0]:.0f} ({runs[1][1]}) | "
              f"{runs[4][0]:.0f} ({runs[4][1]}) |", flush=True)
    # A mixed workload (an evaluation set, browser windows of many sizes): every size again in
    # turn; what a request costs once its size has been seen, with the others in between.
    cycled: dict[str, list[float]] = {s: [] for s in a.sizes.split(",")}
    for r in range(a.rounds):
        for s in cycled:
            w, h = (int(v) for v in s.split("x"))
            cycled[s].append(request(eng, w, h, 10 + r)[0])
    print("\n| size | sizes in turn, median ms (rounds 2 on) | max ms |\n|---|---|---|")
    for s, ts in cycled.items():
        print(f"| {s} | {statistics.median(ts[1:]):.0f} | {max(ts[1:]):.0f} |", flush=True)


def request(eng: MlxEngine, w: int, h: int, seed: int) -> tuple[float, str]:
    """ms for prepare + run of one fresh w x h screenshot, and its 'prepare + forward + head' split."""
    req = GroundingRequest(f"{w}x{h}-{seed}", png_bytes(w, h, seed=seed), f"click Button {seed % 10}")
    mx.synchronize()
    t = time.perf_counter()
    (out,) = eng.run([eng.prepare(req)])
    mx.synchronize()
    ms = (time.perf_counter() - t) * 1e3
    return ms, " + ".join(f"{out.timings[k]:.0f}" for k in ("preprocess", "forward", "head"))


if __name__ == "__main__":
    main()
