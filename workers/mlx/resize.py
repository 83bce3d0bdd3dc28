"""PIL's bicubic resize of an RGB image on the MLX device, byte-identical, as float32 matmuls.

Why: even split across cores (workers/parallel_resize.py) the resize is ~14 ms of a 1080p
request's ~35 ms of CPU work on the GPU host, while the GPU sits idle waiting for it.

How it stays exact: PIL's 8-bit resampler is integer arithmetic. Per axis, each output pixel is
sum(pixel * w) over a few taps, w fixed-point with 22 fractional bits, then rounded and clipped to
uint8; the width and height passes run one after the other with uint8 in between. Each pass is a
matmul with a banded [in, out] weight matrix. Each weight is split into three 8-bit pieces
(w = c2 * 2^16 + c1 * 2^8 + c0), so every product is an integer below 2^16 and every sum stays
below 2^24: exact in float32, and exact under TF32 too (8-bit inputs fit its 10-bit mantissa), in
any summation order. The three partial sums are recombined in int32, as PIL computes them.
(An earlier gather-based version spent ~18 ms of GPU per 1080p image; see bench/RESULTS.md.)

The pass order (which axis first) is Pillow's and depends on its release; the caller passes the
order that workers.parallel_resize measured for this size pair.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict

import mlx.core as mx
import numpy as np

PRECISION_BITS = 32 - 8 - 2
SUPPORT = 2.0                     # bicubic
MAX_TAPS = 255                    # keeps sums of 8-bit x 8-bit products below 2^24
CACHE_BYTES = 512 << 20           # weight matrices kept (~60 MB per 1080p size pair)
_cache: OrderedDict[tuple[int, int], mx.array] = OrderedDict()
_cache_lock = threading.Lock()


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Pillow's bicubic_filter, elementwise (the same operations in the same order)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def fixed_point_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PIL's fixed-point bicubic weights for one axis (Pillow's precompute_coeffs and
    normalize_coeffs_8bpc, libImaging/Resample.c), vectorised over the output positions:
    (first input index [out], int64 weights [out, taps], zero past each position's window).
    Same double arithmetic in the same order as Pillow's loops, so the same weights."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT * filterscale
    taps = math.ceil(support) * 2 + 1
    ss = 1.0 / filterscale
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)      # C casts truncate toward zero
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    x = np.arange(taps)[None, :]
    inside = x < count[:, None]
    k = np.where(inside, _bicubic((x + first[:, None] - center[:, None] + 0.5) * ss), 0.0)
    total = np.zeros(out_size)
    for t in range(taps):                                 # summed in Pillow's order, tap by tap
        total = total + k[:, t]
    k = np.where(total[:, None] != 0.0, k / np.where(total != 0.0, total, 1.0)[:, None], k)
    fixed = np.trunc(np.where(k < 0, -0.5 + k * (1 << PRECISION_BITS), 0.5 + k * (1 << PRECISION_BITS)))
    return first, np.where(inside, fixed, 0).astype(np.int64)


def supported(src: tuple[int, int], dst: tuple[int, int]) -> bool:
    """False where a downscale is so strong that a pass has more taps than the exactness bound."""
    return all(math.ceil(SUPPORT * max(i / o, 1.0)) * 2 + 1 <= MAX_TAPS for i, o in zip(src, dst))


def _pieces(in_size: int, out_size: int) -> mx.array:
    """float32 [in, 3 * out]: the weight matrix's 8-bit pieces c0 | c1 | c2 side by side, kept for
    the sizes seen last (up to CACHE_BYTES)."""
    key = (in_size, out_size)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    pieces = _build_pieces(in_size, out_size)
    with _cache_lock:
        _cache[key] = pieces
        while len(_cache) > 1 and sum(p.nbytes for p in _cache.values()) > CACHE_BYTES:
            _cache.popitem(last=False)
    return pieces


def _build_pieces(in_size: int, out_size: int) -> mx.array:
    """The pieces scattered on the device from the taps. (Built densely on the host and uploaded,
    as before, a 1440p width took ~0.3-1 s; with screens of several sizes in turn, a cache of the
    last few then missed on every request: bench.first_request, bench/RESULTS.md.)"""
    first, w = fixed_point_taps(in_size, out_size)
    rows = first[:, None] + np.arange(w.shape[1])[None, :]
    cols = np.broadcast_to(np.arange(out_size)[:, None], w.shape)
    live = w != 0
    rows, cols, w = rows[live], cols[live], w[live]
    pieces = (w & 255, (w >> 8) & 255, w >> 16)                    # w >> 16 keeps the sign
    r = mx.array(np.concatenate([rows] * 3).astype(np.int32))
    c = mx.array(np.concatenate([cols, cols + out_size, cols + 2 * out_size]).astype(np.int32))
    v = mx.array(np.concatenate(pieces).astype(np.float32))
    return mx.zeros((in_size, 3 * out_size), mx.float32).at[r, c].add(v)


def _pass(x: mx.array, out_size: int) -> mx.array:
    """float32 [R, in] rows of pixel values -> float32 [R, out]: PIL's pass along the last axis."""
    out = out_size
    s = (x @ _pieces(x.shape[-1], out_size)).astype(mx.int32)    # exact integer sums
    acc = s[:, :out] + (s[:, out:2 * out] << 8) + (s[:, 2 * out:] << 16)
    acc = (acc + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS
    return mx.clip(acc, 0, 255).astype(mx.float32)


def resize_bicubic(rgb: mx.array, width: int, height: int, order: str) -> mx.array:
    """uint8 [H, W, 3] -> uint8 [height, width, 3], identical to PIL's `resize((width, height),
    BICUBIC)` when `order` is the installed Pillow's pass order for these sizes ('hv': width pass
    first, 'vh': height pass first)."""
    h, w, c = rgb.shape
    x = rgb.astype(mx.float32).transpose(2, 0, 1)                 # [3, H, W]
    for axis in order:
        if axis == "h" and x.shape[2] != width:
            cc, rows, cols = x.shape
            x = _pass(x.reshape(cc * rows, cols), width).reshape(cc, rows, width)
        elif axis == "v" and x.shape[1] != height:
            cc, rows, cols = x.shape
            y = _pass(x.transpose(0, 2, 1).reshape(cc * cols, rows), height)
            x = y.reshape(cc, cols, height).transpose(0, 2, 1)
    return x.transpose(1, 2, 0).astype(mx.uint8)


def matches_pil_here() -> bool:
    """Does this device's float32 matmul give PIL's bytes? (Exact on CUDA, with or without TF32,
    and on the CPU; checked at model load on any other backend too, on noise, both pass orders.)"""
    from PIL import Image
    rng = np.random.default_rng(0)
    for (w, h), (dw, dh) in (((97, 61), (112, 56)), ((61, 97), (40, 150)), ((300, 200), (140, 90))):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = np.asarray(Image.fromarray(rgb).resize((dw, dh), Image.Resampling.BICUBIC))
        if not any(np.array_equal(np.array(resize_bicubic(mx.array(rgb), dw, dh, order)), want)
                   for order in ("hv", "vh")):
            return False
    return True
