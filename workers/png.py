"""A PNG's image data inflated with zlib-ng, handed back to Pillow uncompressed.

Decoding a 1080p screenshot PNG takes Pillow ~12-15 ms, nearly all of it in zlib's inflate: stock
zlib copies the long, short-distance matches of flat UI areas byte by byte. zlib-ng inflates the
same stream in 0.3-3 ms (bench/RESULTS.md). Pillow cannot use another inflate, so
`with_stored_image_data` inflates the image data itself and returns the same PNG with that data in
*stored* (uncompressed) deflate blocks; Pillow then only copies it and undoes the PNG row filters
in C, and the pixels are Pillow's own by construction. Anything unusual (interlaced, animated,
malformed, truncated) gives None, and Pillow decodes the original bytes and reports any error itself.
"""
from __future__ import annotations

import struct

from zlib_ng import zlib_ng

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}   # PNG colour type -> samples per pixel
STORED_MAX = 0xFFFF                          # bytes in one stored deflate block
ZLIB_HEADER = b"\x78\x01"                    # deflate, 32 KiB window, no dictionary


def _chunks(data: bytes) -> list[tuple[bytes, int, int]] | None:
    """[(type, start of chunk, end of chunk)] up to IEND, or None if the layout is broken."""
    out, pos = [], len(SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 12 + length
        if end > len(data):
            return None
        kind = data[pos + 4:pos + 8]
        out.append((kind, pos, end))
        if kind == b"IEND":
            return out
        pos = end
    return None


def _scanline_bytes(ihdr: bytes) -> int | None:
    """Filtered image data size of a non-interlaced PNG from its IHDR payload, else None."""
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", ihdr)
    channels = CHANNELS.get(colour)
    if channels is None or compression or filtering or interlace or not width or not height:
        return None
    return height * (1 + (width * channels * depth + 7) // 8)


def _stored_zlib(raw: bytes) -> list[bytes | memoryview]:
    """`raw` as a zlib stream of stored blocks, in pieces (no copy of `raw` here)."""
    view, n = memoryview(raw), len(raw)
    parts: list[bytes | memoryview] = [ZLIB_HEADER]
    for start in range(0, n, STORED_MAX):
        size = min(STORED_MAX, n - start)
        parts.append(struct.pack("<BHH", start + size >= n, size, size ^ 0xFFFF))
        parts.append(view[start:start + size])
    parts.append(struct.pack(">I", zlib_ng.adler32(raw)))
    return parts


def with_stored_image_data(data: bytes) -> bytes | None:
    """The PNG `data` with its IDAT chunks replaced by one IDAT holding the same filtered rows,
    uncompressed; None where Pillow should decode the original (see the module docstring). The
    caller has already bounded width x height, so the inflated size is bounded too."""
    if not data.startswith(SIGNATURE):
        return None
    chunks = _chunks(data)
    if not chunks or chunks[0][0] != b"IHDR" or chunks[0][2] - chunks[0][1] != 25:
        return None
    kinds = [kind for kind, _, _ in chunks]
    if b"acTL" in kinds or b"IDAT" not in kinds:
        return None
    first = kinds.index(b"IDAT")
    last = len(kinds) - 1 - kinds[::-1].index(b"IDAT")
    if kinds[first:last + 1].count(b"IDAT") != last + 1 - first:
        return None     # image data chunks must be consecutive
    expected = _scanline_bytes(data[chunks[0][1] + 8:chunks[0][1] + 21])
    if expected is None:
        return None
    compressed = b"".join(memoryview(data)[start + 8:end - 4] for _, start, end in chunks[first:last + 1])
    inflater = zlib_ng.decompressobj()
    try:
        raw = inflater.decompress(compressed, expected + 1)
    except zlib_ng.error:
        return None
    if len(raw) != expected or not inflater.eof:
        return None
    parts = _stored_zlib(raw)
    crc = zlib_ng.crc32(b"IDAT")
    for part in parts:
        crc = zlib_ng.crc32(part, crc)
    head = memoryview(data)[:chunks[first][1]]
    tail = memoryview(data)[chunks[last][2]:chunks[-1][2]]
    return b"".join([head, struct.pack(">I", sum(len(p) for p in parts)), b"IDAT", *parts,
                     struct.pack(">I", crc), tail])
