"""The CUDA rotary kernel's probe compares against the right thing.

The kernel itself runs only on MLX's CUDA backend (checked on the GPU machine by bench.vit_ops
and, at every model load, by cuda_rotary.load's probe). Here, on the CPU: the probe's reference
(`rotate_qk`, also the vision path elsewhere than CUDA) is transformers' vision rotary, in the
kernel's layouts, and load() declines where there is no CUDA.
"""
import mlx.core as mx
import numpy as np

from workers.mlx import cuda_rotary


def test_reference_is_transformers_vision_rotary_in_the_kernels_layout():
    n, heads, hd = 37, 4, 16
    rng = np.random.default_rng(3)
    qkv = rng.normal(size=(n, 3 * heads * hd)).astype(np.float32)
    ang = rng.uniform(0, 30, (n, hd // 2)).astype(np.float32)
    cos, sin = np.cos(ang), np.sin(ang)
    got = np.array(cuda_rotary.reference(mx.array(qkv), mx.array(cos), mx.array(sin), heads))
    # transformers' apply_rotary_pos_emb_vision: t * cos + rotate_half(t) * sin, tables repeated twice
    c, s = np.concatenate([cos, cos], -1)[:, None], np.concatenate([sin, sin], -1)[:, None]
    x = qkv.reshape(n, 3, heads, hd).astype(np.float64)
    half = lambda t: np.concatenate([-t[..., hd // 2:], t[..., :hd // 2]], -1)
    want = np.stack([x[:, i] * c + half(x[:, i]) * s for i in (0, 1)], axis=1)
    assert got.shape == (n, 2, heads, hd)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_load_declines_without_cuda():
    if not mx.cuda.is_available():
        assert cuda_rotary.load(4, 16, mx.float32) is None


def test_every_rotary_kernel_takes_the_one_copy_of_its_arithmetic():
    from workers.mlx import cuda_flash_attention, cuda_window_attention
    assert cuda_rotary.ROTARY_HELPERS in cuda_window_attention.CudaWindowAttention.header
    for source in (cuda_rotary._SOURCE, cuda_window_attention._SOURCE, cuda_flash_attention._TILES_SOURCE):
        assert "rotary_first(" in source and "rotary_second(" in source and "__fmul_rn" not in source
