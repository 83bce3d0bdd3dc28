"""Still 8-bit RGB/RGBA screenshots in PNG, WebP and JPEG, decoded by imagecodecs straight into
numpy: the pixels Pillow's decoders give, without Pillow's detours.

Why (bench/RESULTS.md, bench.still_decoders):
- PNG: imagecodecs' libpng inflates with a stock zlib; workers/png_inflate.py inflates with zlib-ng
  and unfilters in bands on several threads (4.5 ms instead of 11.3 for a 1080p screenshot on an
  H100 host). Where that path does not apply, imagecodecs' libpng, still ~2x Pillow.
- WebP: Pillow decodes every WebP, stills too, through libwebp's animation decoder, 19.9 ms for a
  1080p screenshot on the CI box; libwebp's still-image decoder in imagecodecs takes 4.2 ms.
- JPEG: both are libjpeg-turbo, but Pillow then copies the image out of its own storage into the
  array; imagecodecs decodes into the array. libjpeg reads a JPEG cut short as grey to its end and
  only warns, where Pillow refuses it as truncated, so only a JPEG that ends with its end-of-image
  marker comes here; any other goes to Pillow, which reports truncation as before.

The pixels are the same because the libraries are the same (libpng, libwebp, libjpeg-turbo), but
Pillow and imagecodecs each bundle their own copy, whose versions could differ on another platform
or release. So WebP and JPEG are decoded here only where a probe at import finds imagecodecs' pixels
equal to Pillow's on generated images covering the encodings screenshots use (tests/test_images.py
checks many more); elsewhere Pillow decodes them as before.
"""
from __future__ import annotations

import io

import imagecodecs
import numpy as np
from PIL import Image

from workers import png_inflate

FAST_INFLATE = png_inflate.available()   # zlib-ng in this imagecodecs build
JPEG_END = b"\xff\xd9"                   # EOI marker
DECODERS = {"JPEG": imagecodecs.jpeg8_decode, "WEBP": imagecodecs.webp_decode}   # beside PNG's


def covered(img: Image.Image) -> bool:
    """`img` (opened, header read) is a still 8-bit RGB/RGBA image in a format decoded here, whose
    decoded pixels are its RGB(A) values (no palette, colour key or animation)."""
    if img.mode not in ("RGB", "RGBA") or getattr(img, "is_animated", False):
        return False
    if img.format == "PNG":
        return "transparency" not in img.info and "default_image" not in img.info
    return img.format in SAME_AS_PILLOW


def decode(img: Image.Image, data: bytes, alloc: png_inflate.Alloc | None = None) -> np.ndarray | None:
    """uint8 [H, W, C], Pillow's pixels for `img` = Image.open(`data`), C = 3 or 4 by `img.mode`
    (callers check the shape: 16-bit PNGs come back as uint16); None where not `covered` or (JPEG)
    the data does not end with the end-of-image marker. Raises on corrupt data. `alloc`: where the
    image is decoded to (the GPU engine's page-locked buffers), except where png_inflate's path
    does not apply to a PNG."""
    if not covered(img):
        return None
    if img.format == "PNG":
        rgb = png_inflate.decode(data, alloc=alloc) if FAST_INFLATE else None
        return imagecodecs.png_decode(data) if rgb is None else rgb
    if img.format == "JPEG" and not data.rstrip(b"\0").endswith(JPEG_END):
        return None
    decoder = DECODERS[img.format]
    if alloc is not None:
        try:
            return decoder(data, out=alloc((img.height, img.width, len(img.mode))))
        except Exception:
            pass   # channels other than the header's, or corrupt data, which the plain call reports
    return decoder(data)


def _probe_images() -> dict[str, list[bytes]]:
    """Small generated images in the encodings screenshots come in, saved by Pillow."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:40, 0:56]
    smooth = np.stack([x * 4, y * 6, (x + y) * 3], axis=-1)
    rgb = np.clip(smooth + rng.integers(-40, 40, smooth.shape), 0, 255).astype(np.uint8)
    rgba = np.dstack([rgb, (x * 5 % 256).astype(np.uint8)])
    saves = {"JPEG": [(rgb, dict(quality=q, subsampling=s)) for q in (75, 95) for s in (0, 1, 2)]
                     + [(rgb, dict(quality=85, progressive=True))],
             "WEBP": [(rgb, dict(quality=80)), (rgba, dict(quality=80)), (rgba, dict(lossless=True))]}
    out = {}
    for fmt, variants in saves.items():
        out[fmt] = []
        for arr, params in variants:
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, fmt, **params)
            out[fmt].append(buf.getvalue())
    return out


def _same_as_pillow() -> frozenset[str]:
    """The formats in DECODERS whose imagecodecs pixels equal Pillow's on the probe images."""
    try:
        probes = _probe_images()
    except Exception:          # a Pillow built without a codec cannot open that format anyway
        return frozenset()
    same = set()
    for fmt, datas in probes.items():
        try:
            if all(np.array_equal(np.asarray(Image.open(io.BytesIO(d))), DECODERS[fmt](d)) for d in datas):
                same.add(fmt)
        except Exception:
            pass
    return frozenset(same)


SAME_AS_PILLOW = _same_as_pillow()
