"""The device resize is PIL's bicubic resize, byte for byte (workers/mlx/resize.py)."""
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.mlx

mx = pytest.importorskip("mlx.core")
from workers.mlx.resize import resize_bicubic  # noqa: E402


@pytest.mark.parametrize("src, dst", [
    ((97, 61), (112, 56)),       # up in x, down in y
    ((640, 480), (644, 476)),     # barely changed, like smart_resize on a screenshot
    ((1000, 300), (504, 168)),    # 2x down
    ((333, 777), (84, 196)),      # 4x down: wider kernels
    ((50, 40), (50, 84)),         # vertical pass only
    ((50, 40), (112, 40)),        # horizontal pass only
    ((31, 17), (28, 28)),         # tiny image scaled up (smart_resize's min_pixels)
])
def test_matches_pil_bytes(src, dst):
    rng = np.random.default_rng(sum(src) + sum(dst))
    # random noise is the hard case: overshoot on every edge exercises the clipping
    img = rng.integers(0, 256, (src[1], src[0], 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).resize(dst, Image.Resampling.BICUBIC))
    ours = np.array(resize_bicubic(mx.array(img), *dst))
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_screenshot_content():
    from bench.screens import screenshot
    img = np.asarray(screenshot(1280, 720, seed=3))
    ref = np.asarray(Image.fromarray(img).resize((1288, 728), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(np.array(resize_bicubic(mx.array(img), 1288, 728)), ref)


def test_random_sizes_including_the_pass_order_boundary():
    rng = np.random.default_rng(7)
    for _ in range(25):
        w, h = (int(v) for v in rng.integers(8, 300, 2))
        dw, dh = (int(v) for v in rng.integers(8, 300, 2))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(img).resize((dw, dh), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(np.array(resize_bicubic(mx.array(img), dw, dh)), ref,
                                      err_msg=f"{w}x{h} -> {dw}x{dh}")
