"""Joules per grounding forward on an NVIDIA GPU: ours (batch 1 and batched, with our attention
kernel and with cuDNN's) against PyTorch's forward, on one card in one call.

    python -m bench.energy --checkpoint /tmp/ga2b [--size 1920x1080] [--reps 60] [--batches 1,8]
                           [--torch-baseline bench/torch_forward.py] [--shape 2b]

Why: an H100's or H200's 1080p forward runs at the card's 700 W cap, where the clock drops until the
power fits (twenty-first session, bench/RESULTS.md). There the time a forward takes follows the
energy it needs, and a change that saves time at a lower power (fewer bytes moved by a memory-bound
kernel, say) saves little. This puts the energy per image beside the time, from the driver's energy
counter (NVML) around `reps` forwards (bench/gpu_energy.py), with the median power and SM clock sampled
meanwhile. The checkpoint is one bench.write_checkpoint wrote (random weights, the real shapes).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

from bench import gpu_energy
from bench.gpu_energy import EnergyMeter
from bench.screens import png_bytes
from bench.timing import device_times


def measure(run, images: int, reps: int) -> str:
    """One table row's numbers for `reps` calls of `run` (each `images` images), after two warm-ups
    outside the meter."""
    for _ in range(2):
        run()
    with EnergyMeter() as m:
        times = device_times(run, reps, warmup=0)
    per = images * reps
    return (f"{statistics.median(times) * 1e3 / images:.1f} | {m.joules / per:.1f} | {m.watts:.0f} | "
            f"{m.sm_mhz:.0f}")


def torch_row(script: str, w: int, h: int, reps: int, shape: str) -> str:
    out = subprocess.run([sys.executable, script, "torch", str(w), str(h), str(reps), "sdpa", "--energy",
                          *(["--shape", shape] if shape != "2b" else [])], capture_output=True, text=True, timeout=900)
    m = re.search(r"median ([\d.]+) ms.*\n.*energy ([\d.]+) J per forward, ([\d.]+) W, ([\d.]+) MHz", out.stdout)
    if not m:
        return f"| PyTorch (transformers, sdpa) | 1 | failed: {(out.stderr or out.stdout).strip()[-300:]} | | | |"
    return f"| PyTorch (transformers, sdpa) | 1 | {float(m[1]):.1f} | {float(m[2]):.1f} | {float(m[3]):.0f} | {float(m[4]):.0f} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.energy")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--reps", type=int, default=60, help="forwards per row (batches: reps / batch)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--torch-baseline", default=None, metavar="SCRIPT", help="bench/torch_forward.py")
    ap.add_argument("--shape", default="2b", help="the baseline's model shape")
    ap.add_argument("--dtype", default="bfloat16", help="ours: bfloat16 (float32 for a CPU check of this script)")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))

    import mlx.core as mx

    from common.config import ModelSpec
    from workers.engine import EngineOptions, GroundingRequest
    from workers.mlx.engine import MlxEngine

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = ModelSpec(path=args.checkpoint, dtype=args.dtype, max_pixels=5_720_064, max_batch=64,
                         screenshot_cache_mb=0)
        engine = MlxEngine(spec, EngineOptions("energy", tmp, 1 << 30))
        engine.load()
        job = engine.prepare(GroundingRequest("e", png_bytes(w, h), "click the search button"))
        vis = engine._vision
        for b in (int(v) for v in args.batches.split(",")):
            rows.append(f"| ours | {b} | " + measure(lambda: engine.run([job] * b), b, max(3, args.reps // b)) + " |")
        if vis.flash is not None:         # the same with cuDNN's attention (GROUNDING_FLASH_ATTENTION=0)
            flash, vis.flash = vis.flash, None
            rows.append("| ours, cuDNN attention | 1 | " + measure(lambda: engine.run([job]), 1, args.reps) + " |")
            vis.flash = flash
        engine.unload()
        mx.clear_cache()
    if args.torch_baseline:
        rows.append(torch_row(args.torch_baseline, w, h, args.reps, args.shape))
    nvml = gpu_energy.Nvml()
    print(f"{nvml.name()}, power limit {nvml.power_limit_mw() / 1e3:.0f} W; {w}x{h}; {args.reps} forwards per row; "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}")
    print("\n| forward | batch | ms per image | J per image | median W | median SM MHz |\n|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
