"""The C unfilterer (workers/png_unfilter.c): PNG rows, as inflated, to pixels, on the calling
thread and up to `threads - 1` of a pool's at once, as a wavefront or in bands (`units`); or, with
`inflate_unfilter`, while the calling thread is still inflating them: with zlib-ng a chunk at a
time, or with libdeflate a run of the stream's blocks at a time (`blocks`, workers/deflate_blocks.h).

The extension is built by the install (setup.py, optional). Without it (no C compiler at install)
`NATIVE` is None and workers/png_inflate.py unfilters with libpng as before.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

try:
    from workers import _png_unfilter as NATIVE
except ImportError:
    NATIVE = None

ROW_BYTES_MAX = 2**31 - 1            # the C side counts a row's finished bytes in an int32
MIN_BAND_ROWS = 64                   # below this a thread hand-off costs about what it saves
BALANCED = 2.0                       # bands where the largest is at most this times an even share
CHUNK_BYTES = 256 * 1024             # inflated per step, then handed out (smaller steps cost more)
UNIT_MIN_ROWS = 16                   # while inflating: a unit closes at a None/Sub row after this many
BLOCK_PART_BYTES = 64 * 1024         # compressed bytes per part of inflate_unfilter(blocks=True)
MAX_BLOCK_PARTS = 64                 # png_unfilter.c's
SHARED = 5                           # int64s the threads of one image share (png_unfilter.c's shared_state)


def _bind_zlibng() -> str | None:
    """zlib-ng's version where the C side found its inflate in imagecodecs' zlib-ng module (which
    exports it), else None: then the data is inflated in one call before the unfiltering."""
    if NATIVE is None:
        return None
    try:
        return NATIVE.bind_zlibng(importlib.import_module("imagecodecs._zlibng").__file__)
    except (ImportError, OSError):
        return None


def _bind_libdeflate() -> bool:
    """Whether the C side found libdeflate through imagecodecs' module that links it; else the
    image data is inflated in parts by zlib-ng only (or in one call by libdeflate)."""
    if NATIVE is None:
        return False
    try:
        NATIVE.bind_libdeflate(importlib.import_module("imagecodecs._deflate").__file__)
    except (ImportError, OSError):
        return False
    return True


ZLIBNG = _bind_zlibng()
LIBDEFLATE = _bind_libdeflate()


def unfilter(rows: bytes, out: np.ndarray, pool: Executor, threads: int) -> bool:
    """`rows`: a non-interlaced 8-bit PNG's image data, inflated (each row its filter type, then
    its bytes); `out`: C-contiguous uint8 [H, W, 3 or 4] that receives the pixels. Runs on this
    thread and up to threads - 1 of `pool`'s. False where a row's filter type is not one PNG
    defines (out is then partly written) or the data does not fit this shape."""
    if NATIVE is None:
        raise RuntimeError("the C unfilterer was not built")
    h, rowbytes, bpp = _shape(out)
    if not rowbytes or len(rows) != h * (rowbytes + 1):
        return False
    ends = units(np.frombuffer(rows, np.uint8)[::rowbytes + 1], threads)
    args = (rows, out, h, rowbytes, bpp, ends, np.zeros(h, np.int32), sealed(len(ends)))
    return _on_threads(NATIVE.unfilter_rows, args, pool, threads)


def unfilter_after(inflate: Callable[[np.ndarray], bool], out: np.ndarray, pool: Executor, threads: int) -> bool:
    """`unfilter` of the rows `inflate(rows)` writes (into uint8 rows of the image's inflated size;
    True where it filled them exactly), with up to threads - 1 of `pool`'s started first: they wait
    while this thread inflates, so that all are running when the rows are ready (a pool thread takes
    0.1-0.7 ms to begin, one after another, each taking the GIL: bench/RESULTS.md, eighteenth and
    thirtieth sessions). False where `inflate` did not fill the rows or a filter type is not PNG's."""
    if NATIVE is None:
        raise RuntimeError("the C unfilterer was not built")
    h, rowbytes, bpp = _shape(out)
    if not rowbytes:
        return False
    rows = np.empty(h * (rowbytes + 1), np.uint8)
    ends, done, shared = np.empty(h, np.int64), np.zeros(h, np.int32), np.zeros(SHARED, np.int64)
    args = (rows, out, h, rowbytes, bpp, ends, done, shared)

    def first() -> int:
        published = -1                                  # a failure, also where anything here raised
        try:
            if inflate(rows):
                found = units(rows[::rowbytes + 1], threads)
                ends[:len(found)] = found
                published = len(found)
        finally:
            NATIVE.seal(shared, published)              # the helpers go on, or stop
        return NATIVE.unfilter_rows(*args) if published >= 0 else -1
    return _on_threads(NATIVE.unfilter_rows, args, pool, threads, first=first)


def inflate_unfilter(z: bytes, out: np.ndarray, pool: Executor, threads: int, blocks: bool = False) -> bool:
    """`z`: a non-interlaced 8-bit PNG's image data (its IDAT chunks' bytes joined); `out` as for
    `unfilter`. This thread inflates it, a part at a time, handing each part's rows out in units as
    it goes, and up to threads - 1 of `pool`'s undo their filters meanwhile; then this thread helps.
    The parts: zlib-ng's chunks (ZLIBNG); or with `blocks`, libdeflate's runs of the stream's blocks
    (LIBDEFLATE; workers/deflate_blocks.h), where the helpers first search ahead for where the parts
    begin. False where the data does not inflate to exactly this shape (or is not cut in blocks
    here: a preset dictionary, a header found where no block begins), or a row's filter type is not
    one PNG defines; `out` is then partly written."""
    if not (LIBDEFLATE if blocks else ZLIBNG):
        raise RuntimeError(f"{'libdeflate' if blocks else 'zlib-ng'}'s inflate is not bound")
    h, rowbytes, bpp = _shape(out)
    if not rowbytes:
        return False
    plan = block_plan(z) if blocks else None
    if blocks and plan is None:
        return False
    threads = min(threads, max(1, h // UNIT_MIN_ROWS))      # no helper for rows too few to share
    rows = np.empty(h * (rowbytes + 1), np.uint8)
    ends, done, shared = np.empty(h, np.int64), np.zeros(h, np.int32), np.zeros(SHARED, np.int64)
    args = (rows, out, h, rowbytes, bpp, ends, done, shared)
    umax = max(2 * UNIT_MIN_ROWS, h // max(1, threads))     # no None/Sub row in an even share: single rows
    parts = () if plan is None else (plan,)

    def helper() -> int:
        if plan is not None:                                # first, where the parts begin
            NATIVE.find_blocks(z, plan)
        return NATIVE.unfilter_rows(*args)
    try:
        return _on_threads(helper, (), pool, threads,
                           first=lambda: NATIVE.inflate_unfilter(z, *args, CHUNK_BYTES, UNIT_MIN_ROWS, umax, *parts))
    except BaseException:
        shared[2:4] = 1         # failed, sealed: the helpers stop waiting (asleep: within 1 ms)
        raise


def block_plan(z: bytes) -> np.ndarray | None:
    """inflate_unfilter's cuts of a zlib stream into parts of about BLOCK_PART_BYTES (int64s: the
    parts, then each part's cut and start in bits, the starts after part 0's unknown); None where the
    stream has a preset dictionary or is not deflate."""
    if len(z) < 6:
        return None
    cmf, flg = z[0], z[1]
    if cmf & 15 != 8 or cmf >> 4 > 7 or (cmf << 8 | flg) % 31 or flg & 0x20:
        return None
    parts = max(1, min(MAX_BLOCK_PARTS, len(z) // BLOCK_PART_BYTES))
    bits = (len(z) - 4) * 8                             # before the Adler-32
    plan = np.full(1 + 2 * parts, -1, np.int64)         # starts unknown (deflate_blocks.h: BLOCK_UNKNOWN)
    plan[0] = parts
    plan[1::2] = [16 + k * (bits - 16) // parts for k in range(parts)]
    plan[2] = 16                                        # part 0: the first block, after the zlib header
    return plan


def sealed(units: int) -> np.ndarray:
    """The shared state (png_unfilter.c's shared_state) of threads whose `units` are all published
    from the start."""
    shared = np.zeros(SHARED, np.int64)
    shared[1], shared[3] = units, 1                        # published, sealed
    return shared


def _shape(out: np.ndarray) -> tuple[int, int, int]:
    """(height, bytes per row, bytes per pixel) of an output array the C side can fill: C-contiguous
    uint8 [H, W, 3 or 4], rows of at most ROW_BYTES_MAX bytes; bytes per row 0 where it cannot."""
    h, w, bpp = out.shape
    rowbytes = w * bpp
    fits = bpp in (3, 4) and out.flags.c_contiguous and out.dtype == np.uint8 \
        and 0 < rowbytes <= ROW_BYTES_MAX
    return h, rowbytes if fits else 0, bpp


def _on_threads(call: Callable[..., int], args: tuple, pool: Executor, threads: int,
                first: Callable[[], int] | None = None) -> bool:
    """`call(*args)` on threads - 1 of pool's threads and this one (here `first()` instead, where
    given); True if none failed."""
    helpers = [pool.submit(call, *args) for _ in range(max(0, threads - 1))]
    failed = (first() if first else call(*args)) != 0
    for helper in helpers:
        # one not started by now would find no rows left; a running one finishes its last row
        if not helper.cancel():
            failed |= helper.result() != 0
    return not failed


def units(filters: np.ndarray, threads: int) -> np.ndarray:
    """The ends of the runs of rows the C unfilterer's threads take one at a time, from the rows'
    filter types: all rows for one thread; else the bands between rows that read only themselves,
    which never wait, where they share the rows out evenly enough; else single rows, the wavefront.
    (On an H200 host's CPU, eight threads on single rows took a screenshot of mostly Up rows no
    faster than one: those rows go at memory speed, and each hand-over costs as much.)"""
    h = len(filters)
    if threads > 1:
        spans = bands(filters, threads)
        if len(spans) > 1 and max(b - a for a, b in spans) <= BALANCED * h / threads:
            return np.array([b for _, b in spans], np.int64)
        return np.arange(1, h + 1, dtype=np.int64)
    return np.array([h], np.int64)


def bands(filters: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) covering the image, at most `parts`, each starting at row 0 or at a row
    whose filter type (`filters[row]`) is None (0) or Sub (1): the ones nearest to even cuts."""
    h = len(filters)
    k = min(parts, h // MIN_BAND_ROWS)
    starts = np.flatnonzero(filters[1:] <= 1) + 1         # rows that do not read the row above
    if k <= 1 or not len(starts):
        return [(0, h)]
    targets = np.arange(1, k) * h // k
    after = np.minimum(np.searchsorted(starts, targets), len(starts) - 1)
    before = np.maximum(after - 1, 0)
    nearest = np.where(np.abs(starts[before] - targets) <= np.abs(starts[after] - targets), before, after)
    cuts = sorted({int(starts[i]) for i in nearest})
    edges = [0, *cuts, h]
    return list(zip(edges[:-1], edges[1:]))
