"""Image header sniffing: format and size from the first bytes, without decoding (no PIL here).

The frontend rejects what is not a PNG/JPEG/WebP, or whose header is cut short, with 400 and
images whose declared size exceeds the pixel cap with 413, before anything reaches the broker.
A header can lie about the body (a truncated IDAT, a corrupt scan): the worker decodes with its
own cap and reports `invalid_image` for those.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from common.errors import ServerError

MAX_ASPECT_RATIO = 200     # Qwen2-VL's smart_resize refuses more extreme shapes
JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
JPEG_SCAN_LIMIT = 1 << 20  # SOF must appear within the first MiB (EXIF thumbnails included)


@dataclass(frozen=True)
class ImageInfo:
    """`width`, `height` in pixels of the original image, as its header declares them."""
    format: str   # png | jpeg | webp
    width: int
    height: int

    @property
    def mime(self) -> str:
        return f"image/{self.format}"


def _invalid(message: str, param: str) -> ServerError:
    return ServerError("invalid_image", message, param=param)


def _png(data: bytes, param: str) -> ImageInfo:
    # 8-byte signature, then the IHDR chunk: length (13), b"IHDR", width, height (big-endian u32)
    if len(data) < 33:
        raise _invalid("truncated PNG: the IHDR chunk is incomplete", param)
    length, ctype, w, h = struct.unpack(">I4sII", data[8:24])
    if ctype != b"IHDR" or length != 13:
        raise _invalid("invalid PNG: the first chunk is not IHDR", param)
    if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        raise _invalid("invalid PNG: the IHDR checksum does not match", param)
    return ImageInfo("png", w, h)


def _jpeg(data: bytes, param: str) -> ImageInfo:
    i, end = 2, min(len(data), JPEG_SCAN_LIMIT)
    while i < end:
        if data[i] != 0xFF:
            raise _invalid("invalid JPEG: bad marker", param)
        while i < end and data[i] == 0xFF:   # fill bytes
            i += 1
        if i >= end:
            break
        marker = data[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:   # standalone markers carry no length
            continue
        if marker in (0xD9, 0xDA):   # end of image / start of scan before any frame header
            raise _invalid("invalid JPEG: no frame header before the scan", param)
        if i + 2 > end:
            break
        (seglen,) = struct.unpack(">H", data[i:i + 2])
        if seglen < 2:
            raise _invalid("invalid JPEG: bad segment length", param)
        if marker in JPEG_SOF:
            if i + 7 > len(data):
                break
            h, w = struct.unpack(">HH", data[i + 3:i + 7])
            return ImageInfo("jpeg", w, h)
        i += seglen
    raise _invalid("truncated JPEG: no frame header found", param)


def _webp(data: bytes, param: str) -> ImageInfo:
    # RIFF <size> WEBP, then the first chunk: VP8 (lossy), VP8L (lossless) or VP8X (extended)
    if len(data) < 30:
        raise _invalid("truncated WebP header", param)
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise _invalid("invalid WebP: bad VP8 start code", param)
        w, h = struct.unpack("<HH", data[26:30])
        return ImageInfo("webp", w & 0x3FFF, h & 0x3FFF)
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise _invalid("invalid WebP: bad VP8L signature", param)
        (bits,) = struct.unpack("<I", data[21:25])
        return ImageInfo("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return ImageInfo("webp", w, h)
    raise _invalid("invalid WebP: unknown first chunk", param)


def sniff(data: bytes, *, max_pixels: int, param: str = "messages") -> ImageInfo:
    """Format and declared size of an encoded image. Raises ServerError: `invalid_image` (400) for
    anything that is not a complete PNG/JPEG/WebP header, a zero or absurd shape;
    `payload_too_large` (413) when width*height exceeds `max_pixels` (decompression bombs)."""
    if not data:
        raise _invalid("the image is empty (zero bytes)", param)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        info = _png(data, param)
    elif data[:3] == b"\xff\xd8\xff":
        info = _jpeg(data, param)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        info = _webp(data, param)
    elif len(data) < 12:
        raise _invalid(f"the image is too short to be PNG, JPEG or WebP ({len(data)} bytes)", param)
    else:
        raise _invalid("not a PNG, JPEG or WebP image", param)
    w, h = info.width, info.height
    if w < 1 or h < 1:
        raise _invalid(f"the image header declares {w}x{h} pixels", param)
    if w * h > max_pixels:
        raise ServerError("payload_too_large", f"the image is {w}x{h} = {w * h} pixels; the limit is "
                          f"{max_pixels} (server.max_image_pixels)", param=param)
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise _invalid(f"the image is {w}x{h}; the aspect ratio must be below {MAX_ASPECT_RATIO}", param)
    return info
