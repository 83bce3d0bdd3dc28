"""Our Qwen2.5-VL vision forward (windows batched by size) computes mlx-vlm's tower's function."""
import mlx.core as mx
import numpy as np

from bench.screens import screenshot
from common.config import ModelSpec
from workers.engine import EngineOptions
from workers.images import pixel_values_of
from workers.mlx.engine import MlxEngine
from workers.mlx.vision import normalized_patches
from workers.mlx.vision_qwen2_5 import MLP_ALIGN, _post_attention_swiglu, widened_mlp, window_layout


def test_window_layout_tiles_the_grid_largest_windows_first():
    order, runs = window_layout(26, 16, 4)             # 13 x 8 merge groups, 4 x 4 windows
    assert sorted(order.tolist()) == list(range(13 * 8))
    assert runs == [(16, 6), (4, 2)]                   # six full windows, then the bottom row's two
    first = order[:16].reshape(4, 4)                   # the top-left window, row-major inside
    assert (first == np.arange(4)[None, :] + 8 * np.arange(4)[:, None]).all()
    assert window_layout(10, 30, 4)[1] == [(16, 3), (12, 1), (4, 3), (3, 1)]   # 5 x 15 groups


def test_batched_windows_match_mlx_vlms_tower(tmp_path):
    eng = MlxEngine(ModelSpec(path="tiny:qwen2_5_vl", dtype="float32"), EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    tower, ours = eng._model.vision_tower, eng._vision
    rgbs = [np.asarray(screenshot(w, h, seed=w)) for w, h in ((364, 224), (252, 420))]   # partial windows
    grids = [(h // 14, w // 14) for h, w, _ in (r.shape for r in rgbs)]
    got = ours([normalized_patches(mx.array(r), mx.float32) for r in rgbs], grids)
    want = [tower(mx.array(pixel_values_of(r)), mx.array([[1, gh, gw]])) for r, (gh, gw) in zip(rgbs, grids)]
    want = mx.concatenate(want, axis=0)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5)


def test_widened_mlp_computes_the_same_block():
    mx.random.seed(3)
    c, width, n = 32, 76, 50                          # 76: like the released 3420, not a multiple of 16
    r = lambda *s: mx.random.normal(s)
    x, o = r(n, c), r(n, c)
    proj_w, proj_b, norm_w, down_b = r(c, c), r(c), r(c), r(c)
    mlp = (r(width, c), r(width), r(width, c), r(width), r(c, width))
    wide = widened_mlp(*mlp)
    assert wide[0].shape == (128, c) and wide[4].shape == (c, 128) and 128 % MLP_ALIGN == 0
    assert not np.array(wide[0][width:]).any() and not np.array(wide[4][:, width:]).any()
    want = _post_attention_swiglu(x, o, proj_w, proj_b, norm_w, *mlp, down_b)
    got = _post_attention_swiglu(x, o, proj_w, proj_b, norm_w, *wide, down_b)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    assert widened_mlp(*wide)[0] is wide[0]           # already aligned: the same arrays


def test_the_loaded_tower_runs_a_widened_mlp(tmp_path):
    eng = MlxEngine(ModelSpec(path="tiny:qwen2_5_vl", dtype="float32"), EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    for block, (_, post) in zip(eng._model.vision_tower.blocks, eng._vision.blocks):
        assert block.mlp.gate_proj.weight.shape[0] % MLP_ALIGN == 0          # the tiny checkpoint's is 76
        assert block.mlp.down_proj.weight is post[7]                           # widened in place, no copy
