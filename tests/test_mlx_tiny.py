"""MlxEngine end to end on tiny generated checkpoints, real MLX on the CPU, and the `ground` CLI."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from common.config import ModelSpec
from workers.engine import EngineOptions, GroundingRequest, GroundingResult, JobError
from workers.families import gui_actor as ga
from workers.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.mlx
mx = pytest.importorskip("mlx.core")


def _png(w: int, h: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _engine(path: str, cache_dir, **spec):
    from workers.mlx.engine import MlxEngine
    spec.setdefault("max_pixels", 150_000)
    engine = MlxEngine(ModelSpec(path=path, **spec), EngineOptions("tiny", str(cache_dir), 4096 * 4096))
    engine.load()
    return engine


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def engine(request, tmp_path_factory):
    eng = _engine(f"tiny:{request.param}", tmp_path_factory.mktemp("cache"))
    yield eng
    eng.unload()


def test_grounding_end_to_end(engine):
    job = engine.prepare(GroundingRequest("j1", _png(517, 333), "click the search box", topk=3,
                                          return_attention=True))
    (res,) = engine.run([job])
    assert isinstance(res, GroundingResult)
    n_h, n_w = res.grid
    assert res.image_size == (517, 333)
    assert res.resized_size == (n_w * 28, n_h * 28)
    assert res.image_tokens == n_h * n_w and res.prompt_tokens == len(job.input_ids)
    assert 1 <= len(res.points) <= 3
    for p in res.points:
        assert 0 <= p["x"] <= 517 and 0 <= p["y"] <= 333
        assert p["x"] == pytest.approx(p["nx"] * 517) and p["y"] == pytest.approx(p["ny"] * 333)
    assert [p["score"] for p in res.points] == sorted((p["score"] for p in res.points), reverse=True)
    attn = np.frombuffer(res.attention, dtype="<f4")
    assert attn.size == n_h * n_w and attn.sum() == pytest.approx(1.0, rel=1e-4)
    # The best point is the centre of the best region of the returned map.
    regions = ga.extract_regions(attn, n_h, n_w)
    assert res.points[0]["nx"] == pytest.approx(regions[0].point[0])
    assert set(res.timings) >= {"preprocess", "forward", "head"}
    result, usage, blobs = res.to_wire()
    assert result["attention_blob"] == 0 and blobs == [res.attention] and usage["total_tokens"] == res.prompt_tokens
    # Deterministic: the same job again gives the same answer (now from the screenshot cache, whose
    # matmuls have other shapes: equal up to float rounding, as tests/test_screen_cache.py checks).
    (again,) = engine.run([engine.prepare(GroundingRequest("j2", _png(517, 333), "click the search box"))])
    assert again.cached_tokens > 0 and again.attention is None
    assert [c for p in again.points for c in (p["x"], p["y"])] == \
        pytest.approx([c for p in res.points for c in (p["x"], p["y"])], rel=1e-9)
    assert [p["score"] for p in again.points] == pytest.approx([p["score"] for p in res.points], rel=1e-5)


def test_positions_match_mlx_vlm(engine):
    job = engine.prepare(GroundingRequest("p", _png(300, 200), "x"))
    lm = engine._model.language_model
    ref, _ = lm.get_rope_index(mx.array(job.input_ids[None]), mx.array([list(job.image.grid_thw)]))
    np.testing.assert_array_equal(np.array(ref)[:, 0], job.position_ids)


def test_prefix_cut_keeps_the_pointer_state(engine):
    """Causal attention: the pointer state is the same with the reference's `<|pointer_end|>)` tail."""
    from workers.mlx.backbone import pointer_states
    job = engine.prepare(GroundingRequest("c", _png(200, 150), "press Enter"))
    encs, dec = engine.forward([job])
    enc = encs[0]
    tail = engine._tok.encode("<|pointer_end|>)", add_special_tokens=False).ids
    ids = np.concatenate([job.input_ids, np.array(tail, np.int32)])
    n_h, n_w = job.image.token_grid
    pos = ga.mrope_positions(len(ids), job.image_start, n_h, n_w)
    full = pointer_states(engine._model, ids, job.image_start, enc, pos, [job.pointer_pos])
    np.testing.assert_allclose(np.array(full), np.array(dec), atol=1e-5)


def test_request_options(engine):
    img = _png(640, 480)
    small = engine.prepare(GroundingRequest("a", img, "x", max_pixels=28 * 28 * 16))
    assert small.image.n_tokens <= 16
    assert engine.run([small])[0].grid == small.image.token_grid
    default = engine.prepare(GroundingRequest("b", img, "x"))
    custom = engine.prepare(GroundingRequest("c", img, "x", system="Be brief."))
    assert len(custom.input_ids) < len(default.input_ids)
    one = engine.run([engine.prepare(GroundingRequest("d", img, "x", topk=1))])[0]
    assert len(one.points) == 1


def test_prompt_ids_per_system_prompt(engine, monkeypatch):
    """The tokens before the image are kept per system prompt: mixing prompts, and past the
    number kept, every job still gets its own prompt's tokens."""
    from workers.mlx import engine as mlx_engine
    monkeypatch.setattr(mlx_engine, "HEAD_IDS_KEPT", 2)
    img = _png(120, 90)
    pad = engine._ids[ga.IMAGE_PAD]

    def expected(system: str, instruction: str, n: int) -> list[int]:
        before, after = ga.prompt_parts(system, instruction)
        encode = lambda text: engine._tok.encode(text, add_special_tokens=False).ids
        return encode(before) + [pad] * n + encode(after)

    for i, system in enumerate(["Be brief.", "Find it.", None, "Be brief.", "Look closely.", None, "Find it."]):
        job = engine.prepare(GroundingRequest(f"s{i}", img, f"click item {i}", system=system))
        want = expected(engine._system if system is None else system, f"click item {i}", job.image.n_tokens)
        assert job.input_ids.tolist() == want
        assert job.image_start == want.index(pad)
    assert len(engine._head_ids) <= 2


def test_job_errors(engine):
    with pytest.raises(JobError) as e:
        engine.prepare(GroundingRequest("e", b"\x89PNG garbage", "x"))
    assert e.value.code == "invalid_image"
    with pytest.raises(JobError) as e:
        engine.prepare(GroundingRequest("e", _png(100, 100), "look at <|image_pad|> here"))
    assert e.value.code == "bad_request"
    with pytest.raises(JobError) as e:
        engine.prepare(GroundingRequest("e", _png(100, 100), "x" * 100_000))
    assert e.value.code == "bad_request" and "max_context_length" in e.value.message


def test_memory_report(engine):
    engine.reset_peak()
    engine.run([engine.prepare(GroundingRequest("m", _png(300, 300), "x"))])
    m = engine.memory()
    assert m.weights > 0 and m.limit > 0 and m.peak >= m.active > 0


def test_batch_runs_each_job(engine):
    jobs = [engine.prepare(GroundingRequest(f"b{i}", _png(120 + 60 * i, 90, i), "x")) for i in range(3)]
    results = engine.run(jobs)
    assert [r.image_size for r in results] == [(120, 90), (180, 90), (240, 90)]


def test_bfloat16_quantized_and_sharded(tmp_path):
    ref_path = write_tiny_checkpoint(tmp_path / "one", "qwen2_vl", seed=4)
    sharded = write_tiny_checkpoint(tmp_path / "three", "qwen2_vl", seed=4, shards=3)
    req = GroundingRequest("s", _png(400, 300), "x", return_attention=True)
    base = _engine(str(ref_path), tmp_path, dtype="float32")
    a = base.run([base.prepare(req)])[0]
    b_eng = _engine(str(sharded), tmp_path, dtype="float32")
    b = b_eng.run([b_eng.prepare(req)])[0]
    assert a.points == b.points and a.attention == b.attention
    bf = _engine(str(ref_path), tmp_path, dtype="bfloat16")
    assert bf._model.language_model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    assert bf._head.projection_enc[0].weight.dtype == mx.float32  # the head stays float32
    c = bf.run([bf.prepare(req)])[0]
    att_a, att_c = (np.frombuffer(r.attention, "<f4") for r in (a, c))
    assert np.abs(att_a - att_c).max() < 0.1 * att_a.max()  # bf16 noise, same map
    q = _engine(str(ref_path), tmp_path, dtype="float32", quantize=8)
    assert q.memory().weights < base.memory().weights
    d = q.run([q.prepare(req)])[0]
    assert np.isfinite(np.frombuffer(d.attention, "<f4")).all() and d.points


def test_a_load_that_converts_the_weights_peaks_near_the_models_size(tmp_path):
    # the tiny checkpoint is stored as float32: as bfloat16 the stored copies (2x the model) must
    # not all be held at once, only the one being converted
    from mlx.utils import tree_flatten

    from workers.mlx.backbone import load_backbone
    from workers.mlx.checkpoint import read_checkpoint
    ckpt = read_checkpoint(write_tiny_checkpoint(tmp_path / "ckpt", "qwen2_vl"))
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model, head = load_backbone(ckpt, mx.bfloat16)
    params = [v for _, v in tree_flatten(model.parameters())]
    kept = sum(v.nbytes for v in params) + sum(v.nbytes for v in head.values())
    assert all(v.dtype == mx.bfloat16 for v in params)
    assert mx.get_peak_memory() - before <= 1.1 * (kept + 2 * max(v.nbytes for v in params))


def test_non_finite_attention_is_a_job_error(tmp_path):
    # weights that overflow (a dtype too narrow for them, say) give a NaN map: an error, no points
    eng = _engine("tiny:qwen2_vl", tmp_path)
    last = eng._head.projection_dec[2]
    last.bias = mx.full(last.bias.shape, float("nan"))
    res = eng.run([eng.prepare(GroundingRequest("n", _png(200, 150), "x"))])[0]
    assert isinstance(res, JobError) and res.code == "internal" and "non-finite" in res.message


def test_unload_frees(tmp_path):
    eng = _engine("tiny:qwen2_vl", tmp_path)
    eng.unload()
    assert eng.memory().weights == 0
    job_err = eng.run([object()])[0]
    assert isinstance(job_err, JobError) and job_err.code == "model_unavailable"


def test_ground_cli(tmp_path):
    img = tmp_path / "shot.png"
    img.write_bytes(_png(350, 250, 5))
    cmd = [sys.executable, "-m", "workers.ground", "--model", "tiny:qwen2_5_vl", "--cache-dir",
           str(tmp_path / "cache"), "--image", str(img), "--instruction", "open the menu",
           "--topk", "2", "--max-pixels", "60000", "--attention"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc) == {"points", "image_size", "resized_size", "grid", "attention"}
    assert doc["image_size"] == [350, 250] and 1 <= len(doc["points"]) <= 2
    n_h, n_w = doc["grid"]
    assert len(doc["attention"]) == n_h * n_w and doc["resized_size"] == [n_w * 28, n_h * 28]
    assert all(0 <= p["x"] <= 350 and 0 <= p["y"] <= 250 for p in doc["points"])
    bad = subprocess.run(cmd[:8] + [str(tmp_path / "missing.png"), "--instruction", "x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.png" in bad.stderr and bad.stdout == ""
    bad = subprocess.run([sys.executable, "-m", "workers.ground", "--model", str(tmp_path / "nope"),
                          "--image", str(img), "--instruction", "x"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_padded_batches_give_the_unpadded_pointer_states(engine):
    """Right padding (to the batch's longest prompt, rounded up to 64) never changes a state."""
    from workers.mlx.backbone import pointer_states
    jobs = [engine.prepare(GroundingRequest(f"b{i}", _png(w, h), text))
            for i, (w, h, text) in enumerate([(200, 150, "ok"), (330, 120, "press the blue Submit button")])]
    encs, dec = engine.forward(jobs)
    for job, enc, row in zip(jobs, encs, np.array(dec)):
        alone = pointer_states(engine._model, job.input_ids, job.image_start, enc, job.position_ids,
                               [job.pointer_pos])
        np.testing.assert_allclose(np.array(alone)[0], row, atol=2e-5)


def test_near_end_is_called_once_per_whole_forward_and_changes_nothing(engine):
    calls = []
    imgs = [_png(200, 140, 40), _png(260, 120, 41)]

    def batch(scope):
        return [engine.prepare(GroundingRequest(f"n{i}", img, "click OK", cache_scope=scope))
                for i, img in enumerate(imgs)]

    told = engine.run(batch("near-end"), near_end=lambda: calls.append(1))
    assert calls == [1]
    plain = engine.run(batch("plain"))              # another scope: the whole forward again
    assert all(a.cached_tokens == 0 and b.cached_tokens == 0 for a, b in zip(told, plain))
    assert [pt for r in told for pt in r.points] == [pt for r in plain for pt in r.points]
    # questions about kept screenshots run a few tokens only: nothing is said before them
    again = engine.run(batch("near-end"), near_end=lambda: calls.append(2))
    assert all(r.cached_tokens > 0 for r in again) and calls == [1]
