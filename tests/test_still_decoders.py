"""workers/still_decoders.py: WebP and JPEG screenshots decoded by imagecodecs give Pillow's pixels,
and damaged or cut-short files are refused exactly where Pillow refuses them."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bench.screens import screenshot
from workers import images, still_decoders
from workers.engine import JobError


def _save(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _pillow(data: bytes) -> np.ndarray:
    """What decode_image gave before this module: Pillow's decode, transparency onto white."""
    return np.asarray(images.to_rgb(Image.open(io.BytesIO(data))))


def _noisy(w: int, h: int, seed: int, alpha: str | None = None) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([x * 255 // max(w, 1), y * 255 // max(h, 1), (x ^ y) & 255], axis=-1)
    rgb = np.clip(smooth + rng.integers(-30, 30, smooth.shape), 0, 255).astype(np.uint8)
    if alpha is None:
        return Image.fromarray(rgb)
    a = np.full((h, w), 255, np.uint8) if alpha == "opaque" else rng.integers(0, 256, (h, w), dtype=np.uint8)
    return Image.fromarray(np.dstack([rgb, a]), "RGBA")


def _assert_as_pillow(data: bytes) -> bool:
    """decode_image gives Pillow's pixels, or refuses as invalid_image where Pillow fails; True if
    refused."""
    try:
        want = _pillow(data)
    except Exception:
        with pytest.raises(JobError) as e:
            images.decode_image(data, 10**7)
        assert e.value.code == "invalid_image"
        return True
    np.testing.assert_array_equal(images.decode_image(data, 10**7), want)
    return False


def _fast(data: bytes) -> np.ndarray | None:
    return still_decoders.decode(Image.open(io.BytesIO(data)), data)


def test_this_platforms_builds_agree_with_pillow():
    # The import-time probe: if this fails, Pillow and imagecodecs bundle libjpeg-turbo or libwebp
    # builds that decode differently here, and those formats silently go back to Pillow's speed.
    assert still_decoders.SAME_AS_PILLOW == {"JPEG", "WEBP"}


JPEGS = [dict(quality=q, subsampling=s) for q in (50, 90, 100) for s in (0, 1, 2)] + [
    dict(quality=85, progressive=True), dict(quality=85, optimize=True),
    dict(quality=85, progressive=True, subsampling=2, optimize=True)]


@pytest.mark.parametrize("size", [(1, 1), (17, 9), (333, 217), (640, 360)])
@pytest.mark.parametrize("params", JPEGS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_jpeg_pixels_are_pillows(size, params):
    data = _save(_noisy(*size, seed=size[0]), "JPEG", **params)
    assert _fast(data) is not None
    got = images.decode_image(data, 10**7)
    assert got.dtype == np.uint8 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, _pillow(data))


@pytest.mark.parametrize("size", [(1, 1), (17, 9), (333, 217), (640, 360)])
@pytest.mark.parametrize("kind", ["lossy", "lossless", "lossy alpha", "lossless alpha", "opaque alpha", "exact alpha"])
def test_webp_pixels_are_pillows(size, kind):
    img = _noisy(*size, seed=size[1], alpha=None if "alpha" not in kind else "opaque" if "opaque" in kind else "some")
    params = {"lossless": True} if "lossless" in kind else {"exact": True, "lossless": True} if "exact" in kind else {"quality": 80}
    data = _save(img, "WEBP", **params)
    assert _fast(data) is not None
    got = images.decode_image(data, 10**7)
    assert got.shape == (size[1], size[0], 3) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, _pillow(data))


@pytest.mark.parametrize("fmt,params", [("JPEG", {"quality": 90}), ("JPEG", {"quality": 85, "progressive": True}),
                                        ("WEBP", {"quality": 80}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_screenshots_decode_to_pillows_pixels(fmt, params):
    for seed in range(3):   # the last one busy: dense antialiased text and a photo with grain
        data = _save(screenshot(1280, 720, seed, busy=seed == 2), fmt, **params)
        np.testing.assert_array_equal(images.decode_image(data, 10**7), _pillow(data))


@pytest.mark.parametrize("fmt,params", [("JPEG", {"quality": 90}), ("JPEG", {"quality": 90, "progressive": True}),
                                        ("WEBP", {"quality": 80}), ("WEBP", {"lossless": True})])
def test_cut_short_files_are_refused_where_pillow_refuses_them(fmt, params):
    # libjpeg decodes a JPEG cut short as grey to the end and only warns; a client whose upload was
    # cut must get an error, not a click on a half-grey screenshot.
    data = _save(screenshot(320, 200, 5), fmt, **params)
    cuts = sorted({*range(len(data) - 4, len(data)), *np.linspace(40, len(data) - 1, 25).astype(int)})
    assert sum(_assert_as_pillow(data[:cut]) for cut in cuts) >= 20


def test_damaged_jpeg_is_refused_or_decoded_as_pillow_does():
    data = bytearray(_save(screenshot(320, 200, 6), "JPEG", quality=90))
    rng = np.random.default_rng(1)
    for _ in range(20):
        bad = bytearray(data)
        at = int(rng.integers(len(data) // 4, len(data) - 2))
        bad[at:at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        _assert_as_pillow(bytes(bad))


def test_jpeg_without_its_end_marker_goes_to_pillow():
    data = _save(_noisy(64, 48, 3), "JPEG", quality=90)
    for tail in (data[:-2], data + b"trailing bytes"):
        assert _fast(tail) is None
        _assert_as_pillow(tail)
    assert _fast(data + bytes(16)) is not None           # zero padding after the marker is fine


@pytest.mark.parametrize("img,fmt,params", [
    (_noisy(40, 30, 4).convert("L"), "JPEG", {}),
    (_noisy(40, 30, 4).convert("CMYK"), "JPEG", {}),
    (_noisy(40, 30, 4), "WEBP", {"save_all": True, "append_images": [_noisy(40, 30, 5)]}),
], ids=["grey jpeg", "cmyk jpeg", "animated webp"])
def test_other_kinds_go_to_pillow(img, fmt, params):
    data = _save(img, fmt, **params)
    assert not still_decoders.covered(Image.open(io.BytesIO(data)))
    got = images.decode_image(data, 10**7)
    assert got.shape == (30, 40, 3)
    np.testing.assert_array_equal(got, _pillow(data))


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_colour_profile_and_exif_metadata_change_nothing(fmt):
    # macOS screenshots carry an ICC profile; Pillow ignores profiles when decoding, and so do we.
    # In WebP, metadata also moves the file to the extended (VP8X) container.
    from PIL import ImageCms
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = _save(screenshot(400, 300, 2), fmt, quality=90, icc_profile=icc, exif=b"Exif\0\0" + bytes(20))
    assert _fast(data) is not None
    np.testing.assert_array_equal(images.decode_image(data, 10**7), _pillow(data))
