"""Image bytes -> model input, identical to transformers' Qwen2VLImageProcessor (PIL backend).

Steps (docs/gui-actor.md section 6): decode with a pixel cap checked on the header before any
pixel is decoded; composite transparency onto white; down-only cap to 3200x1800 of area;
`smart_resize` (factor 28); bicubic resize with PIL; rescale 1/255 and CLIP-normalise in float32;
patchify to [grid_h * grid_w, 1176] with each 2x2 merge group contiguous. NumPy, PIL and
imagecodecs (decoding), no MLX: this runs on the preprocessing threads.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from workers import png_inflate, still_decoders
from workers.engine import JobError
from workers.parallel_resize import order_for, resize_bicubic

SCREEN_CAP_AREA = 3200 * 1800        # demo's pre-resize cap (pixels of area), applied down-only
PATCH = 14
MERGE = 2
TEMPORAL = 2
FACTOR = PATCH * MERGE               # one visual token covers 28x28 resized pixels
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # screenshot formats; no exotic parsers on user bytes
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass(frozen=True)
class PreparedImage:
    """`pixel_values` float32 [grid_h*grid_w, 1176] (None when the engine patchifies on the
    device); `rgb` uint8 [H', W', 3] the resized image, or with `resize_order` ('hv'/'vh', Pillow's
    pass order) the decoded image that the device resizes; `grid_thw` (1, grid_h, grid_w) in
    14-px patches; sizes are (width, height) in pixels: `original` as decoded, `resized` as fed
    to the ViT. Visual tokens: grid_h/2 x grid_w/2."""
    pixel_values: np.ndarray | None
    grid_thw: tuple[int, int, int]
    original: tuple[int, int]
    resized: tuple[int, int]
    rgb: np.ndarray | None = None
    resize_order: str | None = None   # set: `rgb` is still to be resized to `resized` on the device

    @property
    def token_grid(self) -> tuple[int, int]:
        """(n_h, n_w): visual tokens per column and per row."""
        return self.grid_thw[1] // MERGE, self.grid_thw[2] // MERGE

    @property
    def n_tokens(self) -> int:
        n_h, n_w = self.token_grid
        return n_h * n_w


def decode_image(data: bytes | memoryview, max_pixels: int, alloc: png_inflate.Alloc | None = None) -> np.ndarray:
    """Encoded bytes -> RGB uint8 [H, W, 3]. `max_pixels` caps width*height of the decoded image
    and is checked on the header, before decoding (decompression bombs). Raises JobError
    payload_too_large / invalid_image.

    Still 8-bit RGB and RGBA PNGs, WebPs and JPEGs, nearly every screenshot, are decoded by
    imagecodecs (workers/still_decoders.py): the same pixels as Pillow's decoders, 2-5x faster
    (bench.still_decoders, bench/RESULTS.md). Everything else goes to Pillow. `alloc` (shape ->
    uninitialised uint8 array): where those are decoded to, and an opaque RGBA one's RGB copied to
    (the GPU engine's page-locked buffers, which the upload copies from fastest)."""
    raw = bytes(data)
    try:
        img = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Image.DecompressionBombError:  # PIL's own hard cap (about 179M pixels), from the header
        raise JobError("payload_too_large", f"image exceeds {max_pixels} pixels") from None
    except Image.UnidentifiedImageError:
        raise JobError("invalid_image", f"not an image in a supported format ({', '.join(FORMATS)})") from None
    except Exception as exc:  # PIL raises many types for garbage input
        raise JobError("invalid_image", f"not a decodable image: {exc}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise JobError("invalid_image", f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise JobError("payload_too_large", f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    try:
        rgb = still_decoders.decode(img, raw, alloc)
    except Exception as exc:
        raise JobError("invalid_image", f"image data is truncated or corrupt: {exc}") from None
    if rgb is not None and rgb.dtype == np.uint8 and rgb.shape == (h, w, len(img.mode)):  # 16-bit: Pillow's way
        if rgb.shape[2] == 3:
            return rgb
        if rgb[..., 3].min() == 255:    # opaque RGBA, as most RGBA screenshots are
            out = alloc((h, w, 3)) if alloc is not None else np.empty((h, w, 3), np.uint8)
            np.copyto(out, rgb[..., :3])
            return out
        return np.asarray(to_rgb(Image.fromarray(rgb, "RGBA")))
    try:
        img.load()
    except Exception as exc:
        raise JobError("invalid_image", f"image data is truncated or corrupt: {exc}") from None
    return np.asarray(to_rgb(img))


def size_of(rgb: np.ndarray) -> tuple[int, int]:
    """(width, height) of an [H, W, ...] image array."""
    return rgb.shape[1], rgb.shape[0]


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparency composited onto white (what transformers' convert_to_rgb does)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] == 255:
            # fully opaque, as most RGBA screenshots are: compositing changes nothing, and skipping
            # it saves ~20 ms at 1080p
            return rgba.convert("RGB")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def cap_screen(rgb: np.ndarray, cap_area: int = SCREEN_CAP_AREA) -> np.ndarray:
    """Down-only resize of uint8 [H, W, 3] to at most `cap_area` pixels of area, aspect kept
    (GUI-Actor demo)."""
    w, h = size_of(rgb)
    if w * h <= cap_area:
        return rgb
    r = math.sqrt(cap_area / (w * h))
    return resize_bicubic(rgb, (int(w * r), int(h * r)))


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = 3136,
                 max_pixels: int = 12845056) -> tuple[int, int]:
    """(height, width) in pixels, multiples of `factor`, area within [min_pixels, max_pixels]
    when possible; transformers' arithmetic exactly. ValueError on aspect ratio > 200."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got "
                         f"{max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H, W, 3]: x/255 (in float64, then float32), minus CLIP mean,
    over CLIP std, in the same order and precision as transformers (bit-identical)."""
    x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - CLIP_MEAN) / CLIP_STD


def patchify(chw: np.ndarray) -> np.ndarray:
    """float32 [3, H, W] (H, W multiples of 28) -> [H/14 * W/14, 3*2*14*14]; the still image is
    repeated over the 2 temporal slots; patches ordered so that each 2x2 merge group is contiguous."""
    c, h, w = chw.shape
    gh, gw = h // PATCH, w // PATCH
    p = chw.reshape(c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    p = p.transpose(1, 4, 2, 5, 0, 3, 6)                     # (gh/2, gw/2, 2, 2, C, 14, 14)
    p = np.broadcast_to(p[:, :, :, :, :, None], (*p.shape[:5], TEMPORAL, PATCH, PATCH))
    return np.ascontiguousarray(p.reshape(gh * gw, c * TEMPORAL * PATCH * PATCH))


def pixel_values_of(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H', W', 3] resized image -> float32 [N, 1176] pixel values, as transformers makes them."""
    return patchify(np.ascontiguousarray(normalize(rgb).transpose(2, 0, 1)))


def plan_resize(rgb: np.ndarray, min_pixels: int, max_pixels: int,
                cap_area: int | None = SCREEN_CAP_AREA) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """uint8 [H, W, 3] -> (image after the screen cap, original (w, h), target (w', h') from
    smart_resize). Raises JobError invalid_image for aspect ratios over 200."""
    original = size_of(rgb)
    if cap_area:
        rgb = cap_screen(rgb, cap_area)
    w, h = size_of(rgb)
    try:
        rh, rw = smart_resize(h, w, FACTOR, min_pixels, max_pixels)
    except ValueError as exc:
        raise JobError("invalid_image", str(exc)) from None
    return rgb, original, (rw, rh)


def preprocess(rgb: np.ndarray, min_pixels: int, max_pixels: int,
               cap_area: int | None = SCREEN_CAP_AREA, patches: bool = True,
               device_resize: Callable[[tuple[int, int], tuple[int, int]], bool] | None = None) -> PreparedImage:
    """uint8 [H, W, 3] (`decode_image`) -> PreparedImage. `min_pixels` / `max_pixels` bound the
    resized area (pixels). With `patches=False` only the resized uint8 image is kept: the engine
    normalises and patchifies it on the device. With `device_resize` (src, dst) -> True, the bicubic
    resize is left to the device too, once Pillow's pass order for the sizes is known. Raises
    JobError invalid_image for aspect ratios over 200."""
    capped, original, (rw, rh) = plan_resize(rgb, min_pixels, max_pixels, cap_area)
    grid = (1, rh // PATCH, rw // PATCH)
    if device_resize is not None and not patches and device_resize(size_of(capped), (rw, rh)):
        order = order_for(size_of(capped), (rw, rh))
        if order is not None:
            return PreparedImage(None, grid, original, (rw, rh), capped, resize_order=order)
    resized = resize_bicubic(capped, (rw, rh))
    return PreparedImage(pixel_values_of(resized) if patches else None, grid, original, (rw, rh), resized)
