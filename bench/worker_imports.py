"""What a worker's imports cost: the MLX engine and both backbones, in fresh processes.

    python -m bench.worker_imports [--runs 7]

Three ways, taking turns: nothing kept out; PyTorch kept out (a `sys.modules` entry of None, what
workers/torchless.py did before the forty-first session); PyTorch and transformers kept out
(`keep_torch_and_transformers_out`, what workers, split helpers and prebuild helpers do now).
Seconds and max RSS per way, medians and ranges; a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
t = time.perf_counter()
if sys.argv[1] == "torch":
    sys.modules.setdefault("torch", None)
elif sys.argv[1] == "both":
    from workers.torchless import keep_torch_and_transformers_out
    keep_torch_and_transformers_out()
import workers.mlx.engine, mlx_vlm.models.qwen2_vl, mlx_vlm.models.qwen2_5_vl
print(json.dumps({"s": time.perf_counter() - t, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "imported": sorted(m for m in ("torch", "transformers") if sys.modules.get(m) is not None)}))
"""
WAYS = {"none": "nothing", "torch": "PyTorch", "both": "PyTorch and transformers"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.worker_imports", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args(argv)
    rows: dict[str, list[dict]] = {way: [] for way in WAYS}
    for _ in range(args.runs):
        for way in WAYS:
            out = subprocess.run([sys.executable, "-c", CHILD, way], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{way}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                return 1
            rows[way].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| kept out | s median (range) | max RSS MB median | still imported |")
    print("|---|---|---|---|")
    for way, rs in rows.items():
        s = [r["s"] for r in rs]
        print(f"| {WAYS[way]} | {statistics.median(s):.3f} ({min(s):.3f}-{max(s):.3f}) | "
              f"{statistics.median(r['rss_mb'] for r in rs):.0f} | {', '.join(rs[-1]['imported']) or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
