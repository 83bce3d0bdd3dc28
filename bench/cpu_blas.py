"""MLX's CPU matmuls: OpenBLAS through workers/mlx/cpu_blas.py, or MLX's bundled reference BLAS.

    python -m bench.cpu_blas [CHECKPOINT] [--size 448x252] [--runs 2]
    GROUNDING_REFERENCE_BLAS=1 python -m bench.cpu_blas ...     # the bundled BLAS

Two float32 matmuls (medians of 5), then, given a checkpoint, the engine's load and single
requests at one screenshot size on the CPU (float32, no screenshot cache).
"""
from __future__ import annotations

import argparse
import time

import workers.mlx  # noqa: F401  (routes MLX's CPU matmuls to OpenBLAS)
import workers.mlx.cpu_blas as cpu_blas
import mlx.core as mx

from bench.screens import png_bytes
from bench.timing import median_ms


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_blas")
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--size", default="448x252")
    ap.add_argument("--runs", type=int, default=2)
    a = ap.parse_args()
    mx.set_default_device(mx.cpu)
    print(f"BLAS: {'OpenBLAS, ' + cpu_blas.loaded() if cpu_blas.loaded() else 'the bundled reference'}", flush=True)
    key = mx.random.key(0)
    for (m, k), n in (((1024, 1024), 1024), ((32, 1536), 8960)):
        x, w = mx.random.normal((m, k), key=key), mx.random.normal((n, k), key=key)
        mx.eval(x, w)
        print(f"{m} x {k} by ({n} x {k}).T: {median_ms(lambda: x @ w.T, 5):.1f} ms", flush=True)
    if not a.checkpoint:
        return
    from common.config import ModelSpec
    from workers.engine import EngineOptions, GroundingRequest
    from workers.mlx.engine import MlxEngine
    w, h = (int(v) for v in a.size.split("x"))
    eng = MlxEngine(ModelSpec(path=a.checkpoint, dtype="float32", warmup=[], screenshot_cache_mb=0),
                    EngineOptions("cpu", "/tmp/bench-cpu-blas", 1 << 30))
    t = time.perf_counter()
    eng.load()
    print(f"load {time.perf_counter() - t:.1f} s", flush=True)
    job = eng.prepare(GroundingRequest("c", png_bytes(w, h, seed=1), "click the search button"))
    for _ in range(a.runs):
        t = time.perf_counter()
        (res,) = eng.run([job])
        print(f"{w}x{h} ({res.image_tokens} image tokens of {res.prompt_tokens}): {time.perf_counter() - t:.2f} s, "
              f"top point ({res.points[0]['x']:.1f}, {res.points[0]['y']:.1f})", flush=True)


if __name__ == "__main__":
    main()
