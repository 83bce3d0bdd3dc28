"""Grounding latency of MlxEngine on a GUI-Actor-2B-shaped random checkpoint (GPU machine).

    python -m bench.gpu_ground [--reps N] [--warmup N] [--sizes 1280x720,1920x1080,2560x1440]
                               [--dtype bfloat16] [--torch-baseline PATH/prefill_floor.py] [--smoke]

Writes a real-size random checkpoint (Qwen2-VL-2B dims + the pointer head, bf16 safetensors in 4
shards, the tiny byte-level tokenizer) to a temp folder, loads it through MlxEngine (load time,
weight bytes), then per screenshot size: preprocess (CPU) once, warm up, and times `engine.run`
end to end with mx.synchronize (median of N), with the engine's own forward/head split and the
peak memory of the run. `--torch-baseline` runs `prefill_floor.py torch W H N sdpa` per size in
the same call. `--smoke` uses tiny dims and small images (a CPU check of this script).
Note: the byte-level tokenizer makes the system prompt ~120 tokens longer than Qwen's BPE would.
"""
from __future__ import annotations

import argparse
import io
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image


def screenshot(w: int, h: int, seed: int = 0) -> bytes:
    """A PNG with GUI-like flat blocks (content does not change the cost, only the size does)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 40), max(1, w // 40), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.Resampling.NEAREST).save(buf, "PNG")
    return buf.getvalue()


def torch_baseline(script: str, w: int, h: int, reps: int, shape: str = "2b") -> str:
    """Median ms of `script torch W H REPS sdpa` (prefill_floor.py, or bench/torch_forward.py,
    which also takes the 7B shape)."""
    extra = ["--shape", shape] if shape != "2b" else []
    out = subprocess.run([sys.executable, script, "torch", str(w), str(h), str(reps), "sdpa", *extra],
                         capture_output=True, text=True, timeout=600)
    m = re.search(r"median ([\d.]+) ms", out.stdout)
    return m.group(1) if m else f"failed: {(out.stderr or out.stdout).strip()[-200:]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_ground")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sizes", default="1280x720,1920x1080,2560x1440")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32", "auto"))
    ap.add_argument("--max-pixels", type=int, default=5_720_064)
    ap.add_argument("--torch-baseline", default=None, metavar="PREFILL_FLOOR_PY")
    ap.add_argument("--checkpoint", default=None, help="use this checkpoint folder instead of writing one")
    ap.add_argument("--batches", default="1,2,4,8", help="batch sizes timed at 1920x1080 (throughput)")
    ap.add_argument("--quantize", default="8,4", help="bit widths compared against the dtype run ('' = none)")
    ap.add_argument("--shape", choices=("2b", "7b", "3b-qwen2.5", "7b-qwen2.5"), default="2b",
                    help="GUI-Actor dims when the checkpoint is written here, and the PyTorch baseline's "
                         "(all but 2b: pass --torch-baseline bench/torch_forward.py)")
    ap.add_argument("--smoke", action="store_true", help="tiny dims, small images: checks the script on CPU")
    args = ap.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    if args.smoke:
        sizes = [(320, 180), (400, 300)]
        args.reps, args.warmup = min(args.reps, 2), 1

    import mlx.core as mx

    from common.config import ModelSpec
    from workers.engine import EngineOptions, GroundingRequest
    from workers.mlx.engine import MlxEngine
    from workers.tiny_checkpoint import Dims, write_tiny_checkpoint

    print(f"device {mx.default_device()} {mx.device_info() if hasattr(mx, 'device_info') else ''}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gui-actor-2b-") as tmp:
        t = time.perf_counter()
        dims = Dims() if args.smoke else {"2b": Dims.gui_actor_2b, "7b": Dims.gui_actor_7b,
                                          "3b-qwen2.5": Dims.gui_actor_3b_qwen2_5,
                                          "7b-qwen2.5": Dims.gui_actor_7b_qwen2_5}[args.shape]()
        path = args.checkpoint or write_tiny_checkpoint(
            f"{tmp}/ckpt", "qwen2_5_vl" if args.shape.endswith("qwen2.5") else "qwen2_vl", seed=0,
            shards=1 if args.smoke else 4, dims=dims,
            dtype="F32" if args.smoke else "BF16")
        print(f"checkpoint written in {time.perf_counter() - t:.1f}s", flush=True)
        # no screenshot cache: every run here repeats one screenshot, and must run the whole forward
        spec = ModelSpec(path=str(path), dtype=args.dtype, max_pixels=args.max_pixels,
                         max_context_length=65536, max_batch=64, screenshot_cache_mb=0)
        engine = MlxEngine(spec, EngineOptions("bench", tmp, 1 << 30))
        report = engine.load()
        print(f"load {report.load_seconds:.2f}s, weights {report.weights_bytes / 1e9:.2f} GB, "
              f"dtype {engine.dtype}, language model: {'ours' if engine._lm else 'mlx-vlm'}", flush=True)
        rows = []
        for w, h in sizes:
            req = GroundingRequest(f"{w}x{h}", screenshot(w, h), "click the search button")
            engine.prepare(req)            # first sight of this size: Pillow's pass order is measured
            time.sleep(2)                  # in the background (workers/parallel_resize.py)
            prep = []
            for _ in range(3):
                t = time.perf_counter()
                job = engine.prepare(req)
                prep.append(time.perf_counter() - t)
            exact = "-"
            if job.image.resize_order:      # the device resize must give PIL's bytes
                img = Image.open(io.BytesIO(req.image)).convert("RGB")
                want = np.asarray(img.resize(job.image.resized, Image.Resampling.BICUBIC))
                exact = "yes" if np.array_equal(np.array(engine._resized(job.image)), want) else "NO"
            times, fwd, head, res = timed_runs(engine, job, args.warmup, args.reps)
            peak = engine.memory().peak
            vlm_fwd = "-"
            if engine._lm is not None:       # the same with mlx-vlm's language-model forward
                ours, engine._lm = engine._lm, None
                vlm_fwd = f"{statistics.median(timed_runs(engine, job, args.warmup, args.reps)[1]):.1f}"
                engine._lm = ours
            base = torch_baseline(args.torch_baseline, w, h, args.reps, args.shape) if args.torch_baseline else "-"
            rows.append((f"{w}x{h}", "x".join(map(str, res.resized_size)), res.image_tokens, res.prompt_tokens,
                         statistics.median(prep) * 1e3, statistics.median(times) * 1e3, min(times) * 1e3,
                         statistics.median(fwd), statistics.median(head), peak / 1e9, base, exact, vlm_fwd))
            print(f"done {w}x{h}", flush=True)
        extra = []
        bw, bh = sizes[len(sizes) // 2]
        if args.batches:
            extra += batch_rows(engine, GroundingRequest("b", screenshot(bw, bh), "click OK"),
                                [int(b) for b in args.batches.split(",")], args.reps)
        if args.quantize:
            kw = dict(dtype=args.dtype, max_pixels=args.max_pixels, max_context_length=65536, max_batch=1,
                      screenshot_cache_mb=0)
            extra += quantize_rows(path, engine, kw, [int(b) for b in args.quantize.split(",")], tmp,
                                   n_screens=2 if args.smoke else 8, size=(bw, bh))
    print("\n| image | resized | visual tokens | prompt tokens | preprocess ms (CPU) | run median ms | "
          "run min ms | forward ms | head ms | peak GB | torch sdpa median ms | device resize = PIL | "
          "forward ms, mlx-vlm's LM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.1f} | {r[7]:.1f} | "
              f"{r[8]:.1f} | {r[9]:.2f} | {r[10]} | {r[11]} | {r[12]} |")
    for line in extra:
        print(line)
    return 0


def timed_runs(engine, job, warmup: int, reps: int):
    """(run seconds, forward ms, head ms, last result) of `reps` single-job runs after warm-up; the
    engine's peak memory is reset before the timed runs."""
    import mlx.core as mx
    for _ in range(warmup):
        engine.run([job])
    mx.synchronize()
    engine.reset_peak()
    times, fwd, head = [], [], []
    for _ in range(reps):
        mx.synchronize()
        t = time.perf_counter()
        (res,) = engine.run([job])
        mx.synchronize()
        times.append(time.perf_counter() - t)
        fwd.append(res.timings["forward"])
        head.append(res.timings["head"])
    return times, fwd, head, res


def batch_rows(engine, req, batches: list[int], reps: int) -> list[str]:
    """Throughput of one forward over B copies of a prepared 1080p job."""
    import mlx.core as mx
    job = engine.prepare(req)
    out = ["", "| batch | run median ms | ms per image | images/s | peak GB |", "|---|---|---|---|---|"]
    for b in batches:
        engine.run([job] * b)
        engine.reset_peak()
        times = []
        for _ in range(max(3, reps // 2)):
            mx.synchronize()
            t = time.perf_counter()
            engine.run([job] * b)
            mx.synchronize()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        out.append(f"| {b} | {med * 1e3:.1f} | {med * 1e3 / b:.1f} | {b / med:.2f} | {engine.memory().peak / 1e9:.2f} |")
    return out


def quantize_rows(path, base_engine, spec_kw: dict, bits_list: list[int], tmp: str, n_screens: int = 8,
                  size: tuple[int, int] = (1920, 1080)) -> list[str]:
    """Points of 8/4-bit language-model weights against the unquantized run on generated screens.
    Random weights: this measures numeric drift of the chosen point, not grounding accuracy."""
    import mlx.core as mx
    from common.config import ModelSpec
    from workers.engine import EngineOptions, GroundingRequest
    from workers.mlx.engine import MlxEngine
    reqs = [GroundingRequest(f"q{i}", screenshot(*size, seed=i), f"click button {i}") for i in range(n_screens)]
    base = [base_engine.run([base_engine.prepare(r)])[0] for r in reqs]
    out = ["", f"| weights | weights GB | forward ms ({size[0]}x{size[1]}) | top-1 same token | mean top-1 distance px |",
           "|---|---|---|---|---|"]
    for bits in bits_list:
        eng = MlxEngine(ModelSpec(path=str(path), quantize=bits, **spec_kw), EngineOptions("q", tmp, 1 << 30))
        rep = eng.load()
        res = [eng.run([eng.prepare(r)])[0] for r in reqs]
        fwd = statistics.median(r.timings["forward"] for r in res[1:] or res)
        same, dist = 0, []
        for a, b in zip(base, res):
            pa, pb = a.points[0], b.points[0]
            gx, gy = a.image_size[0] / a.grid[1], a.image_size[1] / a.grid[0]
            same += int(abs(pa["x"] - pb["x"]) < gx / 2 and abs(pa["y"] - pb["y"]) < gy / 2)
            dist.append(((pa["x"] - pb["x"]) ** 2 + (pa["y"] - pb["y"]) ** 2) ** 0.5)
        out.append(f"| {bits}-bit LM | {rep.weights_bytes / 1e9:.2f} | {fwd:.1f} | {same}/{len(reqs)} | "
                   f"{statistics.mean(dist):.1f} |")
        eng.unload()
        del eng
        mx.clear_cache()
    return out


if __name__ == "__main__":
    raise SystemExit(main())
