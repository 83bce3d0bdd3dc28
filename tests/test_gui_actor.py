"""GUI-Actor family: head math (MLX) and region post-processing against an independent NumPy
implementation of the formulas in docs/gui-actor.md (sections 7.4 and 8), prompts, positions."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tests.native import skip_without_c_compiler
from workers import families
from workers.families import gui_actor as ga


# ---- independent reference implementations ------------------------------------------------------

def ref_head(t: dict, enc: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """VisionHead_MultiPatch in float64 NumPy, one attention head at a time."""
    enc, dec = enc.astype(np.float64), dec.astype(np.float64)
    D = enc.shape[1]
    hd = D // 8
    W, b = t["self_attention.in_proj_weight"], t["self_attention.in_proj_bias"]
    q, k, v = (enc @ W[i * D:(i + 1) * D].T + b[i * D:(i + 1) * D] for i in range(3))
    heads = []
    for j in range(8):
        sl = slice(j * hd, (j + 1) * hd)
        a = q[:, sl] @ k[:, sl].T / math.sqrt(hd)
        a = np.exp(a - a.max(1, keepdims=True))
        heads.append((a / a.sum(1, keepdims=True)) @ v[:, sl])
    attn = np.concatenate(heads, 1) @ t["self_attention.out_proj.weight"].T + t["self_attention.out_proj.bias"]
    x = enc + attn
    x = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    x = x * t["layer_norm.weight"] + t["layer_norm.bias"]
    erf = np.vectorize(math.erf)

    def mlp(p, y):
        y = y @ t[f"{p}.0.weight"].T + t[f"{p}.0.bias"]
        y = 0.5 * y * (1 + erf(y / math.sqrt(2)))
        return y @ t[f"{p}.2.weight"].T + t[f"{p}.2.bias"]

    logits = mlp("projection_dec", dec) @ mlp("projection_enc", x).T / math.sqrt(D)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ref_regions(s: np.ndarray, n_h: int, n_w: int):
    """Union-find labelling of 4-connected patches with s > 0.3*max; regions ordered by their
    smallest index (= discovery order), then stably by mean score. -> [(score, (x, y), set)]"""
    s = s.astype(np.float32)
    sel = [i for i in range(s.size) if s[i] > np.float32(0.3 * float(s.max()))]
    parent = {i: i for i in sel}

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i
    for i in sel:
        y, x = divmod(i, n_w)
        for j in ([i + 1] if x + 1 < n_w else []) + ([i + n_w] if y + 1 < n_h else []):
            if j in parent:
                parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in sel:
        groups.setdefault(find(i), []).append(i)
    out = []
    for members in sorted(groups.values(), key=min):
        w = np.array([float(s[i]) for i in members])
        cx = np.array([(i % n_w + 0.5) / n_w for i in members])
        cy = np.array([(i // n_w + 0.5) / n_h for i in members])
        out.append((w.mean(), ((cx * w).sum() / w.sum(), (cy * w).sum() / w.sum()), set(members)))
    return sorted(out, key=lambda r: -r[0])


def assert_same_regions(got, want):
    assert len(got) == len(want)
    for g, (score, point, members) in zip(got, want):
        assert set(g.indices) == members
        assert g.score == pytest.approx(score, rel=1e-12)
        assert g.point == pytest.approx(point, rel=1e-12)


# ---- post-processing ----------------------------------------------------------------------------

built = pytest.mark.skipif(ga._regions is None, reason="the C region search was not built")


def test_the_install_built_the_region_search_wherever_there_is_a_compiler():
    skip_without_c_compiler()
    assert ga._regions is not None, "rebuild it: make install (or pip install -e .)"


@pytest.fixture(params=[pytest.param("c", marks=built), "numpy"])
def extract(request, monkeypatch):
    """extract_regions in C (workers/regions.c, where the install built it) and in NumPy (its fallback)."""
    if request.param == "numpy":
        monkeypatch.setattr(ga, "_regions", None)
    return ga.extract_regions


def test_hand_computed_grid(extract):
    # 3x4 grid, max 0.5 -> threshold 0.15 (strict). Regions: {1,2,6} and {8} and {11}.
    s = np.array([0.0, 0.5, 0.2, 0.0,
                  0.0, 0.15, 0.3, 0.0,
                  0.16, 0.0, 0.0, 0.16], dtype=np.float32)
    regs = extract(s, 3, 4)
    assert [r.indices for r in regs] == [(1, 2, 6), (8,), (11,)]  # tie 0.16/0.16 keeps index order
    w = np.float32([0.5, 0.2, 0.3]).astype(float)
    assert regs[0].score == pytest.approx(w.mean())
    assert regs[0].point == pytest.approx(((1.5 * w[0] + 2.5 * w[1] + 2.5 * w[2]) / w.sum() / 4,
                                           (0.5 * w[0] + 0.5 * w[1] + 1.5 * w[2]) / w.sum() / 3))
    assert regs[1].point == pytest.approx((0.5 / 4, 2.5 / 3))


def test_single_patch_map(extract):
    regs = extract(np.array([1.0], np.float32), 1, 1)
    assert len(regs) == 1 and regs[0].point == (0.5, 0.5) and regs[0].score == 1.0
    pts = ga.to_points(regs, 3, (1920, 1080))
    assert pts == [{"x": 960.0, "y": 540.0, "nx": 0.5, "ny": 0.5, "score": 1.0}]


def test_uniform_map_is_one_region_at_the_centre(extract):
    n_h, n_w = 6, 9
    regs = extract(np.full(n_h * n_w, 1 / 54, np.float32), n_h, n_w)
    assert len(regs) == 1 and regs[0].point == pytest.approx((0.5, 0.5))


def test_no_wraparound_and_no_diagonals(extract):
    n_h, n_w = 3, 3
    s = np.zeros(9, np.float32)
    s[[2, 3]] = 1.0            # end of row 0 and start of row 1: adjacent in memory only
    s[8] = 1.0                 # (2, 2): an isolated corner
    regs = extract(s, n_h, n_w)
    assert sorted(r.indices for r in regs) == [(2,), (3,), (8,)]
    s = np.zeros(9, np.float32)
    s[[0, 4]] = 1.0            # diagonal neighbours are separate regions
    assert len(extract(s, 3, 3)) == 2


def test_threshold_is_strict(extract):
    s = np.array([1.0, 0.3, 0.30001, 0.0], np.float32)
    regs = extract(s, 1, 4)
    assert [r.indices for r in regs] == [(0,), (2,)]


def test_ties_keep_discovery_order(extract):
    s = np.zeros(25, np.float32)
    for i in (24, 12, 0, 4, 20):    # five isolated equal peaks
        s[i] = 0.2
    regs = extract(s, 5, 5)
    assert [r.indices[0] for r in regs] == [0, 4, 12, 20, 24]


@pytest.mark.parametrize("seed", range(40))
def test_random_maps_match_reference(seed, extract):
    rng = np.random.default_rng(seed)
    n_h, n_w = int(rng.integers(1, 14)), int(rng.integers(1, 14))
    logits = rng.standard_normal(n_h * n_w) * rng.choice([0.5, 2.0, 6.0])
    s = np.exp(logits - logits.max()).astype(np.float32)
    s /= s.sum()
    if seed % 5 == 0:           # quantised scores: many exact ties
        s = (np.round(s * 20) / 20).astype(np.float32) + np.float32(1e-3)
    assert_same_regions(extract(s, n_h, n_w), ref_regions(s, n_h, n_w))


def _snake(n_h, n_w):
    """One region winding through every other row: the longest path the labelling must follow."""
    g = np.zeros((n_h, n_w), np.float32)
    g[::2] = 1
    g[1::4, -1] = 1
    g[3::4, 0] = 1
    return g


@pytest.mark.parametrize("kind", ["flat", "snake", "checkerboard", "random", "blobs"])
def test_1080p_grid_shapes_match_reference(kind, extract):
    # a 1080p screenshot's 39x69 tokens, in shapes that stress the run labelling differently
    n_h, n_w = 39, 69
    rng = np.random.default_rng(7)
    s = {"flat": np.ones((n_h, n_w), np.float32),
         "snake": _snake(n_h, n_w) + 1e-3 * rng.random((n_h, n_w)),
         "checkerboard": ((np.arange(n_h)[:, None] + np.arange(n_w)) % 2) + 0.01,
         "random": rng.random((n_h, n_w)),
         "blobs": (rng.random((n_h, n_w)) > 0.45) + 0.1 * rng.random((n_h, n_w))}[kind]
    s = np.asarray(s, np.float32).reshape(-1)
    regs = extract(s, n_h, n_w)
    assert_same_regions(regs, ref_regions(s, n_h, n_w))
    if kind in ("flat", "snake"):
        assert len(regs) == 1
    if kind == "checkerboard":
        assert len(regs) == (n_h * n_w) // 2


def test_first_keeps_the_best_regions(extract):
    rng = np.random.default_rng(3)
    s = rng.random(39 * 69).astype(np.float32)
    every = extract(s, 39, 69)
    assert len(every) > 5
    assert extract(s, 39, 69, first=3) == every[:3]
    assert extract(s, 39, 69, first=len(every) + 4) == every


def test_to_points_back_projection_and_topk(extract):
    s = np.zeros(12, np.float32)
    s[[0, 5, 11]] = [0.9, 0.5, 0.7]
    regs = extract(s, 3, 4)
    pts = ga.to_points(regs, 2, (1000, 600))
    assert len(pts) == 2
    assert pts[0] == pytest.approx({"x": 125.0, "y": 100.0, "nx": 0.125, "ny": 1 / 6, "score": float(np.float32(0.9))})
    assert pts[1]["x"] == pytest.approx(875.0) and pts[1]["y"] == pytest.approx(500.0)
    assert len(ga.to_points(regs, 10, (10, 10))) == 3


@built
@pytest.mark.parametrize("seed", range(12))
def test_c_and_numpy_agree_to_the_last_bit(seed):
    # the same Region values (floats compared exactly), on maps of screenshot-sized grids, from
    # nearly flat to peaked, with quantised scores for exact ties between regions' means
    rng = np.random.default_rng(100 + seed)
    n_h, n_w = [(39, 69), (26, 46), (51, 91), (1, 200), (200, 1), (17, 23)][seed % 6]
    logits = rng.standard_normal(n_h * n_w) * [0.2, 1.0, 3.0, 8.0][seed % 4]
    s = np.exp(logits - logits.max()).astype(np.float32)
    s /= s.sum()
    if seed % 3 == 0:
        s = (np.round(s / s.max() * 8) / 8).astype(np.float32) + np.float32(1e-4)
    for first in (None, 1, 3, 1000):
        c = ga.extract_regions(s, n_h, n_w, first=first)
        assert c == ga.regions_numpy(s, n_h, n_w, first=first)
        assert all(type(r.score) is float and type(r.point[0]) is float for r in c)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_raise(extract, bad):
    s = np.full(12, 0.1, np.float32)
    s[7] = bad
    with pytest.raises(ga.NonFiniteScores):
        extract(s, 3, 4)


def test_grid_size_must_match(extract):
    with pytest.raises(ValueError, match="grid is 3x5"):
        extract(np.ones(12, np.float32), 3, 5)


def test_scores_in_other_dtypes_and_layouts(extract):
    # the engine hands float32 from MLX; anything array-like is taken as float32, row-major
    s = np.zeros((3, 4), np.float64)
    s[0, 1], s[2, 3] = 0.9, 0.5
    regs = extract(s.T.copy().T, 3, 4)         # a Fortran-ordered float64 view of the same grid
    assert [r.indices for r in regs] == [(1,), (11,)]
    assert [r.indices for r in extract(s.tolist(), 3, 4)] == [(1,), (11,)]


# ---- prompt, positions, dispatch ----------------------------------------------------------------

def test_prompt_layout():
    before, after = ga.prompt_parts("SYS", "click OK")
    assert before == "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<|vision_start|>"
    assert after == ("<|vision_end|>click OK<|im_end|>\n<|im_start|>assistant<|recipient|>os\n"
                     "pyautogui.click(<|pointer_start|><|pointer_pad|>")
    assert ga.full_prompt("S", "i", 2, cut=False).endswith("<|pointer_pad|><|pointer_end|>)")
    assert ga.full_prompt("S", "i", 3).count("<|image_pad|>") == 3
    assert ga.SYSTEM_PROMPTS["qwen2_vl"].startswith("You are a GUI agent. You are given a task")
    assert ga.SYSTEM_PROMPTS["qwen2_5_vl"].endswith("pyautogui.click(<your_special_token_here>).")


def test_mrope_positions():
    pos = ga.mrope_positions(10, 3, 2, 2)   # 3 text, 4 image (2x2), 3 text
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    assert pos[0, 3:7].tolist() == [3, 3, 3, 3]
    assert pos[1, 3:7].tolist() == [3, 3, 4, 4]
    assert pos[2, 3:7].tolist() == [3, 4, 3, 4]
    assert pos[:, 7:].tolist() == [[5, 6, 7]] * 3


def test_family_dispatch():
    assert families.family_for("qwen2_vl") is ga
    assert families.family_for("qwen2_5_vl") is ga
    with pytest.raises(ValueError, match="llama"):
        families.family_for("llama")


def test_check_config_names_the_mismatch():
    ids = {tok: i for i, tok in enumerate(ga.CONFIG_TOKEN_KEYS.values())}
    cfg = {key: ids[tok] for key, tok in ga.CONFIG_TOKEN_KEYS.items()}
    ga.check_config(cfg, ids)
    with pytest.raises(ValueError, match="pointer_pad_token_id"):
        ga.check_config({**cfg, "pointer_pad_token_id": 999}, ids)
    with pytest.raises(ValueError, match="pointer_start_token_id is missing"):
        ga.check_config({k: v for k, v in cfg.items() if k != "pointer_start_token_id"}, ids)


# ---- head (MLX) ---------------------------------------------------------------------------------

def _head_tensors(D: int, rng) -> dict:
    t = {"self_attention.in_proj_weight": rng.standard_normal((3 * D, D)) / math.sqrt(D),
         "self_attention.in_proj_bias": 0.1 * rng.standard_normal(3 * D),
         "self_attention.out_proj.weight": rng.standard_normal((D, D)) / math.sqrt(D),
         "self_attention.out_proj.bias": 0.1 * rng.standard_normal(D),
         "layer_norm.weight": 1 + 0.1 * rng.standard_normal(D), "layer_norm.bias": 0.1 * rng.standard_normal(D)}
    for p in ("projection_enc", "projection_dec"):
        for j, gain in ((0, 1.0), (2, 3.0)):
            t[f"{p}.{j}.weight"] = gain * rng.standard_normal((D, D)) / math.sqrt(D)
            t[f"{p}.{j}.bias"] = 0.1 * rng.standard_normal(D)
    return {k: v.astype(np.float32) for k, v in t.items()}


@pytest.mark.mlx
@pytest.mark.parametrize("n_img,n_ptr", [(1, 1), (37, 1), (50, 2), (2049, 1), (2052, 1)])  # 2049: keys padded
def test_head_matches_numpy(n_img, n_ptr):
    mx = pytest.importorskip("mlx.core")
    from workers.mlx.head import head_from_tensors
    rng = np.random.default_rng(n_img)
    D = 64
    t = _head_tensors(D, rng)
    head = head_from_tensors({ga.HEAD_PREFIX + k: mx.array(v) for k, v in t.items()}, D)
    enc = rng.standard_normal((n_img, D)).astype(np.float32)
    dec = rng.standard_normal((n_ptr, D)).astype(np.float32)
    got = np.array(head(mx.array(enc), mx.array(dec)))
    want = ref_head(t, enc, dec)
    assert got.shape == (n_ptr, n_img) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)
    if n_img > 1:
        assert got.max() > 2 / n_img  # the gain makes a peaked map: the comparison is not trivial


@pytest.mark.mlx
@pytest.mark.parametrize("n", [1, 37, 63, 130])
def test_head_padded_keys_score_masked_and_leave_real_scores(n):
    """Keys padded to KEY_ALIGN (where n % 4 != 0 and n >= PAD_FROM): real keys' scores unchanged,
    padded ones masked."""
    mx = pytest.importorskip("mlx.core")
    from workers.mlx import head as head_mod
    rng = np.random.default_rng(n)
    q, k, v = (mx.array(rng.standard_normal((3, n, 24)).astype(np.float32)) for _ in range(3))
    q2, k2, v2 = head_mod._aligned_keys(q, k, v)
    m = -(-n // head_mod.KEY_ALIGN) * head_mod.KEY_ALIGN
    assert k2.shape == (3, m, 32) and v2.shape == (3, m, 24) and q2.shape == (3, n, 32)
    scores = np.array(q2 @ k2.transpose(0, 2, 1))
    np.testing.assert_allclose(scores[:, :, :n], np.array(q @ k.transpose(0, 2, 1)), rtol=1e-5, atol=1e-5)
    assert (scores[:, :, n:] <= head_mod.MASKED_SCORE / 2).all()
    assert not np.array(v2[:, n:]).any()
    w = np.array(mx.softmax(q2 @ k2.transpose(0, 2, 1), axis=-1))
    assert not w[:, :, n:].any()


@pytest.mark.mlx
def test_head_rejects_bad_tensors():
    mx = pytest.importorskip("mlx.core")
    from workers.mlx.head import head_from_tensors
    t = {ga.HEAD_PREFIX + k: mx.array(v) for k, v in _head_tensors(16, np.random.default_rng(0)).items()}
    with pytest.raises(ValueError, match="hidden_size 32"):
        head_from_tensors(t, 32)
    bad = dict(t)
    bad[ga.HEAD_PREFIX + "projection_enc.2.bias"] = mx.zeros((15,))
    with pytest.raises(ValueError, match="projection_enc.2.bias has shape"):
        head_from_tensors(bad, 16)
    missing = dict(t)
    del missing[ga.HEAD_PREFIX + "layer_norm.weight"]
    with pytest.raises(ValueError, match="layer_norm.weight"):
        head_from_tensors(missing, 16)
