"""The C wavefront unfilterer gives back exactly the pixels the rows were filtered from, with any
number of threads, and never waits for ever: not on a bad row, not on a pool that never runs its
helpers."""
from __future__ import annotations

import shutil
import sysconfig
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.pngs import filtered_rows
from workers import png_inflate, png_unfilter

built = pytest.mark.skipif(png_unfilter.NATIVE is None, reason="the C unfilterer was not built")


def test_the_install_built_it_wherever_there_is_a_compiler():
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) here")
    assert png_unfilter.NATIVE is not None, "rebuild it: make install (or pip install -e .)"
    assert png_inflate.UNFILTER_IN_C                   # and its check against libpng at import passed


def _pixels(h: int, w: int, c: int, rng: np.random.Generator) -> np.ndarray:
    """Noise over flat panels: every filter's arithmetic wraps somewhere, and Paeth picks each of
    its three neighbours."""
    img = np.repeat(rng.integers(0, 256, (h, 1, c), dtype=np.uint8), w, axis=1)
    mask = rng.random((h, w)) < 0.4
    img[mask] = rng.integers(0, 256, (int(mask.sum()), c), dtype=np.uint8)
    return img


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(8) as p:
        yield p


@built
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("shape", [(1, 1), (1, 700), (50, 1), (37, 129), (64, 128), (64, 300), (9, 1921)])
def test_rows_come_back_as_the_pixels_they_were_filtered_from(pool, shape, channels, threads):
    # widths around the 128-pixel segment a thread waits per, and rows far longer than one
    h, w = shape
    rng = np.random.default_rng(h * 10007 + w * 3 + channels)
    pixels = _pixels(h, w, channels, rng)
    for filters in ([0], [1], [2], [3], [4], list(rng.integers(0, 5, 23)), [4, 4, 4, 2, 3]):
        out = np.full_like(pixels, 7)
        assert png_unfilter.unfilter(filtered_rows(pixels, filters), out, pool, threads)
        np.testing.assert_array_equal(out, pixels, err_msg=f"filters {filters}")


@built
def test_a_bad_filter_type_fails_the_image_without_leaving_a_thread_waiting(pool):
    pixels = _pixels(400, 300, 3, np.random.default_rng(1))
    rows = bytearray(filtered_rows(pixels, [4]))     # every row below reads the row above
    rows[3 * (1 + 300 * 3)] = 5                      # row 3's filter type
    out = np.empty_like(pixels)
    assert not png_unfilter.unfilter(bytes(rows), out, pool, threads=4)
    assert png_unfilter.unfilter(filtered_rows(pixels, [4]), out, pool, threads=4)
    np.testing.assert_array_equal(out, pixels)


@built
def test_helpers_that_never_start_do_not_hold_the_image_up():
    pixels = _pixels(300, 200, 4, np.random.default_rng(2))
    release = threading.Event()
    with ThreadPoolExecutor(1) as busy:
        blocker = busy.submit(release.wait, 30)      # its only thread, taken
        out = np.empty_like(pixels)
        assert png_unfilter.unfilter(filtered_rows(pixels, [4, 2, 3]), out, busy, threads=4)
        np.testing.assert_array_equal(out, pixels)
        assert blocker.running()                     # done on the calling thread alone
        release.set()


@built
def test_shapes_it_does_not_handle_are_refused(pool):
    pixels = _pixels(10, 20, 3, np.random.default_rng(3))
    rows = filtered_rows(pixels, [2])
    assert not png_unfilter.unfilter(rows[:-1], np.empty_like(pixels), pool, 2)           # short data
    assert not png_unfilter.unfilter(rows, np.empty((10, 40, 3), np.uint8)[:, ::2], pool, 2)   # strided
    grey = np.empty((10, 60, 1), np.uint8)                                                  # 1 channel
    assert not png_unfilter.unfilter(filtered_rows(grey, [0]), grey, pool, 2)


def test_bands_start_only_where_a_row_does_not_read_the_row_above():
    filters = np.array([4] * 100 + [1] + [2] * 99 + [0] + [3] * 199 + [1] + [4] * 99, np.uint8)
    spans = png_unfilter.bands(filters, parts=4)
    assert spans[0][0] == 0 and spans[-1][1] == len(filters)
    assert all(b == c for (_, b), (c, _) in zip(spans, spans[1:]))
    assert [a for a, _ in spans[1:]] == [100, 200, 400]
    assert png_unfilter.bands(np.full(1000, 4, np.uint8), parts=8) == [(0, 1000)]   # nowhere to cut
    assert png_unfilter.bands(np.zeros(100, np.uint8), parts=8) == [(0, 100)]       # too short to split
    many = png_unfilter.bands(np.zeros(4096, np.uint8), parts=8)
    assert len(many) == 8 and {b - a for a, b in many} == {512}


def test_units_are_balanced_bands_or_else_single_rows():
    h = 800
    assert png_unfilter.units(np.full(h, 2, np.uint8), 1).tolist() == [h]           # one thread: all
    even = np.full(h, 2, np.uint8)
    even[::100] = 1                                        # a Sub row every 100 rows: 8 even bands
    assert png_unfilter.units(even, 8).tolist() == list(range(100, h + 1, 100))
    lopsided = np.full(h, 4, np.uint8)
    lopsided[[1, 2, 3]] = 1                                # cuts only at the top: one band of 797
    assert png_unfilter.units(lopsided, 8).tolist() == list(range(1, h + 1))


@built
@pytest.mark.parametrize("unit", [1, 7, 64])
def test_units_that_start_on_rows_reading_the_row_above_wait_for_it(unit):
    # units cut anywhere: each unit's first row waits, segment by segment, on another thread's row
    pixels = _pixels(300, 200, 3, np.random.default_rng(unit))
    rows = filtered_rows(pixels, [4, 2, 3])
    ends = np.array(list(range(unit, 300, unit)) + [300], np.int64)
    out = np.zeros_like(pixels)
    done, shared = np.zeros(300, np.int32), np.zeros(2, np.int64)
    args = (rows, out, 300, 600, 3, ends, done, shared)
    with ThreadPoolExecutor(3) as pool:
        results = [f.result() for f in [pool.submit(png_unfilter.NATIVE.unfilter_rows, *args) for _ in range(3)]]
    assert results == [0, 0, 0]
    np.testing.assert_array_equal(out, pixels)


@built
def test_units_that_do_not_cover_the_image_are_refused():
    pixels = _pixels(10, 20, 3, np.random.default_rng(5))
    rows, out = filtered_rows(pixels, [2]), np.empty_like(pixels)
    for ends in ([5], [5, 5, 10], [6, 4, 10], []):
        with pytest.raises(ValueError):
            png_unfilter.NATIVE.unfilter_rows(rows, out, 10, 60, 3, np.array(ends, np.int64),
                                              np.zeros(10, np.int32), np.zeros(2, np.int64))
