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
