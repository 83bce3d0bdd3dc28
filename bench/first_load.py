"""A model's first load on a machine whose MLX kernel cache is empty, and its next load: what MLX
JIT-compiles (NVRTC, CUDA) and how long each kernel takes.

    python -m bench.first_load CHECKPOINT [--modes 4:before,4,bf16] [--size 1920x1080]

Per mode, two child processes share one fresh kernel cache (MLX_PTX_CACHE_DIR) and one fresh CUDA
driver cache (CUDA_CACHE_PATH): the first loads with the cache empty, the second finds it full.
Each loads the engine (the load probe, then the warm-up at --size, as a worker does) and times the
load, a first request at --size, a question about the same screenshot (the screenshot cache's
path), and a reload in the same process after an unload (what an eviction leaves). After the cold
child, the kernels it wrote, in the order written, with the seconds since the one before (~ its
compile time, plus whatever ran in between; the kernel prebuild's helpers, workers/mlx/prebuild.py,
build theirs at the same time, and the load's lines about them are shown).
Modes: bf16; 8 or 4 (quantize, the engine as it is); "4:before" (the rule before: MLX's quantized
matmul under 512 rows, the load probe's reference in one call).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(path: str, mode: str, size: str) -> None:
    import logging

    import mlx.core as mx

    from bench.screens import png_bytes
    from common.config import ModelSpec
    from workers.engine import EngineOptions, GroundingRequest
    from workers.mlx import engine, language
    from workers.mlx.engine import MlxEngine

    bits, _, variant = mode.partition(":")
    if variant == "before":
        engine.dequantize_rows_here = lambda: 512
        language.probe_reference_step_here = lambda packed: 0
    w, h = (int(v) for v in size.split("x"))
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")     # the load's lines, for the parent
    spec = ModelSpec(path=path, dtype="bfloat16", quantize=None if bits == "bf16" else int(bits),
                     max_pixels=5_720_064, warmup=[size])
    eng = MlxEngine(spec, EngineOptions("first-load", tempfile.gettempdir(), 1 << 30))
    t = time.perf_counter()
    eng.load()
    out = {"load_s": time.perf_counter() - t}
    img = png_bytes(w, h, seed=7)
    for name, question in (("first_request_ms", "click the search button"), ("cached_question_ms", "open the menu")):
        mx.synchronize()
        t = time.perf_counter()
        eng.run([eng.prepare(GroundingRequest(name, img, question))])
        mx.synchronize()
        out[name] = (time.perf_counter() - t) * 1e3
    eng.unload()                    # as an eviction does: the worker's process stays, the model goes
    t = time.perf_counter()
    eng.load()
    out["reload_s"] = time.perf_counter() - t
    print("RESULT " + json.dumps(out), flush=True)


def run_child(path: str, mode: str, size: str, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.first_load", path, "--child", mode, "--size", size],
                          env=env, capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        if "prebuild" in line or "loaded" in line:
            print("   ", line, flush=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{mode}: child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def kernels_written(cache: Path) -> list[str]:
    files = sorted((p for p in cache.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime)
    rows, before = [], None
    for p in files:
        mtime = p.stat().st_mtime
        gap = "" if before is None else f"{mtime - before:.1f}"
        rows.append(f"| {p.name[:90]} | {p.stat().st_size / 1e3:.0f} | {gap} |")
        before = mtime
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.first_load")
    ap.add_argument("checkpoint")
    ap.add_argument("--modes", default="4:before,4,bf16")
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.checkpoint, a.child, a.size)
        return
    summary = ["| mode | cache | load s | first request ms | cached question ms | reload in the process s "
               "| MLX's kernels | ours |", "|---|---|---|---|---|---|---|---|"]
    for mode in a.modes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "mlx-kernels"
            env = dict(os.environ, MLX_PTX_CACHE_DIR=str(cache), CUDA_CACHE_PATH=str(Path(tmp) / "nv"))
            for state in ("empty", "full"):
                r = run_child(a.checkpoint, mode, a.size, env)
                mlx_kernels, ours = len(list(cache.glob("*.ptx"))), len(list(cache.glob("nvrtc-*.cubin")))
                summary.append(f"| {mode} | {state} | {r['load_s']:.1f} | {r['first_request_ms']:.0f} | "
                               f"{r['cached_question_ms']:.0f} | {r['reload_s']:.1f} | {mlx_kernels} | {ours} |")
                print(summary[-1], flush=True)
                if state == "empty":
                    print(f"\n{mode}: kernels in the order written\n\n| file | KB | s since the one before |\n"
                          "|---|---|---|", flush=True)
                    print("\n".join(kernels_written(cache)) + "\n", flush=True)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
