"""PIL's bicubic resize of RGB images, split across CPU cores, byte-identical to one `resize` call.

Why: a 1080p screenshot's resize is 20-60 ms of one core on every request's critical path
(bench/RESULTS.md), and the GPU hosts have 16 cores. PIL's 8-bit resampler is separable: one pass
over rows (each output row depends on one input row) and one over columns, with rounding to uint8
in between. So the horizontal pass can run on row strips and the vertical pass on column strips,
each strip by Pillow itself on its own thread (PIL releases the GIL while resampling), and the
bytes match a whole-image resize. (Cutting the *output* into tiles with `box=` does not match:
PIL clips the filter at the box edges.)

Which pass Pillow runs first changed between releases and depends on the sizes, and the rounding
between passes makes the order visible. Rather than encode one release's rule, the order for each
(source size, target size) pair is measured once on a noise image, in the background, against
Pillow's own whole-image resize; until then, or where neither order matches, Pillow resizes the
whole image itself.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from PIL import Image

BICUBIC = Image.Resampling.BICUBIC
MIN_PARALLEL_PIXELS = 640 * 480      # below this a thread hand-off costs about what it saves
MAX_KNOWN_PAIRS = 512                # bounded memory for many distinct screen sizes
STRIPS_PER_THREAD = 2                # a little oversubscription evens out uneven strips

_threads = max(1, min(8, os.cpu_count() or 1))
_pool = ThreadPoolExecutor(max_workers=_threads, thread_name_prefix="resize")
_lock = threading.Lock()
_orders: dict[tuple[tuple[int, int], tuple[int, int]], str | None] = {}
_probing: set[tuple[tuple[int, int], tuple[int, int]]] = set()


def resize_bicubic(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3] for `size` (w, h), identical to Pillow's
    `resize(size, BICUBIC)` of the same image (other shapes: Pillow on the whole image)."""
    src = (rgb.shape[1], rgb.shape[0])
    order = None
    if rgb.ndim == 3 and rgb.shape[2] == 3 and _threads > 1 and src[0] * src[1] >= MIN_PARALLEL_PIXELS:
        order = order_for(src, size)
    if order is None:
        return np.asarray(Image.fromarray(rgb).resize(size, BICUBIC))
    return resize_in_strips(rgb, size, order)


def order_for(src: tuple[int, int], dst: tuple[int, int]) -> str | None:
    """Pillow's pass order for this size pair if measured ('hv' or 'vh'), else None; the first
    ask starts the measurement in the background (workers/mlx/resize.py uses it too)."""
    key = (tuple(src), tuple(dst))
    with _lock:
        order = _orders.get(key, "unknown")
        if order == "unknown" and key not in _probing:
            _probing.add(key)
            _pool.submit(_learn_order, key)
    return None if order == "unknown" else order


def pass_order(src: tuple[int, int], dst: tuple[int, int]) -> str | None:
    """'hv' (horizontal first) or 'vh' for what the installed Pillow does resizing an RGB image
    from `src` to `dst` (w, h); None if a two-pass split reproduces neither."""
    noise = np.random.default_rng(src[0] * 7919 + src[1]).integers(0, 256, (src[1], src[0], 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(noise).resize(dst, BICUBIC))
    for order in ("hv", "vh"):
        if np.array_equal(resize_in_strips(noise, dst, order, parallel=False), want):
            return order
    return None


def learn_now(src: tuple[int, int], dst: tuple[int, int]) -> str | None:
    """Measure the pass order for this size pair on the calling thread (model warm-up)."""
    _learn_order((tuple(src), tuple(dst)))
    return order_for(src, dst)


def _learn_order(key: tuple[tuple[int, int], tuple[int, int]]) -> None:
    try:
        order = pass_order(*key)
    except Exception:              # never let a probe take down a worker; PIL keeps doing it whole
        order = None
    with _lock:
        if len(_orders) >= MAX_KNOWN_PAIRS:
            _orders.pop(next(iter(_orders)))
        _orders[key] = order
        _probing.discard(key)


def learned_order(src: tuple[int, int], dst: tuple[int, int]) -> str | None:
    """The pass order measured for this pair so far: 'hv', 'vh', None (PIL whole) or 'unknown'."""
    with _lock:
        return _orders.get((tuple(src), tuple(dst)), "unknown")


def resize_in_strips(rgb: np.ndarray, size: tuple[int, int], order: str, parallel: bool = True) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3] for `size` (w, h): the width pass on row strips and the
    height pass on column strips, in `order` ('hv' or 'vh'), strips on the pool when `parallel`."""
    w, h = size
    for axis in order:
        if axis == "h" and rgb.shape[1] != w:
            rgb = _pass(rgb, w, rgb.shape[0], split_axis=0, parallel=parallel)
        elif axis == "v" and rgb.shape[0] != h:
            rgb = _pass(rgb, rgb.shape[1], h, split_axis=1, parallel=parallel)
    return rgb


def _pass(rgb: np.ndarray, w: int, h: int, split_axis: int, parallel: bool) -> np.ndarray:
    """Resize one axis only, Pillow doing each strip: rows stay rows in a width-only resize
    (split_axis 0), columns stay columns in a height-only one (split_axis 1)."""
    out = np.empty((h, w, 3), dtype=np.uint8)
    n = rgb.shape[split_axis]
    parts = _threads * STRIPS_PER_THREAD if parallel else 1
    edges = np.linspace(0, n, min(parts, n) + 1).astype(int)

    def strip(a: int, b: int) -> None:
        if split_axis == 0:
            out[a:b] = np.asarray(Image.fromarray(rgb[a:b]).resize((w, b - a), BICUBIC))
        else:
            src = np.ascontiguousarray(rgb[:, a:b])
            out[:, a:b] = np.asarray(Image.fromarray(src).resize((b - a, h), BICUBIC))

    spans = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    if len(spans) == 1:
        strip(*spans[0])
    else:
        futures: list[Future] = [_pool.submit(strip, a, b) for a, b in spans]
        for f in futures:
            f.result()
    return out
