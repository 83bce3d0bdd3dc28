"""The CUDA window attention kernel's probe compares against the right thing.

The kernel runs only on MLX's CUDA backend (checked on the GPU machine by bench.tower_ops and
bench.window_attention_kernel and, at every model load, by cuda_window_attention.load's probe).
Here, on the CPU: the windows it is given are the tower's spans, window by window; the probe's
reference is the tower's own path (rotary, then attention per span); load() declines where there
is no CUDA or the model is not bf16, and the tower then runs that path.
"""
import mlx.core as mx
import numpy as np

from common.config import ModelSpec
from workers.engine import EngineOptions
from workers.mlx import cuda_window_attention as cwa
from workers.mlx.cuda_rotary import rotate_qk
from workers.mlx.engine import MlxEngine
from workers.mlx.vision import attend


def test_windows_lists_each_window_of_the_spans():
    starts, sizes = cwa.windows([(0, 3, 64), (192, 2, 48), (288, 1, 12)])
    assert starts.tolist() == [0, 64, 128, 192, 240, 288]
    assert sizes.tolist() == [64, 64, 64, 48, 48, 12]
    assert starts.dtype == sizes.dtype == mx.int32


def test_reference_is_the_towers_rotary_then_attention():
    n, heads, hd, scale = 140, 2, 16, 0.25
    spans = [(0, 2, 64), (128, 1, 12)]
    qkv = mx.random.normal((n, 3 * heads * hd), key=mx.random.key(2))
    ang = mx.random.uniform(0, 30, (n, hd // 2), key=mx.random.key(3))
    cos, sin = mx.cos(ang), mx.sin(ang)
    q, k = rotate_qk(qkv.reshape(n, 3, heads, hd), cos, sin)
    want = attend(q, k, qkv.reshape(n, 3, heads, hd)[:, 2], spans, scale)
    got = cwa.reference(qkv, cos, sin, spans, heads, scale)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)
    # windows do not see each other: changing the last window's keys leaves the first two alone
    other = mx.concatenate([qkv[:128], qkv[128:] * 3], axis=0)
    moved = cwa.reference(other, cos, sin, spans, heads, scale)
    np.testing.assert_array_equal(np.array(moved[:128]), np.array(got[:128]))
    assert not np.allclose(np.array(moved[128:]), np.array(got[128:]))


def test_load_declines_without_cuda_or_bf16(tmp_path):
    if not mx.cuda.is_available():
        assert cwa.load(16, 80, 80 ** -0.5, mx.bfloat16, 64) is None
    assert cwa.load(16, 80, 80 ** -0.5, mx.float16, 64) is None        # bf16 only
    assert cwa.load(16, 80, 80 ** -0.5, mx.bfloat16, 256) is None      # windows past the kernel's 64
    eng = MlxEngine(ModelSpec(path="tiny:qwen2_5_vl", dtype="float32"), EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    assert eng._vision.window_attention is None                         # the tower's own path runs
