"""Generated GUI-like screenshots for benchmarks and tests (no data sets are downloaded).

A window with a title bar, a sidebar, text lines and a grid of labelled buttons: enough structure
for image codecs and the vision tower to do realistic work, and deterministic per seed.
"""
from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw


def screenshot(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), (236, 239, 244))
    d = ImageDraw.Draw(img)
    bar = max(24, height // 30)
    d.rectangle([0, 0, width, bar], fill=(45, 52, 64))
    for i, color in enumerate([(191, 97, 106), (235, 203, 139), (163, 190, 140)]):
        d.ellipse([10 + i * (bar * 0.9), bar * 0.25, 10 + i * (bar * 0.9) + bar * 0.5, bar * 0.75], fill=color)
    side = width // 6
    d.rectangle([0, bar, side, height], fill=(216, 222, 233))
    for i in range(12):
        y = bar + 20 + i * max(18, height // 30)
        d.text((16, y), f"Folder {rng.randint(1, 999)}", fill=(59, 66, 82))
    for row in range(6):
        for col in range(5):
            x0 = side + 30 + col * (width - side - 60) // 5
            y0 = bar + 40 + row * (height - bar - 80) // 6
            w, h = (width - side - 60) // 6, (height - bar - 80) // 9
            fill = tuple(rng.randint(80, 220) for _ in range(3))
            d.rounded_rectangle([x0, y0, x0 + w, y0 + h], radius=6, fill=fill, outline=(46, 52, 64))
            d.text((x0 + 8, y0 + h // 3), f"Button {row * 5 + col}", fill=(255, 255, 255))
    return img


# How agents' screenshot tools commonly save them: PNG (lossless), JPEG and WebP at a quality
# that keeps small text legible.
SAVE = {"png": ("PNG", {}), "jpeg": ("JPEG", {"quality": 85}), "webp": ("WEBP", {"quality": 80})}
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encoded(width: int, height: int, seed: int = 0, fmt: str = "png") -> bytes:
    """The screenshot saved as `fmt`, a key of SAVE."""
    name, params = SAVE[fmt]
    buf = io.BytesIO()
    screenshot(width, height, seed).save(buf, format=name, **params)
    return buf.getvalue()


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    return encoded(width, height, seed, "png")
