"""The device resize (float32 matmuls) gives exactly PIL's bytes, in either pass order.
(On MLX's CPU backend here; bench.gpu_ground checks 1080p screens on the GPU.)"""
import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from bench.screens import screenshot
from workers import parallel_resize as pr
from workers.mlx import resize

BICUBIC = Image.Resampling.BICUBIC


def check(rgb: np.ndarray, dst: tuple[int, int]) -> None:
    src = (rgb.shape[1], rgb.shape[0])
    order = pr.pass_order(src, dst)
    want = np.asarray(Image.fromarray(rgb).resize(dst, BICUBIC))
    got = np.array(resize.resize_bicubic(mx.array(rgb), dst[0], dst[1], order))
    np.testing.assert_array_equal(got, want, err_msg=f"{src} -> {dst} ({order})")


@pytest.mark.parametrize("src,dst", [
    ((640, 360), (644, 364)),       # a screen onto the 28-px grid (sizes kept small: CPU matmuls)
    ((200, 900), (190, 200)),       # height pass first in Pillow 13
    ((1280, 720), (420, 224)),      # strong downscale both ways
    ((300, 200), (300, 644)),       # height only, upscale
    ((97, 61), (28, 28)),
])
def test_matches_pil_on_noise(src, dst):
    rgb = np.random.default_rng(src[0] + dst[1]).integers(0, 256, (src[1], src[0], 3), dtype=np.uint8)
    check(rgb, dst)


def test_matches_pil_on_a_screenshot_and_random_sizes():
    check(np.asarray(screenshot(701, 433, seed=2)), (700, 420))
    rng = np.random.default_rng(5)
    for _ in range(6):
        src = tuple(int(v) for v in rng.integers(8, 400, 2))
        dst = tuple(int(v) for v in rng.integers(8, 400, 2))
        check(rng.integers(0, 256, (src[1], src[0], 3), dtype=np.uint8), dst)


def test_the_exactness_bound_refuses_huge_downscales():
    assert resize.supported((3200, 1800), (1932, 1092))
    assert not resize.supported((40000, 100), (100, 100))


def test_the_load_time_check_passes_where_matmuls_are_exact():
    assert resize.matches_pil_here()


def test_the_weights_reproduce_pils_one_axis_resize_on_many_sizes():
    """Pillow resizes a one-row image with its horizontal pass alone: applying our fixed-point taps
    with PIL's integer arithmetic must give its bytes, up- and downscales, 300 size pairs."""
    rng = np.random.default_rng(7)
    checked = 0
    while checked < 300:
        a, b = (int(v) for v in rng.integers(2, 3000, 2))
        if not resize.supported((a, 1), (b, 1)):
            continue
        row = rng.integers(0, 256, a, dtype=np.uint8)
        want = np.asarray(Image.fromarray(row[None, :]).resize((b, 1), BICUBIC))[0]
        first, w = resize.fixed_point_taps(a, b)
        acc = sum(row[np.minimum(first + t, a - 1)].astype(np.int64) * w[:, t] for t in range(w.shape[1]))
        got = np.clip((acc + (1 << (resize.PRECISION_BITS - 1))) >> resize.PRECISION_BITS, 0, 255)
        np.testing.assert_array_equal(got, want, err_msg=f"{a} -> {b}")
        checked += 1


def test_the_weight_cache_is_bounded_in_bytes_and_keeps_the_latest():
    resize._cache.clear()
    budget = resize.CACHE_BYTES
    try:
        resize.CACHE_BYTES = sum(n * 3 * 310 * 4 for n in (303, 304, 305))   # room for the last three
        for n in range(300, 306):
            resize._pieces(n, 310)
        assert list(resize._cache) == [(303, 310), (304, 310), (305, 310)]
        first = resize._pieces(304, 310)                    # a hit: the same array, now the newest
        assert first is resize._cache[(304, 310)] and list(resize._cache)[-1] == (304, 310)
    finally:
        resize.CACHE_BYTES = budget
        resize._cache.clear()
