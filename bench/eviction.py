"""Eviction benchmark: alternate requests between two models that do not fit together.

    python -m bench.eviction [--switches 6] [--fake-load-s 2.0] [--skip-fake] [--skip-mlx]
                             [--mlx-models A,B] [--dtype bfloat16]

Two pairs, each under a memory budget that holds one model of the pair but not both, with
min_residency_s 0 (every switch evicts):
- fake engine, 1 GB "weights" each, `load_s` set to a realistic load time (default 2 s);
- two real MLX models: by default the tiny ones (tiny:qwen2_vl and tiny:qwen2_5_vl, ~1 MB of
  weights each and their activations); on a GPU machine, checkpoints at real size (say
  `--mlx-models /tmp/ga2b,/tmp/ga7b --dtype bfloat16`, from bench.write_checkpoint). A first run
  with no budget learns each model's charge (weights + the working memory learned from job
  peaks); the measured run's budget is the larger charge plus half the smaller one.
An evicted model is unloaded inside its worker, so a switch's load is a reload in a warm process.
For every switch it records the request latency (evict the other + load + run), the load time
the worker reported, and the rest (eviction, dispatch); steady-state latency with the model
resident is measured for comparison. Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common.client import Client
from tests.rawbroker import png
from tests.stackutil import Stack, fake_model

IMG = png(640, 400)


def run_pair(tmp: Path, models: dict, budget: int | None, switches: int, min_residency_s: float = 0.0) -> dict:
    cfg = {"broker": {"min_residency_s": min_residency_s, "heartbeat_interval_ms": 250,
                      **({"memory_budget": budget} if budget else {})},
           "supervisor": {"restart_backoff_s": 0.1, "report_interval_ms": 250},
           "models": models, "cache_dir": str(tmp.parent / "cache")}
    tmp.mkdir(parents=True, exist_ok=True)
    st = Stack(tmp, cfg, procs=("broker", "supervisor"))
    ids = list(models)
    out = {"switch_s": [], "load_s": [], "rest_s": [], "steady_s": [], "charges": {}, "evictions": 0}
    try:
        st.start(ready_timeout_s=120)
        with Client(st.client_endpoint, default_ttl_s=300) as c:
            for mid in ids:                       # warm-up: first loads (tiny checkpoints are generated here)
                c.ground(mid, IMG, "click")
            for i in range(switches):
                mid = ids[i % 2]
                t0 = time.perf_counter()
                res = c.ground(mid, IMG, "click")
                total = time.perf_counter() - t0
                (m,) = c.models(mid)
                job_s = res.timings.get("total", 0) / 1000
                if budget:   # a switch: the other model was evicted and this one loaded
                    out["switch_s"].append(total)
                    out["load_s"].append(m["load_seconds"])
                    out["rest_s"].append(max(0.0, total - m["load_seconds"] - job_s))
                t0 = time.perf_counter()
                c.ground(mid, IMG, "click")       # resident now: the steady-state latency
                out["steady_s"].append(time.perf_counter() - t0)
            stats = c.stats()
            out["charges"] = {mid: stats["models"][mid]["memory"]["committed_bytes"] for mid in ids}
            out["peaks"] = {mid: stats["models"][mid]["memory"]["peak_bytes"] for mid in ids}
            out["evictions"] = stats["counters"].get("evictions_total.lru", 0) + \
                stats["counters"].get("evictions_total.pressure", 0)
            out["loads"] = stats["counters"].get("model_loads_total", 0)
            out["budget"] = stats["memory"]["budget"]
    finally:
        st.stop()
    return out


def med(v: list[float]) -> str:
    return f"{statistics.median(v) * 1000:.0f}" if v else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.eviction", description=__doc__.splitlines()[0])
    ap.add_argument("--switches", type=int, default=6)
    ap.add_argument("--fake-load-s", type=float, default=2.0)
    ap.add_argument("--skip-fake", action="store_true")
    ap.add_argument("--skip-mlx", action="store_true")
    ap.add_argument("--mlx-models", default="tiny:qwen2_vl,tiny:qwen2_5_vl",
                    help="two checkpoints (paths, or tiny:<backbone>)")
    ap.add_argument("--dtype", default=None, help="the models' dtype (default: the engine's auto)")
    args = ap.parse_args(argv)
    paths = args.mlx_models.split(",")
    if len(paths) != 2:
        ap.error("--mlx-models takes two checkpoints")
    tmp = Path(tempfile.mkdtemp(prefix="bench-eviction-"))
    rows = []

    gb = 1_000_000_000
    if not args.skip_fake:
        fake = {f"fake-{x}": fake_model(preload=False, max_batch=1, fake={
            "load_s": args.fake_load_s, "weights_bytes": gb, "job_bytes": 50_000_000, "latency_ms": 20}) for x in "ab"}
        r = run_pair(tmp / "fake", fake, int(1.5 * gb), args.switches)
        r["learned"] = {mid: gb + 50_000_000 for mid in fake}
        rows.append((f"fake engine, 1 GB each, load_s {args.fake_load_s:g}", r))

    if not args.skip_mlx:
        mlx = {}
        for i, path in enumerate(paths):
            spec = {"path": path, "engine": "mlx", "max_pixels": 300_000, "max_batch": 1,
                    **({"dtype": args.dtype} if args.dtype else {})}
            if path.startswith("tiny:"):
                # the tiny checkpoints' estimate would default to 100 MB; the fake knob sets it (MLX ignores it)
                spec["fake"] = {"weights_bytes": 1_000_000}
            mlx[f"m{i}-{Path(path).name.replace(':', '-')}"] = spec
        learn = run_pair(tmp / "mlx-learn", mlx, None, 2)
        charges = sorted(learn["charges"].values())
        budget = int(charges[-1] + 0.5 * charges[0])    # holds the larger one, not both
        r = run_pair(tmp / "mlx", mlx, budget, args.switches)
        r["learned"] = learn["charges"]
        rows.append((f"real MLX ({' / '.join(paths)}{', ' + args.dtype if args.dtype else ''})", r))

    print("| pair | budget | charge per model | switches | evictions | switch latency p50 (ms) "
          "| of which load (ms) | evict + dispatch (ms) | resident latency p50 (ms) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows:
        charges = ", ".join(f"{v / 1e6:.1f} MB" for v in r["learned"].values())
        print(f"| {name} | {r['budget'] / 1e6:.1f} MB | {charges} | {len(r['switch_s'])} | {r['evictions']} "
              f"| {med(r['switch_s'])} | {med(r['load_s'])} | {med(r['rest_s'])} | {med(r['steady_s'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
