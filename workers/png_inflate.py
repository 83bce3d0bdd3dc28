"""8-bit RGB/RGBA PNGs: zlib-ng inflates the image data a chunk at a time, or libdeflate a run of
its blocks at a time, while the row filters of the rows inflated so far are undone on other threads
(workers/png_unfilter.c); or libdeflate (or zlib-ng) inflates it all first, and then the filters
are undone, on several threads at once, by the same C code (its threads started while libdeflate
inflates), or by libpng where that was not built.

Why (bench/RESULTS.md, bench.png_decoders): imagecodecs' libpng inflates with a stock zlib, which
copies the short-distance matches of flat screenshot areas a byte at a time. On the CI box, 11.5 ms
of its 12.6 ms for a 1080p screenshot is inflating, which zlib-ng (also in imagecodecs) does in
0.4 ms. libpng cannot be given another inflater, so the image data is inflated here. libdeflate
(imagecodecs too) inflates a text- and photo-dense screenshot's data faster still: 1080p 5.0 -> 3.1
ms on an H200 host's CPU.

Undoing the filters is serial down the image as libpng does it (a row's Up, Average and Paeth
filters read the row above it, unfiltered). But a pixel reads only the pixels above, above-left and
left of it, so the C unfilterer runs rows on several threads as a wavefront, each a segment behind
the row above, or in bands between rows that read only themselves where the encoder chose such
rows often enough (workers/png_unfilter.py). On an H200 host's CPU (bench.png_decoders), 8 threads
unfilter a plain 1080p screenshot in 0.9 ms and a text- and photo-dense one in 1.8 ms (one thread:
2.3 and 6.1), and the whole decode takes 2.5 and 6.0 ms against 3.1 and 6.8 with libpng in bands.

Inflating and unfiltering one after the other, the threads wait for the inflate, which is serial.
So where zlib-ng's inflate could be bound from imagecodecs (which exports it; libdeflate has no
streaming interface), the calling thread inflates a chunk at a time and hands each chunk's rows out
in units, while the other threads unfilter them. zlib-ng is slower than libdeflate alone, but for
screenshots that compress well the whole decode is shorter (H200 host, 1080p plain: 2.8 -> 2.2 ms,
or 3.9 -> 2.7 with the CPU idle before; CI box 1.5 -> 1.0 ms); ALONGSIDE_MAX_RATIO says where not.
Denser image data goes to libdeflate a run of blocks at a time instead (workers/deflate_blocks.h
says how): on an H200 host a text- and photo-dense 1080p screenshot's preprocessing took 5.6-7.4 ms
(median 6.6) against 6.6-9.2 (7.3) inflated whole first, in seven pairs of whole-stack rows, and
a decode of it alone 3.8-6.1 ms against 5.3-6.6 (bench/RESULTS.md, thirty-second session).

Without the C library, libpng undoes the filters, handed the inflated rows re-wrapped in stored
(uncompressed) deflate blocks, which any zlib copies at memory speed: the pixels are libpng's by
construction. (Tried before with Pillow as the unfilterer, which lost: Pillow's unfiltering alone
took as long as libpng's whole decode.) Only rows filtered with None or Sub read only themselves,
so the image is cut there into a stack of independent bands: each goes to libpng as a PNG of its
own, on its own thread (libpng runs without the GIL), straight into its rows of the output.

Anything unusual (interlaced, another bit depth, a chunk layout or CRC that does not check out, image
data that does not inflate to exactly its rows) returns None, and the caller decodes the PNG as it
is, which also reports corrupt data.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import imagecodecs
import numpy as np

from workers import png_unfilter

SIGNATURE = b"\x89PNG\r\n\x1a\n"
STORED_MAX = 65535                     # bytes in one stored deflate block
IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
CHANNELS = {2: 3, 6: 4}                # PNG colour type -> channels: RGB, RGBA
THREADS = max(1, min(8, os.cpu_count() or 1))
_pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="png")
_scratch = threading.local()           # one re-wrap buffer per thread
_active = 0                            # decodes in progress, which share the pool's threads
_active_lock = threading.Lock()
log = logging.getLogger(__name__)


def _has(codec: str) -> bool:
    return bool(getattr(getattr(imagecodecs, codec, None), "available", False))


LIBDEFLATE = _has("DEFLATE")


def available() -> bool:
    return _has("ZLIBNG")             # its checksums are used either way


# zlib-ng inflates more slowly than libdeflate, the more so the more compressed data there is per
# pixel. On an H200 host's CPU (bench.png_decoders), a plain 1080p screenshot (image data 0.6 % of
# its rows' size) decodes in 2.2 ms alongside against 2.8 after libdeflate, a text- and photo-dense
# one (10 %) in 5.5 against 4.6. So alongside only up to this share, between the two.
ALONGSIDE_MAX_RATIO = 0.05
# Alongside, the threads need only keep up with the inflate, and the pool's threads start one after
# another (each takes the GIL to begin: after the CPU idled, the seventh began 0.7 ms after the
# call on an H200 host). There, a plain 1080p screenshot took 2.14-2.15 ms on 3 or 4 threads
# against 2.41 on 8 (1440p: 3.2-3.3 against 3.7; 720p 1.3-1.4 against 1.5), the CPU idle before.
ALONGSIDE_THREADS = 4
Alloc = Callable[[tuple[int, ...]], np.ndarray]     # shape -> uninitialised uint8 array


def decode(data: bytes, parts: int | None = None, alloc: Alloc | None = None) -> np.ndarray | None:
    """PNG bytes -> uint8 [H, W, 3 or 4], the pixels imagecodecs.png_decode gives, on up to `parts`
    threads at once (default: the pool's threads shared among the decodes in progress, so several
    requests at once do not queue behind each other's rows); None where this path does not apply.
    `alloc` gives the output array (the GPU engine's page-locked buffers); default np.empty."""
    global _active
    with _active_lock:
        _active += 1
        share = max(1, THREADS // _active)
    try:
        return _decode(data, parts or share, alloc or _empty)
    finally:
        with _active_lock:
            _active -= 1


def _empty(shape: tuple[int, ...]) -> np.ndarray:
    return np.empty(shape, np.uint8)


def _decode(data: bytes, parts: int, alloc: Alloc) -> np.ndarray | None:
    found = _image_chunks(data)
    if found is None:
        return None
    ihdr, idat = found
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", ihdr)
    if depth != 8 or interlace or colour not in CHANNELS or not w or not h:
        return None
    size = h * (1 + w * CHANNELS[colour])             # each row: its filter byte, then the pixels
    if UNFILTER_IN_C and INFLATE_ALONGSIDE and len(idat) <= ALONGSIDE_MAX_RATIO * size:
        out = alloc((h, w, CHANNELS[colour]))
        return out if png_unfilter.inflate_unfilter(idat, out, _pool, min(parts, ALONGSIDE_THREADS)) else None
    inflate = imagecodecs.deflate_decode if LIBDEFLATE else imagecodecs.zlibng_decode
    if UNFILTER_IN_C:
        out = alloc((h, w, CHANNELS[colour]))
        # in blocks only with a thread to follow the inflate: alone, this thread would also search
        # for every part's start (0.4-3.3 ms for a dense 1080p screenshot on an H200 host) for nothing
        if INFLATE_BLOCKS and parts >= 2 and png_unfilter.inflate_unfilter(idat, out, _pool, parts, blocks=True):
            return out
        # else (or rarely: a stream not cut in blocks here, or corrupt data) inflated whole

        def fill(rows: np.ndarray) -> bool:
            try:                                      # a stream that inflates to more fails here
                return len(inflate(idat, out=rows)) == size
            except Exception:
                return False
        # the helpers begin while this thread inflates
        return out if png_unfilter.unfilter_after(fill, out, _pool, parts) else None
    try:
        rows = inflate(idat, out=size)
    except Exception:
        return None
    if len(rows) != size:
        return None
    out = alloc((h, w, CHANNELS[colour]))
    first, *rest = png_unfilter.bands(np.frombuffer(rows, np.uint8)[::size // h], parts)
    futures = [_pool.submit(_decode_band, ihdr, rows, a, b, out) for a, b in rest]
    _decode_band(ihdr, rows, *first, out)
    for f in futures:
        f.result()
    return out


def _decode_band(ihdr: bytes, rows: bytes, a: int, b: int, out: np.ndarray) -> None:
    """Rows a..b-1 (filtered, each with its filter byte) through libpng into out[a:b]."""
    stride = len(rows) // out.shape[0]
    band_ihdr = ihdr[:4] + struct.pack(">I", b - a) + ihdr[8:]
    imagecodecs.png_decode(_stored_png(band_ihdr, memoryview(rows)[a * stride:b * stride]), out=out[a:b])


def _image_chunks(data: bytes) -> tuple[bytes, bytes] | None:
    """(IHDR's 13 bytes, all IDAT data joined) if the chunks up to IEND are well formed and the
    critical ones' CRCs check out; else None."""
    if not data.startswith(SIGNATURE):
        return None
    view, pos, ihdr, idat = memoryview(data), len(SIGNATURE), None, []
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data):
            return None
        if kind in (b"IHDR", b"IDAT"):
            (crc,) = struct.unpack_from(">I", data, end)
            if imagecodecs.zlibng_crc32(view[pos + 4:end]) != crc:
                return None
            if kind == b"IHDR":
                ihdr = bytes(view[pos + 8:end])
            else:
                idat.append(view[pos + 8:end])
        elif kind == b"IEND":
            break
        pos = end + 4
    if ihdr is None or len(ihdr) != 13 or not idat:
        return None
    return ihdr, b"".join(idat)


def _stored_png(ihdr: bytes, rows: bytes | memoryview) -> np.ndarray:
    """A PNG of IHDR, one IDAT with `rows` in stored deflate blocks, IEND; built in a reused
    buffer (a fresh one costs more in page faults than the copy itself)."""
    n = len(rows)
    blocks = -(-n // STORED_MAX)
    zlen = 2 + 5 * blocks + n + 4
    total = len(SIGNATURE) + 25 + 12 + zlen + len(IEND)
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < total:
        buf = _scratch.buf = np.empty(total, np.uint8)
    png = buf[:total]
    head = SIGNATURE + struct.pack(">I", 13) + b"IHDR" + ihdr + \
        struct.pack(">I", imagecodecs.zlibng_crc32(b"IHDR" + ihdr)) + struct.pack(">I", zlen) + b"IDAT"
    png[:len(head)] = np.frombuffer(head, np.uint8)
    z = png[len(head):len(head) + zlen]
    z[:2] = (0x78, 0x01)                                # zlib header: deflate, 32K window, no dictionary
    src = np.frombuffer(rows, np.uint8)
    full = blocks - 1                                   # every block but the last holds STORED_MAX bytes
    if full:
        grid = z[2:2 + full * (5 + STORED_MAX)].reshape(full, 5 + STORED_MAX)
        grid[:, :5] = (0, 0xFF, 0xFF, 0, 0)             # not final, stored, LEN, ~LEN (little-endian)
        grid[:, 5:] = src[:full * STORED_MAX].reshape(full, STORED_MAX)
    last = n - full * STORED_MAX
    tail = z[2 + full * (5 + STORED_MAX):-4]
    tail[:5] = np.frombuffer(struct.pack("<BHH", 1, last, last ^ 0xFFFF), np.uint8)
    tail[5:] = src[full * STORED_MAX:]
    z[-4:] = np.frombuffer(struct.pack(">I", imagecodecs.zlibng_adler32(rows)), np.uint8)
    crc_end = len(head) + zlen
    crc = imagecodecs.zlibng_crc32(png[len(head) - 4:crc_end])     # over "IDAT" and its data
    png[crc_end:crc_end + 4] = np.frombuffer(struct.pack(">I", crc), np.uint8)
    png[crc_end + 4:] = np.frombuffer(IEND, np.uint8)
    return png


def _c_unfilters_as_libpng_does(unfilter: Callable[[bytes, np.ndarray], bool]) -> bool:
    """`unfilter(rows, out)` (the C unfilterer, two threads at once) gives libpng's pixels for
    random rows under every filter type, both channel counts, rows of several of its segments:
    checked once at import, since the build may come from a compiler or platform the tests never
    ran on."""
    rng = np.random.default_rng(0)
    h, w = 40, 300
    for channels, colour in ((3, 2), (4, 6)):
        rows = rng.integers(0, 256, (h, 1 + w * channels), dtype=np.uint8)
        rows[:, 0] = np.arange(h) % 5
        ihdr = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
        want = imagecodecs.png_decode(_stored_png(ihdr, rows.tobytes()).copy())
        got = np.empty((h, w, channels), np.uint8)
        if not unfilter(rows.tobytes(), got) or not np.array_equal(got, want):
            return False
    return True


def _inflates_in_blocks() -> bool:
    """inflate_unfilter(blocks=True) gives libpng's pixels for an image whose data zlib cut into
    several dynamic blocks, inflated in parts: checked once at import (~5 ms), as the unfilterer is.
    It relies on how libdeflate, as imagecodecs built it, reads a stream of stored and fixed-code
    blocks and reports where it stopped; where that differs, every dense screenshot would be tried
    in parts, refused (the checks of deflate_blocks.h), and inflated again whole."""
    rng = np.random.default_rng(1)
    h, w = 100, 1000
    rows = rng.integers(0, 16, (h, 1 + w * 3), dtype=np.uint8)     # ~4 bits a byte: dynamic blocks
    rows[:, 0] = np.arange(h) % 5
    z = zlib.compress(rows.tobytes(), 1)
    plan = png_unfilter.block_plan(z)
    want = imagecodecs.png_decode(_stored_png(struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0), rows.tobytes()).copy())
    got = np.empty((h, w, 3), np.uint8)
    return plan is not None and plan[0] >= 2 and \
        png_unfilter.inflate_unfilter(z, got, _pool, 2, blocks=True) and np.array_equal(got, want)


UNFILTER_IN_C = INFLATE_ALONGSIDE = INFLATE_BLOCKS = False
if png_unfilter.NATIVE is None:
    # silent, this cost a session's GPU runs ~2.5 ms per request before anyone noticed
    log.warning("the C PNG unfilterer (workers/_png_unfilter) is not built here: libpng unfilters PNGs, "
                "~2-3 ms more per 1080p screenshot; reinstall with a C compiler (make install) to build it")
elif available():
    UNFILTER_IN_C = _c_unfilters_as_libpng_does(lambda rows, out: png_unfilter.unfilter(rows, out, _pool, 2))
    if not UNFILTER_IN_C:
        log.warning("the C PNG unfilterer's pixels differ from libpng's here: libpng unfilters instead")
    elif png_unfilter.ZLIBNG is not None:
        INFLATE_ALONGSIDE = _c_unfilters_as_libpng_does(
            lambda rows, out: png_unfilter.inflate_unfilter(imagecodecs.zlibng_encode(rows), out, _pool, 2))
        if not INFLATE_ALONGSIDE:
            log.warning("zlib-ng's inflate, as bound from imagecodecs, gives other pixels here: "
                        "the image data is inflated in one call instead")
    if UNFILTER_IN_C and png_unfilter.LIBDEFLATE:
        INFLATE_BLOCKS = _inflates_in_blocks()
        if not INFLATE_BLOCKS:
            log.warning("libdeflate, inflating a stream's blocks a part at a time, gives other pixels here: "
                        "dense screenshots' image data is inflated in one call instead")
