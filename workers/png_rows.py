"""A PNG screenshot's image data inflated to its filtered rows, for the device to unfilter.

Why: Pillow decodes a 1080p screenshot PNG in ~12 ms on the GPU host, serially, before the forward
can start: about half in stock zlib's inflate, half in undoing the row filters and copying.
zlib-ng inflates the same data in ~1 ms, and the GPU undoes the filters
(workers/mlx/png_unfilter.py), so the forward starts ~10 ms sooner (bench/RESULTS.md). The bytes
are the same ones Pillow would produce: inflating is lossless, and unfiltering is integer
arithmetic checked against Pillow at model load.

Only the common screenshot case takes this path: 8-bit RGB, not interlaced, not animated. The
caller has parsed the header with Pillow (size limits, chunk CRCs, transparency); anything else,
and any data that does not inflate to exactly the expected rows, gives None, and Pillow decodes
the image as before, reporting errors itself.
"""
from __future__ import annotations

import struct

import numpy as np
from zlib_ng import zlib_ng

SIGNATURE = b"\x89PNG\r\n\x1a\n"
RGB8 = (8, 2, 0, 0, 0)     # IHDR: bit depth 8, colour type 2 (RGB), compression, filter, no interlace
FILTER_TYPES = 5           # None, Sub, Up, Average, Paeth


def _chunks(data: bytes) -> list[tuple[bytes, int, int]] | None:
    """[(type, start of its data, end of its data)] up to IEND, or None if the layout is broken."""
    out, pos = [], len(SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        start, kind = pos + 8, data[pos + 4:pos + 8]
        if start + length + 4 > len(data):
            return None
        out.append((kind, start, start + length))
        if kind == b"IEND":
            return out
        pos = start + length + 4
    return None


def filtered_rows(data: bytes) -> np.ndarray | None:
    """uint8 [height, 1 + width * 3]: each row's filter type byte, then its filtered RGB bytes;
    None where Pillow should decode `data` (see the module docstring)."""
    if not data.startswith(SIGNATURE):
        return None
    chunks = _chunks(data)
    if not chunks or chunks[0][0] != b"IHDR" or chunks[0][2] - chunks[0][1] != 13:
        return None
    width, height, *rest = struct.unpack_from(">IIBBBBB", data, chunks[0][1])
    kinds = [kind for kind, _, _ in chunks]
    if tuple(rest) != RGB8 or not width or not height or b"acTL" in kinds or b"tRNS" in kinds \
            or b"IDAT" not in kinds:
        return None
    first = kinds.index(b"IDAT")
    n_idat = kinds.count(b"IDAT")
    if kinds[first:first + n_idat] != [b"IDAT"] * n_idat:
        return None                     # image data chunks must be consecutive
    expected = height * (1 + 3 * width)
    view = memoryview(data)
    inflater = zlib_ng.decompressobj()
    try:
        raw = inflater.decompress(b"".join(view[s:e] for _, s, e in chunks[first:first + n_idat]), expected + 1)
    except zlib_ng.error:
        return None
    if len(raw) != expected or not inflater.eof:
        return None
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
    if int(rows[:, 0].max()) >= FILTER_TYPES:
        return None
    return rows
