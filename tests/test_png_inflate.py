"""PNGs inflated (zlib-ng alongside the unfiltering, or libdeflate or zlib-ng before it) and
unfiltered (the C unfilterer, or libpng in bands) give libpng's own pixels, and anything this path
does not handle goes back to the plain decoder."""
from __future__ import annotations

import io
import struct
import zlib

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from bench.screens import png_bytes
from tests.pngs import chunk, filtered_rows, png
from workers import png_inflate
from workers.images import decode_image
from workers.engine import JobError

pytestmark = pytest.mark.skipif(not png_inflate.available(), reason="imagecodecs built without zlib-ng")


PATHS = {   # name: (unfilter in C, inflate alongside, libdeflate, libdeflate in blocks)
    "zlib-ng chunks, C alongside": (True, True, False, False),
    "libdeflate blocks, C alongside": (True, False, True, True),
    "libdeflate, then C": (True, False, True, False),
    "zlib-ng, then C": (True, False, False, False),
    "libdeflate, then libpng in bands": (False, False, True, False),
    "zlib-ng, then libpng in bands": (False, False, False, False),
}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    """Each way this module decodes: zlib-ng inflating a chunk at a time while the C unfilterer
    follows (however well the image compresses), or libdeflate inflating the stream's blocks a part
    at a time (parts of 2 KB here, so that small images have several) while it follows, or
    libdeflate or zlib-ng (where imagecodecs was built without libdeflate) inflating all first, then
    the C unfilterer or (where it was not built) libpng in bands."""
    in_c, alongside, libdeflate, blocks = PATHS[request.param]
    if in_c and not png_inflate.UNFILTER_IN_C:
        pytest.skip("the C unfilterer was not built")
    if alongside and not png_inflate.INFLATE_ALONGSIDE:
        pytest.skip("zlib-ng's inflate is not bound")
    if libdeflate and not png_inflate.LIBDEFLATE:
        pytest.skip("imagecodecs built without libdeflate")
    if blocks and not png_inflate.INFLATE_BLOCKS:
        pytest.skip("libdeflate is not bound for inflating in blocks")
    monkeypatch.setattr(png_inflate, "UNFILTER_IN_C", in_c)
    monkeypatch.setattr(png_inflate, "INFLATE_ALONGSIDE", alongside)
    monkeypatch.setattr(png_inflate, "ALONGSIDE_MAX_RATIO", 1.0)
    monkeypatch.setattr(png_inflate, "LIBDEFLATE", libdeflate)
    monkeypatch.setattr(png_inflate, "INFLATE_BLOCKS", blocks)
    monkeypatch.setattr(png_inflate.png_unfilter, "BLOCK_PART_BYTES", 2048)
    return request.param


def _filtered_png(pixels: np.ndarray, filters: list[int], level: int = 6, idat_size: int = 1000) -> bytes:
    """A PNG of uint8 [H, W, C] (C 3 or 4) with rows filtered as tests.pngs.filtered_rows does, the
    data split into IDAT chunks of `idat_size` bytes."""
    h, w, c = pixels.shape
    z = zlib.compress(filtered_rows(pixels, filters), level)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, {3: 2, 4: 6}[c], 0, 0, 0)
    return png(ihdr, *(z[i:i + idat_size] for i in range(0, len(z), idat_size)))


def _image(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """Flat panels with some noise: rows whose filters differ, as in screenshots."""
    rng = np.random.default_rng(seed)
    img = np.repeat(rng.integers(0, 256, (h, 1, c), dtype=np.uint8), w, axis=1)
    img[h // 3: h // 2, w // 4: w // 2] = rng.integers(0, 256, (h // 2 - h // 3, w // 2 - w // 4, c), dtype=np.uint8)
    return img


@pytest.mark.parametrize("filters", [[0], [1], [2], [3], [4], [4, 4, 4, 1, 2, 3, 0], [2, 2, 2, 2, 2, 2, 2, 2, 2, 1]])
@pytest.mark.parametrize("channels", [3, 4])
def test_every_row_filter_gives_the_image_back(filters, channels, path):
    pixels = _image(300, 77, channels, seed=len(filters) * channels)
    data = _filtered_png(pixels, filters)
    got = png_inflate.decode(data)
    np.testing.assert_array_equal(got, pixels)
    np.testing.assert_array_equal(got, imagecodecs.png_decode(data))


@pytest.mark.parametrize("level", [0, 1, 6, 9])
@pytest.mark.parametrize("size", [(1920, 1080), (1, 1), (1, 300), (300, 1), (28, 1542)])
def test_screenshots_decode_to_libpngs_and_pillows_pixels(size, level, path):
    # (28, 1542): each row 85 bytes, 65535 = 771 rows, so the data fills exactly two stored blocks
    w, h = size
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(640, 480))).resize(size).save(buf, "PNG", compress_level=level)
    data = buf.getvalue()
    got = png_inflate.decode(data)
    np.testing.assert_array_equal(got, imagecodecs.png_decode(data))
    np.testing.assert_array_equal(got, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_what_this_path_does_not_handle_goes_back_to_the_plain_decoder(path):
    pixels = _image(64, 40, 3, seed=5)
    good = _filtered_png(pixels, [4, 1])
    assert png_inflate.decode(good) is not None
    ihdr_at = good.index(b"IHDR")

    def with_ihdr(**change) -> bytes:
        fields = dict(zip(("w", "h", "depth", "colour", "comp", "filt", "interlace"),
                          struct.unpack(">IIBBBBB", good[ihdr_at + 4:ihdr_at + 17])))
        fields.update(change)
        ihdr = struct.pack(">IIBBBBB", *fields.values())
        return good[:ihdr_at - 4] + chunk(b"IHDR", ihdr) + good[ihdr_at + 21:]

    assert png_inflate.decode(with_ihdr(interlace=1)) is None
    assert png_inflate.decode(with_ihdr(depth=16)) is None
    assert png_inflate.decode(with_ihdr(h=63)) is None          # the data inflates to more rows
    assert png_inflate.decode(with_ihdr(h=65)) is None          # ... or to fewer
    bad_crc = bytearray(good)
    bad_crc[good.index(b"IDAT") + 6] ^= 1                       # one bit of compressed data
    assert png_inflate.decode(bytes(bad_crc)) is None
    assert png_inflate.decode(good[: len(good) // 2]) is None
    assert png_inflate.decode(b"not a png") is None
    with pytest.raises(JobError) as e:                         # and the plain decoder reports it
        decode_image(bytes(bad_crc), 10**6)
    assert e.value.code == "invalid_image"


def test_an_invalid_filter_byte_is_a_clear_error(path):
    pixels = _image(200, 40, 3, seed=6)
    rows = b"".join(bytes([7 if y == 150 else 0]) + pixels[y].tobytes() for y in range(200))
    data = png(struct.pack(">IIBBBBB", 40, 200, 8, 2, 0, 0, 0), zlib.compress(rows))
    with pytest.raises(JobError) as e:
        decode_image(data, 10**6)
    assert e.value.code == "invalid_image"


def test_decodes_at_once_on_many_threads_share_the_pool_and_stay_exact(path):
    from concurrent.futures import ThreadPoolExecutor
    datas = [_filtered_png(_image(400, 90, 3, seed=s), [4, 2, 2, 1]) for s in range(12)]
    want = [imagecodecs.png_decode(d) for d in datas]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(png_inflate.decode, datas))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_decodes_into_the_callers_buffers(path):
    data = png_bytes(640, 360)
    given = []

    def alloc(shape):
        given.append(np.full(shape, 7, np.uint8))
        return given[-1]

    got = decode_image(data, 10**7, alloc)
    assert len(given) == 1 and got is given[0]                  # the caller's array, filled in
    np.testing.assert_array_equal(got, imagecodecs.png_decode(data))


@pytest.mark.skipif(not (png_inflate.INFLATE_ALONGSIDE and png_inflate.INFLATE_BLOCKS),
                    reason="zlib-ng's or libdeflate's inflate is not bound, or the C unfilterer not built")
def test_image_data_that_compresses_well_goes_to_zlib_ng_alongside_and_the_rest_to_libdeflate_in_blocks(monkeypatch):
    from workers import png_unfilter
    calls, real = [], png_unfilter.inflate_unfilter
    monkeypatch.setattr(png_unfilter, "inflate_unfilter",
                        lambda *a, **kw: calls.append((len(a[0]), kw.get("blocks", False))) or real(*a, **kw))
    rng = np.random.default_rng(7)
    flat = np.repeat(rng.integers(0, 256, (300, 1, 3), dtype=np.uint8), 200, axis=1)   # <1 % of its rows
    noise = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)                         # all of them
    for pixels in (flat, noise):
        np.testing.assert_array_equal(png_inflate.decode(_filtered_png(pixels, [2])), pixels)
    (small, small_in_blocks), (large, large_in_blocks) = calls
    assert small <= png_inflate.ALONGSIDE_MAX_RATIO * 300 * (1 + 600) < large
    assert not small_in_blocks and large_in_blocks
    # a decode with one thread (eight at once on eight threads, say) inflates dense data whole
    np.testing.assert_array_equal(png_inflate.decode(_filtered_png(noise, [2]), parts=1), noise)
    assert len(calls) == 2
