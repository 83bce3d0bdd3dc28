"""How fast can a decoded screenshot reach the GPU under MLX's CUDA backend?

    python3 -m bench.upload [--sizes 1280x720,1920x1080,2560x1440] [--reps 15]

Why: `mx.array(rgb)` writes the image into CUDA managed memory, page by page, and the first
kernel that reads it migrates those pages to the device, page fault by page fault: ~2.7 ms of host
time and ~1.2 ms more on the first device op for a 1080p screenshot (fourth session,
bench/RESULTS.md), all of it inside the forward. A 6 MB copy over PCIe takes ~0.3-0.6 ms.

Variants, each followed by the forward's first real op (PIL's bicubic resize on the device to the
smart_resize size) and a synchronisation; medians over --reps, ms:
- `mx.array`: what the engine did before workers/mlx/cuda_upload.py;
- `copy`: cuda_upload: one cuMemcpyHtoD into a device buffer of MLX's, from an ordinary numpy
  array (images resized on the CPU) or from one of its page-locked buffers (decoded screenshots);
- `device-born`: the same op on an array computed on the device (no upload at all: the floor).
Each variant's resized bytes are compared with the `mx.array` variant's. Then PNG, JPEG and WebP
screenshots decoded into ordinary and page-locked arrays, alone and with the upload.
"""
from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

from workers.images import smart_resize
from workers.mlx import cuda_upload
from workers.mlx.resize import resize_bicubic


def timed(fn, reps: int) -> tuple[float, float, mx.array]:
    """(median ms of fn's own host time, median ms to the op's result on the device, last result)."""
    host, total, out = [], [], None
    for _ in range(reps + 2):
        mx.synchronize()
        time.sleep(0.02)                 # the GPU idles between requests, as it does between forwards
        t0 = time.perf_counter()
        out, t_host = fn()
        mx.eval(out)
        mx.synchronize()
        total.append((time.perf_counter() - t0) * 1e3)
        host.append((t_host - t0) * 1e3)
    return statistics.median(host[2:]), statistics.median(total[2:]), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1280x720,1920x1080,2560x1440")
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    print(f"device {mx.default_device()}, MLX {mx.__version__}")
    up = cuda_upload.load()
    print(f"cuda_upload.load(): {'ready' if up else 'unavailable'}")
    print("| image | MB | variant | upload host ms | upload + resize ms | same bytes as mx.array |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for size in a.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        rh, rw = smart_resize(h, w, max_pixels=2560 * 1440)
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rgb[:, : w // 2] = 240                      # flat half, as screenshots have
        born = mx.array(rgb)
        mx.eval(born * 1)                           # warm every shape and the resize weights

        def plain():
            x = mx.array(rgb)
            t = time.perf_counter()
            return resize_bicubic(x, rw, rh, "hv"), t

        def device_born():
            return resize_bicubic(born, rw, rh, "hv"), time.perf_counter()

        variants = [("mx.array", plain), ("device-born", device_born)]

        def copying(u, src):
            def copied():
                x = u(src)
                t = time.perf_counter()
                return resize_bicubic(x, rw, rh, "hv"), t
            return copied
        if up is not None:
            pinned = up.host_buffer(rgb.shape)
            pinned[...] = rgb                        # as the decoders write it
            variants.insert(-1, ("copy (cuda_upload) from an ordinary array", copying(up, rgb)))
            variants.insert(-1, ("copy (cuda_upload) from a page-locked buffer (host_buffer)", copying(up, pinned)))
        want = None
        for name, fn in variants:
            host, total, out = timed(fn, a.reps)
            got = np.array(out)
            want = got if want is None else want
            print(f"| {size} | {rgb.nbytes / 1e6:.1f} | {name} | {host:.2f} | {total:.2f} | "
                  f"{'yes' if np.array_equal(got, want) else 'NO'} |", flush=True)
    if up is not None:
        decode_times(up, a.reps)


def decode_times(up, reps: int) -> None:
    """Does decoding into the page-locked buffers cost the decoders anything, and what does it
    save the upload? bench.screens screenshots as PNG, JPEG and WebP, decoded as the engine does
    (then, in the last two columns, uploaded too), alternating an ordinary array and the pool's."""
    from bench.screens import encoded
    from workers.images import decode_image
    print("\n| image | decode into np.empty ms | into host_buffer ms | decode + upload, np.empty ms | "
          "decode + upload, host_buffer ms |")
    print("|---|---|---|---|---|")
    for fmt in ("png", "jpeg", "webp"):
        for w, h in ((1280, 720), (1920, 1080), (2560, 1440)):
            data = encoded(w, h, fmt=fmt)
            seen = {k: [] for k in ("plain", "pinned", "plain+up", "pinned+up")}
            for _ in range(reps + 2):
                for alloc, key in ((None, "plain"), (up.host_buffer, "pinned")):
                    for upload in (False, True):
                        time.sleep(0.02)
                        mx.synchronize()
                        t = time.perf_counter()
                        rgb = decode_image(data, 1 << 26, alloc)
                        if upload:
                            up(rgb)
                        seen[key + ("+up" if upload else "")].append((time.perf_counter() - t) * 1e3)
                        del rgb     # its buffer back to the pool before the next decode, as a job's is
            cells = " | ".join(f"{statistics.median(v[2:]):.2f}" for v in seen.values())
            print(f"| {w}x{h} {fmt} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
