"""Hand-made PNG bytes for tests: chunks with their CRCs, and whole files from IHDR fields and image data."""
from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(ihdr: bytes, *idat: bytes) -> bytes:
    """Signature, IHDR (its 13 bytes), one IDAT chunk per part of the image data, IEND."""
    return SIGNATURE + chunk(b"IHDR", ihdr) + b"".join(chunk(b"IDAT", d) for d in idat) + chunk(b"IEND", b"")


def filtered_rows(pixels: np.ndarray, filters: list[int]) -> bytes:
    """uint8 [H, W, C] as a PNG's image data before deflate: row y filtered by
    filters[y % len(filters)] (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth, as the PNG spec defines them),
    each row its filter type and then its bytes."""
    h, w, c = pixels.shape
    x = pixels.reshape(h, w * c).astype(np.int64)
    out = []
    for y in range(h):
        ft = filters[y % len(filters)]
        row, up = x[y], (x[y - 1] if y else np.zeros_like(x[y]))
        left = np.concatenate([np.zeros(c, np.int64), row[:-c]])
        upleft = np.concatenate([np.zeros(c, np.int64), up[:-c]])
        p = left + up - upleft
        pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        pred = [0, left, up, (left + up) // 2, paeth][ft]
        out.append(bytes([ft]) + ((row - pred) % 256).astype(np.uint8).tobytes())
    return b"".join(out)
