"""PNG decoders on this host's CPU: Pillow (decode + RGB + numpy) against imagecodecs' libpng and
libspng builds, and the worker's paths (workers/png_inflate.py): libdeflate inflates, then libpng
unfilters, on one thread and in bands on several, or the C unfilterer does, on one thread and on
several, as a wavefront or in bands; or zlib-ng inflates a chunk at a time while the C unfilterer
follows (the worker's choice where it was built, zlib-ng's inflate was bound, and the image
compresses well); or libdeflate inflates a run of the stream's blocks at a time while the C
unfilterer follows (the worker's choice for the rest). With and without the CPU idle before.

    python -m bench.png_decoders [--sizes 1280x720,1920x1080,2560x1440] [--reps 15]

Screenshots: bench.screens' GUI-like window, and the same with a photo-like noisy panel (harder to
compress, as real screenshots with images are), each saved by Pillow at its default and at
compress_level 1; and bench.screens' text- and photo-dense one ("busy"), likewise. Every
decoder's pixels are checked against Pillow's.
"""
from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image

from bench.prep_profile import med
from bench.screens import screenshot
from workers import png_inflate


def _decoder(parts: int | None, in_c: bool = True, alongside: bool = False, blocks: bool = False):
    """png_inflate.decode on up to `parts` threads, the rows unfiltered by the C unfilterer
    (`in_c`, while zlib-ng inflates them where `alongside`, or libdeflate in blocks where `blocks`)
    or by libpng in bands."""
    names = ("UNFILTER_IN_C", "INFLATE_ALONGSIDE", "ALONGSIDE_MAX_RATIO", "INFLATE_BLOCKS")

    def decode(data: bytes):
        saved = [getattr(png_inflate, n) for n in names]
        # however much data there is per pixel
        for n, v in zip(names, (in_c, alongside, 1.0, blocks and png_inflate.INFLATE_BLOCKS)):
            setattr(png_inflate, n, v)
        try:
            return png_inflate.decode(data, parts=parts)
        finally:
            for n, v in zip(names, saved):
                setattr(png_inflate, n, v)
    return decode


def variants(w: int, h: int) -> dict[str, bytes]:
    gui = screenshot(w, h, 1)
    photo = gui.copy()
    rng = np.random.default_rng(0)
    pw, ph = w // 3, h // 3
    base = np.linspace(40, 200, pw, dtype=np.float32)[None, :, None] + rng.normal(0, 18, (ph, pw, 3))
    photo.paste(Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)), (w // 2, h // 2))
    out = {}
    for name, img in (("gui", gui), ("gui+photo", photo), ("busy", screenshot(w, h, 0, busy=True))):
        for level in (6, 1):
            buf = io.BytesIO()
            img.save(buf, "PNG", compress_level=level)
            out[f"{name}, level {level}"] = buf.getvalue()
    return out


def main() -> None:
    import imagecodecs
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1280x720,1920x1080,2560x1440")
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    inflater = "libdeflate" if png_inflate.LIBDEFLATE else "zlib-ng"
    decoders = {
        "pillow": lambda d: np.asarray(Image.open(io.BytesIO(d)).convert("RGB")),
        "imagecodecs png": imagecodecs.png_decode,
        "imagecodecs spng": imagecodecs.spng_decode,
        f"{inflater} + libpng, 1 band": _decoder(1, in_c=False),
        f"{inflater} + libpng, up to {png_inflate.THREADS} bands": _decoder(None, in_c=False),
    }
    n = png_inflate.THREADS
    if png_inflate.UNFILTER_IN_C:
        decoders[f"{inflater}, then C, 1 thread"] = _decoder(1)
        decoders[f"{inflater}, then C, {n} threads"] = _decoder(None)
    else:
        print("the C unfilterer is not built here, or failed its check (make install builds it)")
    if png_inflate.INFLATE_ALONGSIDE:
        decoders["zlib-ng chunks, C alongside, 1 thread"] = _decoder(1, alongside=True)
        decoders[f"zlib-ng chunks, C alongside, {min(n, png_inflate.ALONGSIDE_THREADS)} threads"] = \
            _decoder(None, alongside=True)
    if png_inflate.INFLATE_BLOCKS:
        decoders["libdeflate blocks, C alongside, 1 thread"] = _decoder(1, blocks=True)
        decoders[f"libdeflate blocks, C alongside, {n} threads"] = _decoder(None, blocks=True)
    if png_inflate.INFLATE_ALONGSIDE and png_inflate.INFLATE_BLOCKS:
        print(f"the worker decodes as 'zlib-ng chunks, C alongside' where the image data is at most "
              f"{png_inflate.ALONGSIDE_MAX_RATIO:.0%} of the rows' size, else as 'libdeflate blocks, C alongside'")
    print(f"imagecodecs {imagecodecs.__version__}, Pillow {Image.__version__}")
    print("| image | PNG KB | CPU idle before | " + " | ".join(f"{n} ms" for n in decoders) + " | same pixels |")
    print("|---|---|---|" + "---|" * len(decoders) + "---|")
    for size in a.sizes.split(","):
        w, h = map(int, size.split("x"))
        for name, data in variants(w, h).items():
            ref = decoders["pillow"](data)
            same = all(np.array_equal(np.asarray(fn(data))[..., :3], ref) for fn in decoders.values())
            for gap in (0.0, 0.13):
                cols = [f"{med(lambda: fn(data), a.reps, gap):.1f}" for fn in decoders.values()]
                print(f"| {size} {name} | {len(data) // 1024} | {'130 ms' if gap else 'no'} | "
                      + " | ".join(cols) + f" | {'yes' if same else 'NO'} |", flush=True)
    if png_inflate.LIBDEFLATE:
        print("\nThe image data alone, inflated (ms):\n\n| image | zlib-ng | libdeflate |\n|---|---|---|")
        for size in a.sizes.split(","):
            w, h = map(int, size.split("x"))
            for name, data in variants(w, h).items():
                idat = png_inflate._image_chunks(data)[1]
                n = h * (1 + w * 3)
                zng, ld = (med(lambda: fn(idat, out=n), a.reps) for fn in (imagecodecs.zlibng_decode,
                                                                          imagecodecs.deflate_decode))
                print(f"| {size} {name} | {zng:.2f} | {ld:.2f} |", flush=True)


if __name__ == "__main__":
    main()
