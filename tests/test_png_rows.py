"""workers/png_rows.py and images.png_for_device: an RGB PNG's filtered rows, unfiltered by the
PNG specification's arithmetic, are Pillow's pixels; every other PNG kind, and any broken one, is
left to Pillow. The GPU kernel that does the unfiltering in the server is checked against Pillow at
every model load (workers/mlx/png_unfilter.load) and by bench.png_unfilter on the GPU machine;
here its probe image is checked to exercise every filter."""
from __future__ import annotations

import io
import struct
import zlib

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from bench.screens import png_bytes
from workers import images
from workers.engine import JobError
from workers.mlx import png_unfilter
from workers.parallel_resize import learn_now
from workers.png_rows import filtered_rows


def unfilter(rows: np.ndarray, channels: int = 3) -> np.ndarray:
    """The PNG specification's unfiltering, written plainly (slow; small images only)."""
    h, n = rows.shape[0], rows.shape[1] - 1
    out = np.zeros((h, n), np.int64)
    for r in range(h):
        f, src = int(rows[r, 0]), rows[r, 1:].astype(np.int64)
        up = out[r - 1] if r else np.zeros(n, np.int64)
        for x in range(n):
            a = out[r, x - channels] if x >= channels else 0
            b = up[x]
            c = up[x - channels] if x >= channels else 0
            p = a + b - c
            pred = [0, a, b, (a + b) // 2,
                    a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else b if abs(p - b) <= abs(p - c) else c][f]
            out[r, x] = (src[x] + pred) & 255
    return out.astype(np.uint8).reshape(h, n // channels, channels)


def _png(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **save)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _rgb_png(rows: np.ndarray, width: int, idat_bodies: list[bytes] | None = None, extra: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, rows.shape[0], 8, 2, 0, 0, 0)
    bodies = idat_bodies if idat_bodies is not None else [zlib.compress(rows.tobytes())]
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + b"".join(_chunk(b"IDAT", b) for b in bodies)
            + _chunk(b"IEND", b""))


def _pillow(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("w,h,level", [(1, 1, 6), (7, 5, 9), (61, 23, 1), (40, 30, 0)])
def test_rows_unfiltered_are_pillows_pixels(w, h, level):
    rng = np.random.default_rng(w * h)
    smooth = np.cumsum(rng.integers(0, 3, (h, w, 3)), axis=1).astype(np.uint8)   # invites Sub/Up/Paeth
    for arr in (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), smooth):
        data = _png(Image.fromarray(arr), compress_level=level)
        rows = filtered_rows(data)
        assert rows is not None and rows.shape == (h, 1 + 3 * w)
        assert np.array_equal(unfilter(rows), arr)


def test_kernel_probe_covers_every_filter_and_is_pillows_truth():
    png, rows = png_unfilter.probe_png(13, 11)
    assert set(rows[:, 0].tolist()) == {0, 1, 2, 3, 4}
    assert np.array_equal(filtered_rows(png), rows)
    assert np.array_equal(unfilter(rows), _pillow(png))


def test_split_image_data_and_ancillary_chunks_are_fine():
    png, rows = png_unfilter.probe_png(9, 8, seed=2)
    body = zlib.compress(rows.tobytes())
    data = _rgb_png(rows, 9, [body[:3], body[3:50], body[50:]], extra=_chunk(b"tEXt", b"Software\0test"))
    assert np.array_equal(filtered_rows(data), rows)


def test_other_kinds_and_broken_data_are_left_to_pillow():
    _, rows = png_unfilter.probe_png(9, 8, seed=3)
    raw = rows.tobytes()
    assert filtered_rows(_rgb_png(rows, 9)) is not None
    rng = np.random.default_rng(0)
    for mode in ("RGBA", "L", "LA", "P"):
        img = Image.fromarray(rng.integers(0, 256, (8, 9, 4), dtype=np.uint8)).convert(mode)
        assert filtered_rows(_png(img)) is None, mode
    assert filtered_rows(_png(Image.fromarray(rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)),
                              transparency=(1, 2, 3))) is None
    frames = [Image.new("RGB", (9, 8), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    assert filtered_rows(buf.getvalue()) is None                                    # animated
    interlaced = _rgb_png(rows, 9).replace(_chunk(b"IHDR", struct.pack(">IIBBBBB", 9, 8, 8, 2, 0, 0, 0)),
                                           _chunk(b"IHDR", struct.pack(">IIBBBBB", 9, 8, 8, 2, 0, 0, 1)))
    assert filtered_rows(interlaced) is None
    bad_filter = rows.copy()
    bad_filter[3, 0] = 5
    for broken in (_rgb_png(rows, 9, [zlib.compress(raw)[:20]]),          # stream cut off
                   _rgb_png(rows, 9, [zlib.compress(raw[:-1])]),          # rows too short
                   _rgb_png(rows, 9, [b"\x78\x9c" + b"\xff" * 20]),        # not deflate
                   _rgb_png(bad_filter, 9)):                              # no such filter type
        assert filtered_rows(broken) is None
        with pytest.raises(JobError) as e:                                # and Pillow says why
            images.decode_image(broken, 10**6)
        assert e.value.code == "invalid_image"
    # Pillow forgives these, so they are Pillow's to decode as before
    for odd in (_rgb_png(rows, 9, [zlib.compress(raw + b"\0")]),          # rows too long
                _rgb_png(rows, 9)[:-20]):                                 # IEND cut off
        assert filtered_rows(odd) is None
        assert np.array_equal(np.asarray(images.decode_image(odd, 10**6)), unfilter(rows))


def test_png_for_device_takes_screenshots_and_leaves_the_rest():
    yes = lambda src, dst: True
    data = png_bytes(640, 360, seed=1)
    learn_now((640, 360), images.target_size((640, 360), 3136, 10**7))
    got = images.png_for_device(data, 10**7, 3136, 10**7, yes)
    want = images.preprocess(images.decode_image(data, 10**7), 3136, 10**7, patches=False, device_resize=yes)
    assert got is not None and got.png_rows and got.resize_order == want.resize_order
    assert (got.grid_thw, got.original, got.resized) == (want.grid_thw, want.original, want.resized)
    assert np.array_equal(unfilter(got.rgb), want.rgb)
    # the device cannot resize this pair: Pillow's path
    assert images.png_for_device(data, 10**7, 3136, 10**7, lambda src, dst: False) is None
    # already the ViT's size (multiples of 28): rows, no resize
    exact = images.png_for_device(png_bytes(280, 196), 10**7, 3136, 10**7, yes)
    assert exact is not None and exact.resize_order is None and exact.resized == (280, 196)
    # other formats, screens over the cap
    assert images.png_for_device(_jpeg(), 10**7, 3136, 10**7, yes) is None
    assert images.png_for_device(_png(Image.new("RGB", (3300, 1800))), 10**8, 3136, 10**7, yes) is None
    # the header's limits and errors are decode_image's
    with pytest.raises(JobError) as e:
        images.png_for_device(data, 640 * 360 - 1, 3136, 10**7, yes)
    assert e.value.code == "payload_too_large"
    with pytest.raises(JobError) as e:
        images.png_for_device(b"not an image", 10**7, 3136, 10**7, yes)
    assert e.value.code == "invalid_image"


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(buf, "JPEG")
    return buf.getvalue()


def test_kernel_load_declines_without_cuda():
    if not mx.cuda.is_available():
        assert png_unfilter.load() is None
