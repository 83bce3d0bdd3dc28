"""Where a screenshot PNG's decode goes, step by step (host CPU; workers/png.py).

    python -m bench.png_decode [--sizes 1280x720,1920x1080,2560x1440] [--reps 20] [--worker-malloc]

Median ms of: Pillow decoding the PNG as it is; zlib's and zlib-ng's inflate of its image data;
building the stored copy (workers/png.with_stored_image_data, inflate included); Pillow decoding
the stored copy; np.asarray of the decoded image (the copy sent to the device); and
workers.images.decode_image whole. bench.screens' flat-area screenshots, and the same with a
noisy photo-like block (a less compressible screen). `--worker-malloc`: with the worker's malloc
thresholds (workers/host_memory.py) instead of glibc's defaults.
"""
from __future__ import annotations

import argparse
import io
import struct
import zlib

import numpy as np
from PIL import Image
from zlib_ng import zlib_ng

from bench.prep_profile import med
from bench.screens import png_bytes
from workers.host_memory import keep_image_buffers_in_heap
from workers.images import decode_image
from workers.png import with_stored_image_data


def noisy(data: bytes) -> bytes:
    a = np.array(Image.open(io.BytesIO(data)))
    h, w = a.shape[:2]
    rng = np.random.default_rng(0)
    a[h // 5:h // 2, w // 6:w // 2] = rng.integers(0, 32, (h // 2 - h // 5, w // 2 - w // 6, 3), dtype=np.uint8) * 8
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def image_data(data: bytes) -> bytes:
    pos, out = 8, []
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        if data[pos + 4:pos + 8] == b"IDAT":
            out.append(data[pos + 8:pos + 8 + n])
        pos += 12 + n
    return b"".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1280x720,1920x1080,2560x1440")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--worker-malloc", action="store_true")
    a = ap.parse_args()
    print("malloc:", "worker's" if a.worker_malloc and keep_image_buffers_in_heap() else "glibc default")
    print("| image | PNG KB | Pillow ms | zlib inflate | zlib-ng inflate | stored copy | Pillow on stored copy "
          "| np.asarray | decode_image |\n|---|---|---|---|---|---|---|---|---|")
    for s in a.sizes.split(","):
        w, h = (int(v) for v in s.split("x"))
        for label, data in ((f"{w}x{h}", png_bytes(w, h)), (f"{w}x{h} noisy", noisy(png_bytes(w, h)))):
            z = image_data(data)
            stored = with_stored_image_data(data)
            img = decode_image(data, 1 << 30)
            cols = [med(lambda: Image.open(io.BytesIO(data)).load(), a.reps),
                    med(lambda: zlib.decompress(z), a.reps),
                    med(lambda: zlib_ng.decompressobj().decompress(z, 1 << 28), a.reps),
                    med(lambda: with_stored_image_data(data), a.reps),
                    med(lambda: Image.open(io.BytesIO(stored)).load(), a.reps),
                    med(lambda: np.asarray(img), a.reps),
                    med(lambda: decode_image(data, 1 << 30), a.reps)]
            print(f"| {label} | {len(data) // 1024} | " + " | ".join(f"{c:.1f}" for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
