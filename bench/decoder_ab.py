"""The engine with each PNG decoder, interleaved in one process (GPU or CPU; a 2B-shaped checkpoint).

    python -m bench.decoder_ab CHECKPOINT [--sizes 1280x720,1920x1080] [--rounds 6]

Per size, rounds of four screenshots through `prepare` + `run` with imagecodecs' plain libpng
decode, then with workers/png_inflate.py's (zlib-ng + libpng in bands), alternating, 50 ms apart
(a single client's pace). Prints the medians (first round left out) of the worker's preprocessing,
its forward and the whole, so a change in the forward that follows the decode would show too.
"""
from __future__ import annotations

import argparse
import statistics
import time

from bench.screens import png_bytes
from common.config import ModelSpec
from workers import still_decoders
from workers.engine import EngineOptions, GroundingRequest
from workers.mlx.engine import MlxEngine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--sizes", default="1280x720,1920x1080")
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    eng = MlxEngine(ModelSpec(path=a.checkpoint, screenshot_cache_mb=0), EngineOptions("decoder-ab", "/tmp", 1 << 30))
    eng.load()
    fast = still_decoders.FAST_INFLATE
    print("| size | decoder | preprocess ms | forward ms | prepare + run ms |\n|---|---|---|---|---|")
    for s in a.sizes.split(","):
        w, h = (int(v) for v in s.split("x"))
        datas = [png_bytes(w, h, seed=i) for i in range(4)]
        res = {name: {"prep": [], "fwd": [], "all": []} for name in ("libpng", "zlib-ng + libpng in bands")}
        for _ in range(a.rounds):
            for name, r in res.items():
                still_decoders.FAST_INFLATE = fast and name != "libpng"
                for data in datas:
                    time.sleep(0.05)
                    t = time.perf_counter()
                    job = eng.prepare(GroundingRequest("ab", data, "click Button 1"))
                    (out,) = eng.run([job])
                    r["all"].append((time.perf_counter() - t) * 1e3)
                    r["prep"].append(job.preprocess_ms)
                    r["fwd"].append(out.timings["forward"])
        for name, r in res.items():
            m = {k: statistics.median(v[len(datas):]) for k, v in r.items()}
            print(f"| {s} | {name} | {m['prep']:.2f} | {m['fwd']:.2f} | {m['all']:.2f} |", flush=True)
    still_decoders.FAST_INFLATE = fast


if __name__ == "__main__":
    main()
