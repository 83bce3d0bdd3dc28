"""What the first request at a new screen size costs (compiles, attention plans, resize probe).

    python -m bench.first_request CHECKPOINT [--sizes 1920x1080,1280x720,...]

Loads the checkpoint through MlxEngine, then per size times prepare + run for the first, second
and fifth request of that size (a fresh screenshot each time), in order of the sizes given.
"""
from __future__ import annotations

import argparse
import time

import mlx.core as mx

from bench.screens import png_bytes
from common.config import ModelSpec
from workers.engine import EngineOptions, GroundingRequest
from workers.mlx.engine import MlxEngine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--sizes", default="1920x1080,1280x720,2560x1440,1440x900")
    a = ap.parse_args()
    eng = MlxEngine(ModelSpec(path=a.checkpoint, max_pixels=5_720_064), EngineOptions("first", "/tmp", 1 << 30))
    t = time.perf_counter()
    eng.load()
    print(f"load {time.perf_counter() - t:.1f} s", flush=True)
    print("| size | 1st request ms (prepare + forward + head) | 2nd ms | 5th ms |\n|---|---|---|---|")
    for s in a.sizes.split(","):
        w, h = (int(v) for v in s.split("x"))
        times, parts = [], []
        for i in range(5):
            req = GroundingRequest(f"{s}-{i}", png_bytes(w, h, seed=i), f"click Button {i}")
            mx.synchronize()
            t = time.perf_counter()
            (out,) = eng.run([eng.prepare(req)])
            mx.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
            parts.append(" + ".join(f"{out.timings[k]:.0f}" for k in ("preprocess", "forward", "head")))
        print(f"| {s} | {times[0]:.0f} ({parts[0]}) | {times[1]:.0f} | {times[4]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
