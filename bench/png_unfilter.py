"""A screenshot PNG's decode: Pillow on the CPU against zlib-ng inflate + the GPU unfilter kernel.

    python -m bench.png_unfilter [--sizes 1280x720,1920x1080,2560x1440] [--reps 20]

Median ms of: workers.images.decode_image (Pillow, what the worker did before); the CPU half of
the new path (workers.png_rows.filtered_rows: header, zlib-ng inflate); the GPU half
(workers/mlx/png_unfilter.py: upload of the rows, the kernel, synchronised) at a few block sizes;
and whether the GPU's pixels equal Pillow's. bench.screens' flat-area screenshots, and the same
with a noisy photo-like block. Needs MLX's CUDA backend.
"""
from __future__ import annotations

import argparse
import io

import mlx.core as mx
import numpy as np
from PIL import Image

from bench.prep_profile import med
from bench.screens import png_bytes
from workers.images import decode_image
from workers.mlx import png_unfilter
from workers.png_rows import filtered_rows

CONFIGS = (1024, 512, 256)     # threads per block


def noisy(data: bytes) -> bytes:
    a = np.array(Image.open(io.BytesIO(data)))
    h, w = a.shape[:2]
    rng = np.random.default_rng(0)
    a[h // 5:h // 2, w // 6:w // 2] = rng.integers(0, 32, (h // 2 - h // 5, w // 2 - w // 6, 3), dtype=np.uint8) * 8
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def gpu_ms(kernel, rows: np.ndarray, reps: int) -> float:
    def once():
        mx.eval(kernel(mx.array(rows)))
        mx.synchronize()
    once()
    return med(once, reps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1280x720,1920x1080,2560x1440")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    loaded = png_unfilter.load()
    print(f"device {mx.default_device()}; load() probe: {'passed' if loaded else 'declined'}")
    kernels = {c: png_unfilter.PngUnfilter(threads=c) for c in CONFIGS}
    print("| image | PNG KB | Pillow decode ms | inflate (CPU) ms | "
          + " | ".join(f"unfilter (GPU) {t} threads ms, = Pillow's" for t in CONFIGS)
          + " |\n|---|---|---|---|" + "---|" * len(CONFIGS))
    for s in a.sizes.split(","):
        w, h = (int(v) for v in s.split("x"))
        for label, data in ((f"{w}x{h}", png_bytes(w, h)), (f"{w}x{h} noisy", noisy(png_bytes(w, h)))):
            rows = filtered_rows(data)
            want = np.asarray(decode_image(data, 1 << 30))
            cols = [f"{med(lambda: decode_image(data, 1 << 30), a.reps):.2f}",
                    f"{med(lambda: filtered_rows(data), a.reps):.2f}"]
            for k in kernels.values():
                try:
                    same = np.array_equal(np.array(k(mx.array(rows))), want)
                    cols.append(f"{gpu_ms(k, rows, a.reps):.2f}, {'yes' if same else 'NO'}")
                except Exception as exc:
                    cols.append(f"failed: {type(exc).__name__}")
            filters = np.bincount(rows[:, 0], minlength=5).tolist()
            print(f"| {label} (filters None/Sub/Up/Avg/Paeth: {filters}) | {len(data) // 1024} | "
                  + " | ".join(cols) + " |", flush=True)


if __name__ == "__main__":
    main()
