"""workers/png.py: the PNG with its image data stored uncompressed decodes, in Pillow, to exactly
the pixels and metadata of the original; unusual or broken PNGs are left to Pillow."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from bench.screens import png_bytes
from workers import images
from workers.engine import JobError
from workers.png import with_stored_image_data


def _png(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **save)
    return buf.getvalue()


def _chunks(data: bytes) -> list[tuple[bytes, bytes, int]]:
    out, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + n)
        out.append((kind, body, crc))
        pos += 12 + n
    return out


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _rebuilt(data: bytes, idat_bodies: list[bytes]) -> bytes:
    """`data` with its IDAT chunks replaced by chunks with these bodies."""
    chunks = _chunks(data)
    kinds = [k for k, _, _ in chunks]
    before, after = chunks[:kinds.index(b"IDAT")], chunks[len(kinds) - kinds[::-1].index(b"IDAT"):]
    return (data[:8] + b"".join(_chunk(k, b) for k, b, _ in before)
            + b"".join(_chunk(b"IDAT", b) for b in idat_bodies) + b"".join(_chunk(k, b) for k, b, _ in after))


def _decoded(data: bytes) -> tuple[str, tuple[int, int], np.ndarray, dict]:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.mode, img.size, np.asarray(img), img.info


def _assert_same_image(original: bytes) -> bytes:
    stored = with_stored_image_data(original)
    assert stored is not None
    mode, size, pixels, info = _decoded(original)
    mode2, size2, pixels2, info2 = _decoded(stored)
    assert (mode2, size2) == (mode, size)
    assert np.array_equal(pixels2, pixels)
    assert info2 == info
    return stored


def _random(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    bands = len(Image.new(mode, (1, 1)).getbands())
    arr = rng.integers(0, 256, (h, w, bands) if bands > 1 else (h, w), dtype=np.uint8)
    if mode == "1":
        return Image.fromarray(arr, "L").convert("1")
    if mode == "P":
        return Image.fromarray(arr % 16, "L").convert("P")
    return Image.fromarray(arr, mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
@pytest.mark.parametrize("w,h", [(1, 1), (7, 3), (333, 101), (1001, 37)])
def test_every_colour_type_and_depth_decodes_to_the_same_pixels(mode, w, h):
    _assert_same_image(_png(_random(mode, w, h, seed=w * h)))


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_screenshots_at_every_compression_level(level):
    shot = Image.open(io.BytesIO(png_bytes(640, 360)))
    stored = _assert_same_image(_png(shot, compress_level=level))
    # every chunk of the result carries a valid CRC, and its one IDAT inflates with stock zlib to
    # the same filtered rows as the original's
    chunks = _chunks(stored)
    assert all(zlib.crc32(k + b) == crc for k, b, crc in chunks)
    idats = [b for k, b, _ in chunks if k == b"IDAT"]
    original = b"".join(b for k, b, _ in _chunks(_png(shot, compress_level=level)) if k == b"IDAT")
    assert len(idats) == 1 and zlib.decompress(idats[0]) == zlib.decompress(original)


def test_palette_transparency_text_and_split_image_data_are_kept():
    img = _random("P", 120, 80, seed=3)
    data = _png(img, transparency=5, pnginfo=_text("Software", "test"))
    body = b"".join(b for k, b, _ in _chunks(data) if k == b"IDAT")
    split = _rebuilt(data, [body[:1], body[1:100], body[100:]])    # several IDAT chunks, as encoders write
    stored = _assert_same_image(split)
    assert _decoded(stored)[3]["transparency"] == 5


def _text(key: str, value: str):
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text(key, value)
    return info


def test_unusual_or_broken_pngs_are_left_to_pillow():
    data = _png(_random("RGB", 64, 48, seed=1))
    body = b"".join(b for k, b, _ in _chunks(data) if k == b"IDAT")
    raw = zlib.decompress(body)
    assert with_stored_image_data(b"GIF89a" + data[6:]) is None
    assert with_stored_image_data(data[: len(data) // 2]) is None                      # chunks cut off
    assert with_stored_image_data(_rebuilt(data, [body[: len(body) // 2]])) is None    # stream cut off
    assert with_stored_image_data(_rebuilt(data, [zlib.compress(raw + b"\0" * 49)])) is None  # rows too long
    assert with_stored_image_data(_rebuilt(data, [zlib.compress(raw[:-1])])) is None        # rows too short
    assert with_stored_image_data(_rebuilt(data, [b"\x78\x9c" + b"\xff" * 40])) is None      # not deflate
    ihdr = _chunks(data)[0][1]
    interlaced = data[:8] + _chunk(b"IHDR", ihdr[:12] + b"\x01") + data[33:]
    assert with_stored_image_data(interlaced) is None
    frames = [_random("RGB", 32, 32, seed=s) for s in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    assert with_stored_image_data(buf.getvalue()) is None                              # animated
    # decode_image still gives Pillow's own answers for those
    assert np.array_equal(np.asarray(images.decode_image(buf.getvalue(), 10**6)), np.asarray(frames[0]))
    for broken in (_rebuilt(data, [body[: len(body) // 2]]), _rebuilt(data, [b"\x78\x9c" + b"\xff" * 40])):
        with pytest.raises(JobError) as e:
            images.decode_image(broken, 10**6)
        assert e.value.code == "invalid_image"


def test_decode_image_gives_pillows_pixels_for_a_screenshot():
    data = png_bytes(1280, 720, seed=4)
    assert with_stored_image_data(data) is not None
    assert np.array_equal(np.asarray(images.decode_image(data, 10**7)),
                          np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
