"""The CUDA rotary kernel's probe compares against the right thing.

The kernel itself runs only on MLX's CUDA backend (checked on the GPU machine by bench.vit_ops
and, at every model load, by cuda_rotary.load's probe). Here, on the CPU: the probe's reference
is what the MLX-ops vision path computes, in the kernel's output layout, and load() declines
where there is no CUDA.
"""
import mlx.core as mx
import numpy as np

from workers.mlx import cuda_rotary
from workers.mlx.vision import _qkv, _rotate_qk


def test_reference_is_the_vision_paths_rotary_in_head_major_layout():
    n, heads, hd = 37, 4, 16
    c = heads * hd
    k = iter(mx.random.split(mx.random.key(3), 8))
    x = mx.random.normal((n, c), key=next(k))
    ln_w, ln_b = mx.random.normal((c,), key=next(k)), mx.random.normal((c,), key=next(k))
    qkv_w, qkv_b = mx.random.normal((3 * c, c), key=next(k)) * 0.1, mx.random.normal((3 * c,), key=next(k))
    ang = mx.random.uniform(0, 30, (n, hd // 2), key=next(k))
    cos, sin = mx.cos(ang), mx.sin(ang)
    qkv = _qkv(x, ln_w, ln_b, qkv_w, qkv_b)
    q, kk = _rotate_qk(qkv.reshape(n, 3, heads, hd), cos, sin)
    got = cuda_rotary.reference(qkv, cos, sin, heads)
    assert got.shape == (n, 2, heads, hd)
    for i, t in enumerate((q, kk)):
        np.testing.assert_allclose(np.array(got[:, i]), np.array(t), rtol=1e-6, atol=1e-6)


def test_load_declines_without_cuda():
    if not mx.cuda.is_available():
        assert cuda_rotary.load(4, 16, mx.float32) is None
