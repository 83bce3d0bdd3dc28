"""Our vision forward against mlx-vlm's own tower on one checkpoint (GPU; either backbone).

    python -m bench.vision_compare CHECKPOINT [W H] [--reps N]

Loads the checkpoint through MlxEngine, prepares one screenshot, and times (median of N, after
warm-up) mlx-vlm's `VisionModel` on transformers-style pixel values and our `FastVision` on the
uint8 image; prints both, the speed-up and the largest difference between their outputs.
"""
from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np

from bench.screens import png_bytes
from bench.timing import median_ms
from common.config import ModelSpec
from workers.engine import EngineOptions, GroundingRequest
from workers.images import pixel_values_of
from workers.mlx.engine import MlxEngine
from workers.mlx.vision import normalized_patches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("size", nargs="*", type=int, default=[1920, 1080])
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    eng = MlxEngine(ModelSpec(path=a.checkpoint, max_pixels=5_720_064), EngineOptions("cmp", "/tmp", 1 << 30))
    eng.load()
    job = eng.prepare(GroundingRequest("c", png_bytes(*a.size), "click OK"))
    rgb = eng._resized(job.image)
    gh, gw = job.image.grid_thw[1:]
    tower, ours = eng._model.vision_tower, eng._vision
    pv = mx.array(pixel_values_of(np.array(rgb))).astype(ours.dtype)
    theirs_fn = lambda: tower(pv, mx.array([[1, gh, gw]]))
    ours_fn = lambda: ours([normalized_patches(rgb, ours.dtype)], [(gh, gw)])
    diff = mx.abs(theirs_fn().astype(mx.float32) - ours_fn().astype(mx.float32)).max().item()
    t_theirs, t_ours = median_ms(theirs_fn, a.reps), median_ms(ours_fn, a.reps)
    print(f"{type(ours).__name__} {a.size[0]}x{a.size[1]} ({gh}x{gw} patches): mlx-vlm tower {t_theirs:.1f} ms, "
          f"ours {t_ours:.1f} ms, {t_theirs / t_ours:.2f}x; max |diff| {diff:.3g}")


if __name__ == "__main__":
    main()
