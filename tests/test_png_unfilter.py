"""The C wavefront unfilterer gives back exactly the pixels the rows were filtered from, with any
number of threads, and never waits for ever: not on a bad row, not on a pool that never runs its
helpers."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.native import skip_without_c_compiler
from tests.pngs import filtered_rows
from workers import png_inflate, png_unfilter

built = pytest.mark.skipif(png_unfilter.NATIVE is None, reason="the C unfilterer was not built")


def test_the_install_built_it_wherever_there_is_a_compiler():
    skip_without_c_compiler()
    assert png_unfilter.NATIVE is not None, "rebuild it: make install (or pip install -e .)"
    assert png_inflate.UNFILTER_IN_C                   # and its check against libpng at import passed


def test_a_worker_without_it_says_so_and_still_decodes():
    # as where the extension was not built (or not carried along to a GPU machine)
    code = ("import io, logging, sys; logging.basicConfig(); sys.modules['workers._png_unfilter'] = None\n"
            "import numpy as np; from PIL import Image; from workers import png_inflate\n"
            "img = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8); buf = io.BytesIO()\n"
            "Image.fromarray(img).save(buf, 'PNG'); got = png_inflate.decode(buf.getvalue())\n"
            "print(png_inflate.UNFILTER_IN_C, got is not None and bool(np.array_equal(got, img)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "the C PNG unfilterer (workers/_png_unfilter) is not built here" in out.stderr
    assert out.stdout.split() == ["False", "True"]             # libpng unfilters, the same pixels


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
    done, shared = np.zeros(300, np.int32), png_unfilter.sealed(len(ends))
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
                                              np.zeros(10, np.int32), png_unfilter.sealed(len(ends)))


@built
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sleeps on a futex on Linux only")
def test_a_thread_waiting_long_sleeps_and_still_sees_units_published_without_a_wake_up():
    # Python publishes here, which wakes no one: the sleeper looks again within its nap (1 ms).
    # While it waits it sleeps instead of spinning or yielding (a yield gave the core away for a
    # tick to any other process there, idle-priority ones included).
    pixels = _pixels(120, 50, 3, np.random.default_rng(5))
    ends, shared = np.array([40, 80, 120], np.int64), np.zeros(png_unfilter.SHARED, np.int64)
    out, done = np.zeros_like(pixels), np.zeros(120, np.int32)
    with ThreadPoolExecutor(1) as helper:
        started = threading.Event()
        waiting = helper.submit(lambda: started.set() or png_unfilter.NATIVE.unfilter_rows(
            filtered_rows(pixels, [4, 2]), out, 120, 150, 3, ends, done, shared))
        started.wait(10)
        cpu, wall = time.process_time(), time.monotonic()
        time.sleep(0.1)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        was_waiting = not waiting.done()
        shared[1], shared[3] = len(ends), 1          # published, sealed
        assert waiting.result(timeout=10) == 0
    assert was_waiting
    assert cpu < 0.4 * wall, f"{cpu * 1e3:.0f} ms of CPU in {wall * 1e3:.0f} ms of waiting"
    np.testing.assert_array_equal(out, pixels)


# -- unfilter_after: the helpers start first and wait while the calling thread inflates --

@built
@pytest.mark.parametrize("threads", [1, 2, 8])
@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("shape", [(1, 1), (50, 1), (300, 129), (41, 1921)])
def test_rows_inflated_after_the_helpers_began_are_the_pixels(pool, shape, channels, threads):
    h, w = shape
    rng = np.random.default_rng(h * 5 + w + channels)
    pixels = _pixels(h, w, channels, rng)
    for filters in ([4], list(rng.integers(0, 5, 29)), [1] + [2] * 40):
        data = filtered_rows(pixels, filters)
        out = np.full_like(pixels, 7)

        def inflate(rows: np.ndarray) -> bool:
            time.sleep(0.01)                          # the helpers are waiting by now
            rows[:] = np.frombuffer(data, np.uint8)
            return True
        assert png_unfilter.unfilter_after(inflate, out, pool, threads)
        np.testing.assert_array_equal(out, pixels, err_msg=f"filters {filters}")


def _within(seconds: float, call):
    """call()'s value, or what it raised, where it returns within `seconds`; else the test fails
    (a helper left waiting would hold the call up for ever)."""
    done: list = []

    def run() -> None:
        try:
            done.append((True, call()))
        except BaseException as exc:                  # noqa: BLE001 (handed back to the test)
            done.append((False, exc))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert done, f"still waiting after {seconds} s"
    ok, value = done[0]
    if not ok:
        raise value
    return value


@built
def test_rows_that_fail_to_inflate_leave_no_helper_waiting():
    pixels = _pixels(200, 100, 3, np.random.default_rng(10))
    helpers = ThreadPoolExecutor(3)
    try:
        def refuse(rows: np.ndarray) -> bool:
            time.sleep(0.01)
            return False

        def crash(rows: np.ndarray) -> bool:
            raise ValueError("corrupt")
        assert _within(10, lambda: png_unfilter.unfilter_after(refuse, np.empty_like(pixels), helpers, threads=4)) \
            is False
        with pytest.raises(ValueError):
            _within(10, lambda: png_unfilter.unfilter_after(crash, np.empty_like(pixels), helpers, threads=4))
        bad = np.frombuffer(filtered_rows(pixels, [4]), np.uint8).copy()
        bad[100 * (1 + 300)] = 7                      # row 100's filter type

        def bad_rows(rows: np.ndarray) -> bool:
            rows[:] = bad
            return True
        assert _within(10, lambda: png_unfilter.unfilter_after(bad_rows, np.empty_like(pixels), helpers, threads=4)) \
            is False
        # all three helpers are free again, none left waiting for rows
        assert [f.result(timeout=10) for f in [helpers.submit(lambda: "free") for _ in range(3)]] == ["free"] * 3
    finally:
        helpers.shutdown(wait=False)                  # a failure here is reported, not a hang


@built
def test_seal_reaches_helpers_asleep_on_the_rows():
    # helpers that waited long enough to sleep: one learns of the units, one of a failure
    pixels = _pixels(64, 50, 3, np.random.default_rng(11))
    rows = filtered_rows(pixels, [2])
    with ThreadPoolExecutor(2) as helpers:
        calls = []
        for _ in range(2):
            out, shared = np.zeros_like(pixels), np.zeros(png_unfilter.SHARED, np.int64)
            calls.append((out, shared, helpers.submit(png_unfilter.NATIVE.unfilter_rows, rows, out, 64, 150, 3,
                                                      np.array([64], np.int64), np.zeros(64, np.int32), shared)))
        time.sleep(0.05)                              # spun out (50 us): asleep
        (out, shared, ok), (_, failed, refused) = calls
        png_unfilter.NATIVE.seal(shared, 1)
        png_unfilter.NATIVE.seal(failed, -1)
        assert (ok.result(timeout=10), refused.result(timeout=10)) == (0, -1)
    np.testing.assert_array_equal(out, pixels)
    with pytest.raises(ValueError):
        png_unfilter.NATIVE.seal(np.zeros(2, np.int64), 1)


# -- inflating alongside: the calling thread inflates, the others unfilter the rows as they come --

inflates = pytest.mark.skipif(png_unfilter.ZLIBNG is None, reason="zlib-ng's inflate is not bound")


@inflates
@pytest.mark.parametrize("threads", [1, 2, 8])
@pytest.mark.parametrize("chunk_bytes", [1, 997, 256 * 1024])
@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("shape", [(1, 1), (1, 700), (50, 1), (300, 129), (41, 1921)])
def test_rows_unfiltered_while_they_inflate_are_the_pixels(pool, monkeypatch, shape, channels, chunk_bytes,
                                                           threads):
    # chunks from a byte (a row arrives over many steps) to more than the whole image
    monkeypatch.setattr(png_unfilter, "CHUNK_BYTES", chunk_bytes)
    h, w = shape
    rng = np.random.default_rng(h * 7 + w + channels)
    pixels = _pixels(h, w, channels, rng)
    for filters in ([2], [4], list(rng.integers(0, 5, 29)), [1] + [2] * 40, [0] * 3 + [4] * 50):
        out = np.full_like(pixels, 7)
        z = zlib.compress(filtered_rows(pixels, filters), 6)
        assert png_unfilter.inflate_unfilter(z, out, pool, threads)
        np.testing.assert_array_equal(out, pixels, err_msg=f"filters {filters}")


@inflates
def test_units_close_at_rows_that_read_only_themselves_or_else_go_as_single_rows():
    h, w = 400, 10
    filters = np.full(h, 2, np.uint8)
    filters[[5, 30, 40, 60, 61, 62]] = [1, 0, 1, 1, 0, 1]    # then no None/Sub row below 62
    pixels = _pixels(h, w, 3, np.random.default_rng(9))
    z = zlib.compress(filtered_rows(pixels, list(filters)))
    out, rows = np.empty_like(pixels), np.empty(h * (1 + 3 * w), np.uint8)
    ends, done, shared = np.zeros(h, np.int64), np.zeros(h, np.int32), np.zeros(png_unfilter.SHARED, np.int64)
    assert png_unfilter.NATIVE.inflate_unfilter(z, rows, out, h, 3 * w, 3, ends, done, shared, 500, 16, 100) == 0
    np.testing.assert_array_equal(out, pixels)
    published, failed, sealed = shared[1:4]
    assert (failed, sealed) == (0, 1)
    # 5 comes too soon after 0 (under 16 rows), 30 closes a unit, 40 too soon after it, 60 closes
    # one, 61 and 62 too soon; 100 rows on without one, rows 60..159 went one by one, then 160..259
    # and 260..359; the last 40 rows are one unit
    assert ends[:published].tolist() == [30, 60, *range(61, 361), 400]


@inflates
def test_data_that_does_not_inflate_to_the_image_fails_without_leaving_a_thread_waiting(pool):
    pixels = _pixels(300, 100, 3, np.random.default_rng(4))
    rows = filtered_rows(pixels, [4, 2])
    z = zlib.compress(rows)
    corrupt = bytearray(z)
    corrupt[len(z) // 2] ^= 0x40
    bad_check = z[:-1] + bytes([z[-1] ^ 1])                  # the Adler-32 of the inflated rows
    bad_filter = bytearray(rows)
    bad_filter[250 * (1 + 300)] = 9                          # row 250's filter type
    for data in (zlib.compress(rows[:-1]), zlib.compress(rows + b"\0"), z[:len(z) // 2], bytes(corrupt),
                 bad_check, zlib.compress(bytes(bad_filter)), b"", b"not zlib data"):
        out = np.empty_like(pixels)
        assert not png_unfilter.inflate_unfilter(data, out, pool, threads=4)
    out = np.empty_like(pixels)
    assert png_unfilter.inflate_unfilter(z + b"after the stream", out, pool, threads=4)   # as libpng
    np.testing.assert_array_equal(out, pixels)


@inflates
def test_a_call_that_raises_leaves_no_helper_waiting():
    pixels = _pixels(200, 100, 3, np.random.default_rng(6))
    helpers = ThreadPoolExecutor(3)
    try:
        with pytest.raises(TypeError):                # refused by the C side after the helpers began
            png_unfilter.inflate_unfilter(12345, np.empty_like(pixels), helpers, threads=4)
        assert helpers.submit(lambda: "free").result(timeout=10) == "free"
    finally:
        helpers.shutdown(wait=False)                  # a failure here is reported, not a hang


@inflates
def test_helpers_that_never_start_do_not_hold_the_inflate_up():
    pixels = _pixels(300, 200, 4, np.random.default_rng(8))
    release = threading.Event()
    with ThreadPoolExecutor(1) as busy:
        blocker = busy.submit(release.wait, 30)
        out = np.empty_like(pixels)
        assert png_unfilter.inflate_unfilter(zlib.compress(filtered_rows(pixels, [4, 1])), out, busy, threads=4)
        np.testing.assert_array_equal(out, pixels)
        assert blocker.running()
        release.set()


# -- inflating in blocks: libdeflate inflates a run of the stream's blocks at a time, the others
# unfilter the rows as they come (workers/deflate_blocks.h) --

in_blocks = pytest.mark.skipif(not png_unfilter.LIBDEFLATE, reason="libdeflate is not bound")


def _dense(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """About 4 bits a byte, filtered or not: zlib cuts its data into dynamic blocks of a few KB."""
    return np.random.default_rng(seed).integers(0, 16, (h, w, c), dtype=np.uint8)


def _starts_found(z: bytes) -> int:
    """Parts after the first that a block header was found for (and so begin a part of their own)."""
    plan = png_unfilter.block_plan(z)
    png_unfilter.NATIVE.find_blocks(z, plan)
    return int((plan[4::2] >= 0).sum())


def _inflate_in_blocks(z: bytes, pixels: np.ndarray, plan: np.ndarray) -> tuple[int, np.ndarray]:
    """The C call itself, on this thread alone, with a plan of the test's making: (rc, pixels)."""
    h, w, c = pixels.shape
    out, rows = np.empty_like(pixels), np.empty(h * (1 + w * c), np.uint8)
    ends, done, shared = np.zeros(h, np.int64), np.zeros(h, np.int32), np.zeros(png_unfilter.SHARED, np.int64)
    rc = png_unfilter.NATIVE.inflate_unfilter(z, rows, out, h, w * c, c, ends, done, shared, 1 << 18, 16, 64, plan)
    return rc, out


@in_blocks
@pytest.mark.parametrize("threads", [1, 2, 8])
@pytest.mark.parametrize("level", [1, 6, 9])
@pytest.mark.parametrize("channels", [3, 4])
def test_rows_unfiltered_while_libdeflate_inflates_them_in_blocks_are_the_pixels(pool, monkeypatch, channels, level,
                                                                              threads):
    monkeypatch.setattr(png_unfilter, "BLOCK_PART_BYTES", 16 * 1024)
    pixels = _dense(240, 300, channels, seed=level * 10 + channels)
    for filters in ([2], [4, 1, 3], [0]):
        z = zlib.compress(filtered_rows(pixels, filters), level)
        assert _starts_found(z) >= 3, "too few parts to test"
        out = np.full_like(pixels, 7)
        assert png_unfilter.inflate_unfilter(z, out, pool, threads, blocks=True)
        np.testing.assert_array_equal(out, pixels, err_msg=f"filters {filters}")


@in_blocks
@pytest.mark.parametrize("shape", [(1, 1), (1, 700), (50, 1), (41, 1921)])
def test_images_too_small_to_cut_are_inflated_in_one_part(pool, shape):
    pixels = _pixels(*shape, 3, np.random.default_rng(shape[0] + shape[1]))
    z = zlib.compress(filtered_rows(pixels, [4, 1]))
    out = np.full_like(pixels, 7)
    assert png_unfilter.inflate_unfilter(z, out, pool, 4, blocks=True)
    np.testing.assert_array_equal(out, pixels)


@in_blocks
def test_a_part_that_does_not_begin_where_a_block_does_is_refused():
    # part 1 begins where the search found a block, or a few bits off it, or inside a block: only
    # the first inflates (its part 0 ends exactly there, and the whole Adler-32 checks out)
    pixels = _dense(200, 300, 3, seed=3)
    z = zlib.compress(filtered_rows(pixels, [1]), 6)
    cut = len(z) * 4
    plan = np.array([2, 16, 16, cut, -1], np.int64)
    png_unfilter.NATIVE.find_blocks(z, plan)
    start = int(plan[4])
    assert start > cut, "no block header found after the cut"
    for off in (0, -1, 1, -3, 5, 8, -8, 13, 1000, 20000):
        rc, out = _inflate_in_blocks(z, pixels, np.array([2, 16, 16, min(cut, start + off), start + off], np.int64))
        assert (rc == 0) == (off == 0), f"a part begun {off} bits from a block's start"
        if rc == 0:
            np.testing.assert_array_equal(out, pixels)


@in_blocks
def test_data_that_does_not_inflate_in_blocks_to_the_image_fails_without_leaving_a_thread_waiting(pool, monkeypatch):
    monkeypatch.setattr(png_unfilter, "BLOCK_PART_BYTES", 16 * 1024)
    pixels = _dense(240, 300, 3, seed=4)
    rows = filtered_rows(pixels, [4, 2])
    z = zlib.compress(rows)
    assert _starts_found(z) >= 3
    rng = np.random.default_rng(5)
    flipped = []
    while len(flipped) < 20:
        bad = bytearray(z)
        bad[rng.integers(2, len(z))] ^= 1 << int(rng.integers(0, 8))
        try:
            zlib.decompress(bytes(bad))               # (a flip of a padding bit is none)
        except zlib.error:
            flipped.append(bytes(bad))
    bad_check = z[:-1] + bytes([z[-1] ^ 1])                  # the Adler-32 of the inflated rows
    flg = (z[1] & 0xC0) | 0x20                               # FDICT set: a preset dictionary ...
    with_dictionary = bytes([z[0], flg + (31 - (z[0] << 8 | flg) % 31) % 31]) + z[2:]     # ... and FCHECK
    for data in (zlib.compress(rows[:-1]), zlib.compress(rows + b"\0"), z[:len(z) // 2], z[:-1], bad_check,
                 with_dictionary, *flipped, b"", b"not zlib data",
                 z + b"after the stream"):                   # (inflated whole instead, by png_inflate)
        out = np.empty_like(pixels)
        assert not _within(10, lambda: png_unfilter.inflate_unfilter(data, out, pool, 4, blocks=True))
    out = np.empty_like(pixels)
    assert png_unfilter.inflate_unfilter(z, out, pool, 4, blocks=True)
    np.testing.assert_array_equal(out, pixels)


@in_blocks
def test_a_call_in_blocks_that_raises_leaves_no_helper_waiting():
    pixels = _dense(200, 100, 3, seed=6)
    z = zlib.compress(filtered_rows(pixels, [4]))
    helpers = ThreadPoolExecutor(3)
    try:
        with pytest.raises(TypeError):                # a plan made of it, refused by the C side after the helpers began
            png_unfilter.inflate_unfilter(list(z), np.empty_like(pixels), helpers, threads=4, blocks=True)
        with pytest.raises(TypeError):                # refused before
            png_unfilter.inflate_unfilter(12345, np.empty_like(pixels), helpers, threads=4, blocks=True)
        assert [f.result(timeout=10) for f in [helpers.submit(lambda: "free") for _ in range(3)]] == ["free"] * 3
    finally:
        helpers.shutdown(wait=False)


@in_blocks
def test_helpers_that_never_start_do_not_hold_the_inflate_in_blocks_up(monkeypatch):
    # the inflating thread searches for every part's start itself
    monkeypatch.setattr(png_unfilter, "BLOCK_PART_BYTES", 16 * 1024)
    pixels = _dense(240, 300, 4, seed=8)
    z = zlib.compress(filtered_rows(pixels, [4, 1]))
    assert _starts_found(z) >= 3
    release = threading.Event()
    with ThreadPoolExecutor(1) as busy:
        blocker = busy.submit(release.wait, 30)
        out = np.empty_like(pixels)
        assert png_unfilter.inflate_unfilter(z, out, busy, threads=4, blocks=True)
        np.testing.assert_array_equal(out, pixels)
        assert blocker.running()
        release.set()


@in_blocks
def test_the_search_finds_a_block_from_any_cut_before_it():
    # cuts 0-127 bits before a block's start, so at every bit of a byte and at every place of the
    # start in the search's 64-bit windows
    pixels = _dense(200, 300, 3, seed=12)
    z = zlib.compress(filtered_rows(pixels, [2]), 6)
    plan = np.array([2, 16, 16, len(z) * 4, -1], np.int64)
    png_unfilter.NATIVE.find_blocks(z, plan)
    start = int(plan[4])
    assert start > len(z) * 4
    for before in range(128):
        plan = np.array([2, 16, 16, start - before, -1], np.int64)
        png_unfilter.NATIVE.find_blocks(z, plan)
        assert plan[4] == start, f"cut {before} bits before the block"


@in_blocks
def test_plans_of_any_cuts_and_starts_give_the_pixels_or_a_refusal():
    # what deflate_blocks.h reads and writes stays inside its buffers whatever the plan says (run
    # under AddressSanitizer in the thirty-second session); a plan whose starts are block starts
    # gives the pixels, any other is refused
    rng = np.random.default_rng(13)
    pixels = _dense(120, 300, 3, seed=13)
    for level in (1, 6):
        z = zlib.compress(filtered_rows(pixels, [4, 1]), level)
        bits = len(z) * 8
        for _ in range(60):
            cuts = sorted({16, *(int(c) for c in rng.integers(17, bits, int(rng.integers(1, 9))))})
            plan = np.full(1 + 2 * len(cuts), -1, np.int64)
            plan[0], plan[1::2], plan[2] = len(cuts), cuts, 16
            for k in range(1, len(cuts)):                # some starts given: anywhere before the next cut
                if rng.random() < 0.3:
                    plan[2 + 2 * k] = int(rng.integers(cuts[k], cuts[k + 1] if k + 1 < len(cuts) else bits))
            given = plan.copy()
            rc, out = _inflate_in_blocks(z, pixels, plan)
            if rc == 0:
                np.testing.assert_array_equal(out, pixels)
            else:
                assert (given[4::2] >= 0).any(), "refused a plan with no start given"
