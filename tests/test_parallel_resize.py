"""The strip-parallel bicubic resize gives exactly PIL's bytes, whatever the sizes and pass order."""
import time

import numpy as np
import pytest
from PIL import Image

from bench.screens import screenshot
from workers import parallel_resize as pr

BICUBIC = Image.Resampling.BICUBIC


def pil(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize(size, BICUBIC))


@pytest.mark.parametrize("src,dst", [
    ((1920, 1080), (1932, 1092)),      # 1080p screen to the 28-px grid: slight upscale both ways
    ((2560, 1440), (2240, 1260)),      # downscale, both axes
    ((1000, 3000), (980, 700)),        # height shrinks much more than width (vertical first in Pillow 13)
    ((3000, 700), (900, 700)),         # width only
    ((700, 2000), (700, 640)),         # height only
    ((641, 481), (29, 3000)),          # extreme aspect change
])
def test_strips_match_pil_in_the_order_pillow_uses(src, dst):
    order = pr.pass_order(src, dst)
    assert order in ("hv", "vh")
    rgb = np.random.default_rng(1).integers(0, 256, (src[1], src[0], 3), dtype=np.uint8)
    np.testing.assert_array_equal(pr.resize_in_strips(rgb, dst, order), pil(rgb, dst))


def test_the_wrong_order_is_visible_so_the_probe_can_tell_them_apart():
    src, dst = (1000, 3000), (980, 700)
    rgb = np.random.default_rng(2).integers(0, 256, (src[1], src[0], 3), dtype=np.uint8)
    wrong = {"hv": "vh", "vh": "hv"}[pr.pass_order(src, dst)]
    assert not np.array_equal(pr.resize_in_strips(rgb, dst, wrong), pil(rgb, dst))


def test_random_sizes():
    rng = np.random.default_rng(3)
    for _ in range(6):
        src = tuple(int(v) for v in rng.integers(640, 1400, 2))
        dst = tuple(int(v) for v in rng.integers(28, 1600, 2))
        order = pr.pass_order(src, dst)
        assert order is not None, (src, dst)
        rgb = rng.integers(0, 256, (src[1], src[0], 3), dtype=np.uint8)
        np.testing.assert_array_equal(pr.resize_in_strips(rgb, dst, order), pil(rgb, dst), err_msg=f"{src}->{dst}")


def test_public_entry_learns_the_order_in_the_background_and_stays_identical():
    img = screenshot(1301, 733, seed=4)
    dst = (1316, 728)
    want = np.asarray(img.resize(dst, BICUBIC))
    np.testing.assert_array_equal(pr.resize_bicubic(np.asarray(img), dst), want)   # first call: PIL whole
    deadline = time.monotonic() + 30
    while pr.learned_order(img.size, dst) == "unknown" and time.monotonic() < deadline:
        time.sleep(0.01)
    if pr._threads > 1:
        assert pr.learned_order(img.size, dst) in ("hv", "vh")
    np.testing.assert_array_equal(pr.resize_bicubic(np.asarray(img), dst), want)   # now in strips


def test_small_and_non_rgb_images_go_to_pil_whole():
    small = screenshot(300, 200)
    np.testing.assert_array_equal(pr.resize_bicubic(np.asarray(small), (308, 196)),
                                  np.asarray(small.resize((308, 196), BICUBIC)))
    assert pr.learned_order(small.size, (308, 196)) == "unknown"       # never probed
    gray = screenshot(900, 700).convert("L")
    np.testing.assert_array_equal(pr.resize_bicubic(np.asarray(gray), (896, 700)),
                                  np.asarray(gray.resize((896, 700), BICUBIC)))
