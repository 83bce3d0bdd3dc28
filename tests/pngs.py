"""Hand-made PNG bytes for tests: chunks with their CRCs, and whole files from IHDR fields and image data."""
from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(ihdr: bytes, *idat: bytes) -> bytes:
    """Signature, IHDR (its 13 bytes), one IDAT chunk per part of the image data, IEND."""
    return SIGNATURE + chunk(b"IHDR", ihdr) + b"".join(chunk(b"IDAT", d) for d in idat) + chunk(b"IEND", b"")
