"""PIL's bicubic resize of 8-bit RGB images, bit for bit, on the MLX device.

transformers resizes with PIL (`Image.resize(..., BICUBIC)`), which on a 1080p screenshot costs
20-25 ms of CPU on the request's critical path. PIL's 8-bit resampler is integer arithmetic: per
output pixel, a few taps with fixed-point coefficients (22 fractional bits), horizontal pass
first, each pass rounded and clipped to uint8. The same integer sums on the device give the same
bytes (tests/test_resize.py checks equality with PIL), in well under a millisecond on a GPU.
Coefficients follow Pillow's `precompute_coeffs` / `normalize_coeffs_8bpc` (libImaging/Resample.c).
The pass order changed across Pillow releases (newer ones run the vertical pass first when the
height shrinks more than twice as much as the width); rounding between passes makes the order
visible, so we ask the installed Pillow once, on a small probe image, which rule it follows.
"""
from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx
import numpy as np

PRECISION_BITS = 32 - 8 - 2
BICUBIC_SUPPORT = 2.0


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@lru_cache(maxsize=64)
def coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source index [out, ksize] int32, fixed-point weight [out, ksize] int32) for one axis.
    Taps past a pixel's window have weight 0 and a valid (clamped) index."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    index = np.zeros((out_size, ksize), dtype=np.int32)
    weight = np.zeros((out_size, ksize), dtype=np.int32)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)          # C casts truncate toward zero
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = [_bicubic((x + xmin - center + 0.5) / filterscale) for x in range(xmax)]
        ww = sum(k)
        if ww != 0.0:
            k = [w / ww for w in k]
        for x, w in enumerate(k):
            weight[xx, x] = int(-0.5 + w * (1 << PRECISION_BITS)) if w < 0 else int(0.5 + w * (1 << PRECISION_BITS))
        index[xx, :] = np.minimum(xmin + np.arange(ksize), in_size - 1)
    return index, weight


def _pass(x: mx.array, axis: int, out_size: int) -> mx.array:
    """One separable pass over `axis` (0: rows, 1: columns) of int32 [H, W, 3] -> uint8 values."""
    index, weight = coefficients(x.shape[axis], out_size)
    idx, w = mx.array(index), mx.array(weight)
    if axis == 1:
        taps = x[:, idx]                                    # [H, out, ksize, 3]
        acc = (taps * w[None, :, :, None]).sum(axis=2)
    else:
        taps = x[idx]                                       # [out, ksize, W, 3]
        acc = (taps * w[:, :, None, None]).sum(axis=1)
    acc = acc + (1 << (PRECISION_BITS - 1))
    return mx.clip(acc >> PRECISION_BITS, 0, 255)            # clip8: <= 0 -> 0, >= 256 << 22 -> 255


def _two_pass(x: mx.array, width: int, height: int, vertical_first: bool) -> mx.array:
    h, w, _ = x.shape
    if vertical_first and height != h:
        x = _pass(x, 0, height)
    if width != w:
        x = _pass(x, 1, width)
    if not vertical_first and height != h:
        x = _pass(x, 0, height)
    return x


@lru_cache(maxsize=1)
def _pillow_reorders() -> bool:
    """Does the installed Pillow run the vertical pass first when height shrinks much more?"""
    from PIL import Image
    probe = np.random.default_rng(0).integers(0, 256, (61, 97, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(probe).resize((112, 56), Image.Resampling.BICUBIC))
    ours = np.array(_two_pass(mx.array(probe).astype(mx.int32), 112, 56, vertical_first=True))
    return bool(np.array_equal(ours.astype(np.uint8), ref))


def resize_bicubic(rgb: mx.array, width: int, height: int) -> mx.array:
    """uint8 [H, W, 3] -> uint8 [height, width, 3], identical to PIL's `resize((width, height), BICUBIC)`."""
    h, w, _ = rgb.shape
    shrink_h = h - height
    vertical_first = _pillow_reorders() and shrink_h > 0 and shrink_h > (w - width) * 2
    return _two_pass(rgb.astype(mx.int32), width, height, vertical_first).astype(mx.uint8)
