"""workers/images.py: decode caps and errors, the 3200x1800 cap, and equality with transformers'
Qwen2VLImageProcessor (PIL backend) on random images of odd sizes."""
from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.pngs import png
from workers import images, still_decoders
from workers.engine import JobError


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _random_image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (h, w) if channels is None else (h, w, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


SIZES = [(1, 1), (5, 7), (333, 517), (517, 333), (1001, 37), (29, 803), (641, 479), (1919, 1081)]


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("torch")
    tf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    return tf


@pytest.mark.parametrize("w,h", SIZES)
def test_preprocess_equals_transformers(hf, w, h):
    min_px, max_px = 3136, 401408
    img = _random_image(w, h, seed=w * 7 + h)
    ours = images.preprocess(np.asarray(img), min_px, max_px, cap_area=None)
    proc = hf.Qwen2VLImageProcessorPil(min_pixels=min_px, max_pixels=max_px)
    ref = proc(images=[img], return_tensors="np")
    assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist()
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    assert ours.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"])  # bit-identical
    gh, gw = ours.grid_thw[1:]
    assert ours.resized == (gw * 14, gh * 14) and ours.original == (w, h)


def test_smart_resize_equals_transformers(hf):
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(1, 5000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.choice([784, 3136, 100_000]))
        hi = int(rng.choice([1_048_576, 5_720_064, 12_845_056, 200_000]))
        assert images.smart_resize(h, w, 28, lo, hi) == hf.smart_resize(h, w, 28, lo, hi)


def test_transparency_is_composited_on_white_like_transformers(hf):
    from transformers.image_transforms import convert_to_rgb
    img = _random_image(31, 17, seed=5, mode="RGBA")
    ours = images.decode_image(_encode(img), 10_000)
    np.testing.assert_array_equal(np.asarray(ours), convert_to_rgb(img, return_numpy=True))
    grey = images.decode_image(_encode(_random_image(9, 8, 1, "L")), 10_000)
    assert grey.shape == (8, 9, 3) and grey.dtype == np.uint8


def test_patch_layout_groups_merge_windows():
    # Patch i of the flat list must be the 14x14 square at (row, col) of the Qwen2-VL order.
    img = _random_image(56, 84, seed=9)
    out = images.preprocess(np.asarray(img), 784, 10**7, cap_area=None)
    x = images.normalize(np.asarray(img.resize(out.resized, Image.Resampling.BICUBIC)))
    gh, gw = out.grid_thw[1:]
    order = [(2 * by + my, 2 * bx + mx) for by in range(gh // 2) for bx in range(gw // 2)
             for my in range(2) for mx in range(2)]
    for i, (r, c) in enumerate(order):
        patch = x[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].transpose(2, 0, 1)  # [3, 14, 14]
        want = np.stack([patch, patch], axis=1).reshape(-1)                    # [3, 2, 14, 14]
        np.testing.assert_array_equal(out.pixel_values[i], want)


def test_screen_cap_is_down_only_and_keeps_aspect():
    small = np.asarray(_random_image(1280, 720, 0))
    assert images.cap_screen(small) is small
    big = np.zeros((3000, 4000, 3), np.uint8)
    capped = images.cap_screen(big)
    r = math.sqrt(images.SCREEN_CAP_AREA / (4000 * 3000))
    assert images.size_of(capped) == (int(4000 * r), int(3000 * r))
    assert capped.shape[0] * capped.shape[1] <= images.SCREEN_CAP_AREA
    out = images.preprocess(big, 3136, 12_845_056)
    assert out.original == (4000, 3000)  # back-projection uses the size before the cap
    assert out.resized[0] * out.resized[1] <= images.SCREEN_CAP_AREA


def test_decode_errors():
    with pytest.raises(JobError) as e:
        images.decode_image(b"definitely not an image", 10**6)
    assert e.value.code == "invalid_image"
    png = _encode(_random_image(64, 64, 3))
    with pytest.raises(JobError) as e:
        images.decode_image(png[: len(png) // 2], 10**6)
    assert e.value.code == "invalid_image"
    with pytest.raises(JobError) as e:
        images.decode_image(png, 64 * 64 - 1)
    assert e.value.code == "payload_too_large"
    for fmt in ("JPEG", "WEBP", "GIF", "BMP"):
        assert images.decode_image(_encode(_random_image(40, 30, 4), fmt), 10**6).shape == (30, 40, 3)
    with pytest.raises(JobError) as e:   # a real image, but not a screenshot format we parse
        images.decode_image(_encode(_random_image(40, 30, 4), "TIFF"), 10**6)
    assert e.value.code == "invalid_image" and "PNG" in e.value.message


@pytest.mark.parametrize("side", [9000, 100_000])
def test_pixel_cap_is_checked_before_decoding(side):
    # A side x side PNG header with no pixel data: must be refused by size, not decoded.
    bomb = png(struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0), zlib.compress(b""))
    with pytest.raises(JobError) as e:
        images.decode_image(bomb, 8192 * 8192)
    assert e.value.code == "payload_too_large"


def test_extreme_aspect_ratio_is_invalid():
    with pytest.raises(JobError) as e:
        images.preprocess(np.zeros((10, 2010, 3), np.uint8), 3136, 10**6)
    assert e.value.code == "invalid_image"


def test_opaque_rgba_screenshots_skip_compositing_with_the_same_pixels():
    rng = np.random.default_rng(9)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    opaque = Image.fromarray(np.dstack([rgb, np.full((40, 60), 255, np.uint8)]), "RGBA")
    assert np.array_equal(np.asarray(images.to_rgb(opaque)), rgb)
    alpha = np.full((40, 60), 255, np.uint8)
    alpha[0, 0] = 0                                        # one transparent pixel: composited on white
    out = np.asarray(images.to_rgb(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")))
    assert (out[0, 0] == 255).all() and np.array_equal(out[1:], rgb[1:])


def _png(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **params)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "RGBA opaque", "L", "LA", "P", "P with tRNS", "RGB with tRNS",
                                  "I;16", "RGB 16-bit"])
def test_every_png_kind_decodes_to_pillows_pixels(mode):
    """The fast decoder takes 8-bit RGB/RGBA; the rest stays with Pillow: the same pixels either way."""
    rng = np.random.default_rng(11)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    params = {}
    if mode == "RGB":
        img = Image.fromarray(rgb)
    elif mode.startswith("RGBA"):
        img = Image.fromarray(np.dstack([rgb, np.full_like(alpha, 255) if "opaque" in mode else alpha]), "RGBA")
    elif mode in ("L", "LA"):
        img = Image.fromarray(rgb[..., 0]).convert(mode)
    elif mode.startswith("P"):
        img = Image.fromarray(rgb).quantize(16)
        if "tRNS" in mode:
            params["transparency"] = 3
    elif mode == "RGB with tRNS":
        img, params = Image.fromarray(rgb), {"transparency": tuple(int(v) for v in rgb[0, 0])}
    elif mode == "I;16":
        img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)                  # 16-bit grey
    else:   # 48-bit RGB, hand-made: Pillow cannot write it
        img = None
    if img is None:
        data = _rgb48_png(rgb)
        want = rgb                                                   # Pillow keeps the high bytes
    else:
        data = _png(img, **params)
        want = np.asarray(images.to_rgb(Image.open(io.BytesIO(data))))
    fast = mode in ("RGB", "RGBA", "RGBA opaque", "RGB 16-bit")       # 16-bit: refused after decoding
    assert still_decoders.covered(Image.open(io.BytesIO(data))) == fast
    got = images.decode_image(data, 10**6)
    assert got.shape == (37, 53, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


def _rgb48_png(rgb: np.ndarray) -> bytes:
    h, w, _ = rgb.shape
    wide = (rgb.astype(">u2") * 257).astype(">u2")
    rows = b"".join(b"\x00" + wide[y].tobytes() for y in range(h))
    return png(struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0), zlib.compress(rows))


def test_the_fast_png_path_refuses_corrupt_data_with_a_clear_error():
    data = bytearray(_png(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))))
    start = data.index(b"IDAT") + 4
    data[start + 10:start + 60] = bytes(50)                          # damaged compressed pixels
    with pytest.raises(JobError) as e:
        images.decode_image(bytes(data), 10**6)
    assert e.value.code == "invalid_image"


@pytest.mark.parametrize("kind", ["PNG RGB", "PNG RGBA opaque", "JPEG", "WEBP", "WEBP RGBA"])
def test_still_images_decode_into_the_callers_buffers(kind):
    # the GPU engine hands page-locked buffers, which the upload copies from fastest
    from bench.screens import screenshot
    fmt, _, mode = kind.partition(" ")
    img = screenshot(320, 200, seed=3)
    if mode.startswith("RGBA"):
        arr = np.dstack([np.asarray(img), np.full((200, 320), 255 if mode == "RGBA opaque" else 200, np.uint8)])
        img = Image.fromarray(arr, "RGBA")
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 85} if fmt != "PNG" else {}))
    data = buf.getvalue()
    given = []

    def alloc(shape):
        given.append(np.full(shape, 7, np.uint8))
        return given[-1]

    got = images.decode_image(data, 10**7, alloc)
    np.testing.assert_array_equal(got, images.decode_image(data, 10**7))      # the same pixels
    if fmt == "PNG" or fmt in still_decoders.SAME_AS_PILLOW:                  # decoded by imagecodecs
        if mode == "RGBA":                                                    # translucent: composited
            assert given
        else:
            assert given and got is given[-1]
    with pytest.raises(JobError) as e:                                        # corrupt data still says so
        images.decode_image(data[:len(data) // 2], 10**7, alloc)
    assert e.value.code == "invalid_image"
