"""A cached question's prefix-join kernel stays out of the way where it cannot run, and the language
model hands it what the MLX-ops path it replaces takes.

The kernel runs only on MLX's CUDA backend (checked bit for bit against `reference` by
`cuda_prefix_join.load`'s probe at every model load, and on the GPU machine by bench.cuda_loads).
Here, on the CPU: `reference` is the rotary and the join in the kernel's layouts (against float64
NumPy), load() declines without CUDA and for float16, and a question's tail with a stand-in in the
kernel's place calls it once per layer with its shapes and gives the same pointer states.
"""
import mlx.core as mx
import numpy as np
import pytest

from tests.tiny_engine import engine_keeping_a_screenshot
from workers.engine import GroundingRequest
from workers.mlx import cuda_prefix_join as cpj
from workers.mlx.backbone import pointer_state_after


def test_reference_rotates_the_tails_q_and_k_and_joins_k_and_v_after_the_prefix():
    b, t, p, heads, kv, d = 2, 5, 7, 4, 2, 16
    rng = np.random.default_rng(0)
    qkv = rng.normal(size=(b, t, (heads + 2 * kv) * d)).astype(np.float32)
    ang = rng.uniform(0, 30, (b, t, d)).astype(np.float32)
    cos, sin = np.cos(ang), np.sin(ang)
    pk, pv = rng.normal(size=(2, 1, kv, p, d)).astype(np.float32)
    q, k, v = (np.array(a) for a in cpj.reference(*(mx.array(a) for a in (qkv, cos, sin, pk, pv)), heads, kv))
    x = qkv.astype(np.float64).reshape(b, t, heads + 2 * kv, d).transpose(0, 2, 1, 3)    # [B, heads, T, D]
    half = lambda z: np.concatenate([-z[..., d // 2:], z[..., :d // 2]], -1)
    c, s = cos[:, None].astype(np.float64), sin[:, None].astype(np.float64)
    rotated = x[:, :heads + kv] * c + half(x[:, :heads + kv]) * s                        # q heads, then k heads
    assert q.shape == (b, heads, t, d) and k.shape == v.shape == (b, kv, p + t, d)
    np.testing.assert_allclose(q, rotated[:, :heads], rtol=1e-5, atol=1e-5)
    for row in range(b):                       # every row: the shared prefix, then its own tail
        np.testing.assert_array_equal(k[row, :, :p], pk[0])
        np.testing.assert_array_equal(v[row, :, :p], pv[0])
    np.testing.assert_allclose(k[:, :, p:], rotated[:, heads:], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(v[:, :, p:], x[:, heads + kv:].astype(np.float32))


def test_load_declines_without_cuda_and_where_it_would_not_give_mlxs_bits():
    assert cpj.supported(128, mx.bfloat16) and cpj.supported(128, mx.float32)
    assert not cpj.supported(128, mx.float16)          # MLX's compiled float16 rotary differs in the last place
    assert not cpj.supported(4, mx.bfloat16)           # a row of 8 bytes: no whole 16-byte pieces
    if not mx.cuda.is_available():
        assert cpj.load(12, 2, 128, mx.bfloat16) is None


@pytest.mark.parametrize("questions", [1, 3])
def test_a_tail_hands_the_kernel_each_layers_projection_and_the_kept_prefix(questions, tmp_path):
    eng, img = engine_keeping_a_screenshot(tmp_path)
    lm = eng._lm
    assert (lm.prefix_join is None) == (not mx.cuda.is_available())
    jobs = [eng.prepare(GroundingRequest(str(i), img, "open the menu" + ", then the tab" * i)) for i in range(questions)]
    entry = jobs[0].cached
    assert entry is not None
    args = (eng._model, lm, entry.kept, [j.input_ids[entry.prefix:] for j in jobs],
            [j.position_ids[:, entry.prefix:] for j in jobs])
    lm.prefix_join = None
    want = pointer_state_after(*args)                                                 # MLX ops
    calls = []

    def stand_in(qkv, cos, sin, pk, pv):
        calls.append((qkv.shape, cos.shape, sin.shape, pk.shape, pv.shape))
        return cpj.reference(qkv, cos, sin, pk, pv, lm.heads, lm.kv_heads)

    lm.prefix_join = stand_in
    got = pointer_state_after(*args)
    assert got.shape == want.shape and bool(mx.array_equal(got, want))
    assert len(calls) == len(lm.layers)                                               # the last layer's too
    (qkv_shape, cos_shape, sin_shape, pk_shape, pv_shape), = set(calls)
    rows, tail, width = qkv_shape
    assert rows == questions and width == (lm.heads + 2 * lm.kv_heads) * lm.head_dim
    assert cos_shape == sin_shape == (rows, tail, lm.head_dim)
    assert pk_shape == pv_shape == (1, lm.kv_heads, entry.prefix, lm.head_dim)
