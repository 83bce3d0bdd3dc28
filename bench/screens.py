"""Generated GUI-like screenshots for benchmarks and tests (no data sets are downloaded).

A window with a title bar, a sidebar, text lines and a grid of labelled buttons: enough structure
for image codecs and the vision tower to do realistic work, and deterministic per seed. Its PNG is
small (~38 KB at 1080p); `busy=True` adds what makes real screenshots' PNGs large (a column of
dense antialiased text and a photo with grain: ~590 KB at 1080p), to check that the small one does
not flatter the decode and the request's transfer.
"""
from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = ("the of and to in is for on with as by at from this that be are was it an or which click button "
         "submit settings profile search results page window file edit view help").split()


def screenshot(width: int, height: int, seed: int = 0, busy: bool = False) -> Image.Image:
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
    if busy:
        _busy(img, d, rng, np.random.default_rng(seed))
    return img


def _busy(img: Image.Image, d: ImageDraw.ImageDraw, rng: random.Random, g: np.random.Generator) -> None:
    """Dense antialiased text over the lower half, and a photo (smooth colours with grain)."""
    width, height = img.size
    font = ImageFont.load_default(size=max(11, height // 80))
    y = height // 2
    while y < height - 20:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 22)))
        d.text((width // 6 + 30, y), line, fill=(rng.randint(0, 60),) * 3, font=font)
        y += font.size + 5
    pw, ph = width // 3, height // 3
    low = g.integers(0, 256, (ph // 24 + 2, pw // 24 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((pw, ph), Image.Resampling.BICUBIC)).astype(np.int16)
    photo = np.clip(smooth + g.integers(-10, 11, (ph, pw, 3)), 0, 255).astype(np.uint8)
    img.paste(Image.fromarray(photo), (width - pw - 30, 60))


# How agents' screenshot tools commonly save them: PNG (lossless), JPEG and WebP at a quality
# that keeps small text legible.
SAVE = {"png": ("PNG", {}), "jpeg": ("JPEG", {"quality": 85}), "webp": ("WEBP", {"quality": 80})}
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encoded(width: int, height: int, seed: int = 0, fmt: str = "png", busy: bool = False) -> bytes:
    """The screenshot saved as `fmt`, a key of SAVE."""
    name, params = SAVE[fmt]
    buf = io.BytesIO()
    screenshot(width, height, seed, busy).save(buf, format=name, **params)
    return buf.getvalue()


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    return encoded(width, height, seed, "png")
