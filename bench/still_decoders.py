"""Screenshot decoding on this host's CPU, per format: Pillow (what the worker did before
workers/still_decoders.py: decode, RGB, numpy) against the worker's decode_image.

    python -m bench.still_decoders [--sizes 1280x720,1920x1080,2560x1440] [--reps 15]

Screenshots: bench.screens' GUI-like window saved as PNG, JPEG and WebP the way bench.screens.SAVE
does, plus JPEG 4:4:4 and lossless WebP. 50 ms idle before each decode (a single client's pace).
Every decode's pixels are checked against Pillow's.
"""
from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image

from bench.prep_profile import med
from bench.screens import SAVE, screenshot
from workers import images, still_decoders

VARIANTS = {**SAVE,
            "jpeg 4:4:4": ("JPEG", {"quality": 85, "subsampling": 0}),
            "webp lossless": ("WEBP", {"lossless": True})}


def pillow(data: bytes) -> np.ndarray:
    return np.asarray(images.to_rgb(Image.open(io.BytesIO(data))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1280x720,1920x1080,2560x1440")
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    print(f"Pillow {Image.__version__}; imagecodecs decodes {sorted(still_decoders.SAME_AS_PILLOW | {'PNG'})}")
    print("| screenshot | format | KB | Pillow ms | worker ms | Pillow / worker | same pixels |\n|---|---|---|---|---|---|---|")
    for size in a.sizes.split(","):
        w, h = map(int, size.split("x"))
        img = screenshot(w, h, 1)
        for name, (fmt, params) in VARIANTS.items():
            buf = io.BytesIO()
            img.save(buf, fmt, **params)
            data = buf.getvalue()
            same = np.array_equal(images.decode_image(data, 1 << 30), pillow(data))
            slow = med(lambda: pillow(data), a.reps, 0.05)
            fast = med(lambda: images.decode_image(data, 1 << 30), a.reps, 0.05)
            print(f"| {size} | {name} | {len(data) // 1024} | {slow:.1f} | {fast:.1f} | {slow / fast:.1f}x | "
                  f"{'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
