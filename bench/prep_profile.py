"""Where a screenshot's CPU preprocessing goes (the worker's preprocessing thread), per size.

    python -m bench.prep_profile [--sizes 1280x720,1920x1080,2560x1440] [--reps 10]

Median ms of: PNG decode (workers.images.decode_image), PIL's whole-image bicubic resize, the
strip-parallel resize (workers.parallel_resize, after its pass order is learned), and the rest of
`preprocess` for the chosen path, back to back and with the CPU idle 130 ms before each (as
between a single client's requests while the GPU runs the forward). The PNGs are bench.screens' GUI-like screenshots.
"""
from __future__ import annotations

import argparse
import os

from PIL import Image

from bench.screens import png_bytes
from bench.timing import host_median_ms as med
from workers import parallel_resize as pr
from workers.images import decode_image, plan_resize, preprocess, size_of


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1280x720,1920x1080,2560x1440")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--max-pixels", type=int, default=5_720_064)
    a = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, resize pool {pr._threads} threads")
    print("| image | PNG KB | decode ms | PIL resize ms | strip resize ms | preprocess total ms | same after 130 ms idle |\n|---|---|---|---|---|---|---|")
    for s in a.sizes.split(","):
        w, h = (int(v) for v in s.split("x"))
        data = png_bytes(w, h)
        src, _, dst = plan_resize(decode_image(data, 1 << 30), 3136, a.max_pixels)
        order = pr.pass_order(size_of(src), dst)
        pr._orders[(size_of(src), dst)] = order
        dec = med(lambda: decode_image(data, 1 << 30), a.reps)
        whole = med(lambda: Image.fromarray(src).resize(dst, Image.Resampling.BICUBIC), a.reps)
        strips = med(lambda: pr.resize_in_strips(src, dst, order), a.reps) if order else float("nan")
        prep = lambda: preprocess(decode_image(data, 1 << 30), 3136, a.max_pixels, patches=False)
        total, idle = med(prep, a.reps), med(prep, a.reps, gap_s=0.13)
        print(f"| {w}x{h} | {len(data) // 1024} | {dec:.1f} | {whole:.1f} | {strips:.1f} | {total:.1f} | {idle:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
