"""Does a split replica answer as one GPU does? Real-size checkpoints, real GPUs.

    python3 -m bench.split_compare --model-path /tmp/ga2b [--screens 12] [--sizes 1920x1080,1280x720]

Loads the checkpoint twice in this process: alone on GPU 0, and split over GPUs 0 and 1
(`gpus_per_replica: 2`, the helper on CUDA device 1), then asks both the same questions about the
same bench.screens screenshots (each new, so each runs the whole forward; the screenshot cache
off) and compares the answers: points, and the attention maps' bytes. tests/test_vision_split.py
shows identical bits on the CPU; on a GPU, a library may pick another matmul algorithm for a
narrower or shorter matmul, which this would show as small differences.
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np

from bench.screens import encoded
from common.config import ModelSpec
from workers.engine import EngineOptions, GroundingRequest, GroundingResult
from workers.mlx.engine import MlxEngine


def engine(path: str, dtype: str, cache_dir: str, **spec) -> MlxEngine:
    e = MlxEngine(ModelSpec(path=path, dtype=dtype, screenshot_cache_mb=0, **spec),
                  EngineOptions("compare", cache_dir, 4096 * 4096, helper_gpus=("1",)))
    e.load()
    return e


def answer(e: MlxEngine, png: bytes, text: str) -> GroundingResult:
    [r] = e.run([e.prepare(GroundingRequest("q", png, text, return_attention=True))])
    assert isinstance(r, GroundingResult), r
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--screens", type=int, default=12)
    ap.add_argument("--sizes", default="1920x1080,1280x720")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        alone = engine(a.model_path, a.dtype, tmp)
        split = engine(a.model_path, a.dtype, tmp, devices=[0, 1], gpus_per_replica=2)
        print(f"language model split too: {split._helpers.language}")
        kernel = [getattr(e._vision, "window_attention", None) is not None for e in (alone, split)]
        print(f"window attention kernel loaded (Qwen2.5-VL on CUDA): alone {kernel[0]}, split's first rank "
              f"{kernel[1]} (a helper that declines it logs a warning)")
        print("| size | screens | same points | same attention bytes | largest attention difference | of its largest value |")
        print("|---|---|---|---|---|---|")
        for size in a.sizes.split(","):
            w, h = map(int, size.split("x"))
            same_points = same_bytes = 0
            worst = scale = 0.0
            for i in range(a.screens):
                png = encoded(w, h, 1000 + i, "png", i % 2 == 1)
                x, y = (answer(e, png, f"click Button {i}") for e in (alone, split))
                same_points += x.points == y.points
                same_bytes += x.attention == y.attention
                ax, ay = (np.frombuffer(r.attention, "<f4") for r in (x, y))
                worst, scale = max(worst, float(np.abs(ax - ay).max())), max(scale, float(np.abs(ax).max()))
            print(f"| {size} | {a.screens} | {same_points} | {same_bytes} | {worst:.3g} | {worst / scale:.2%} |", flush=True)


if __name__ == "__main__":
    main()
