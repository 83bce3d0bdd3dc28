"""The screenshot cache: a second question about the same screenshot runs from the kept state
and gets the answer a fresh forward would give; the store is bounded in bytes (LRU)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from workers.screen_cache import ScreenCache


def _png(w: int, h: int, seed: int, level: int = 6) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=level)
    return buf.getvalue()


# ---- the store -----------------------------------------------------------------------------------


def test_least_recently_used_go_first_and_bytes_stay_within_the_budget():
    c = ScreenCache(100)
    for name in "abc":
        assert c.put(name, name.upper(), 30)
    assert c.get("a") == "A"                 # "a" is now the most recent: "b" goes first
    assert c.put("d", "D", 30)
    assert c.get("b") is None and [c.get(k) for k in "acd"] == ["A", "C", "D"]
    assert c.nbytes == 90 and len(c) == 3
    assert c.put("e", "E", 70)               # needs two evictions: "a" and "c" (d was read last)
    assert c.get("a") is None and c.get("c") is None and c.get("d") == "D" and c.nbytes == 100


def test_an_entry_over_the_whole_budget_is_never_stored():
    c = ScreenCache(100)
    c.put("a", 1, 60)
    assert not c.fits(101) and not c.put("big", 2, 101)
    assert c.get("big") is None and c.get("a") == 1 and c.nbytes == 60


def test_storing_under_a_key_again_replaces_it():
    c = ScreenCache(100)
    c.put("a", 1, 60)
    c.put("a", 2, 50)
    assert c.get("a") == 2 and c.nbytes == 50 and len(c) == 1
    c.clear()
    assert c.get("a") is None and c.nbytes == 0


def test_keys_follow_the_bytes_and_the_context_and_a_zero_budget_turns_it_off():
    c = ScreenCache(1)
    a, b = _png(64, 48, 0), _png(64, 48, 1)
    assert c.key(a, 1, "sys") == c.key(bytes(a), 1, "sys") == c.key(memoryview(a), 1, "sys")
    assert len({c.key(a, 1, "sys"), c.key(b, 1, "sys"), c.key(a, 2, "sys"), c.key(a, 1, "other")}) == 4
    off = ScreenCache(0)
    assert not off.enabled and off.key(a, 1) is None and off.get(None) is None and not off.put("k", 1, 1)


def test_lookup_finds_what_was_stored_and_hashes_a_new_large_screenshot_beside(monkeypatch):
    from workers import screen_cache
    c = ScreenCache(100)
    big, other, small = _png(300, 200, 0, level=0), _png(300, 200, 1, level=0), _png(20, 10, 2)
    assert len(big) >= screen_cache.BESIDE_BYTES > len(small)
    beside = []
    real_submit = screen_cache._hasher.submit
    monkeypatch.setattr(screen_cache._hasher, "submit", lambda *a: beside.append(a) or real_submit(*a))
    entry, key = c.lookup(big, 1, "sys")             # nothing stored: ruled out by its CRC
    assert entry is None and key.result() == c.key(big, 1, "sys") and len(beside) == 1
    c.put(key.result(), "BIG", 10)
    entry, key = c.lookup(big, 1, "sys")             # stored: hashed here, found
    assert entry == "BIG" and key.done() and key.result() == c.key(big, 1, "sys") and len(beside) == 1
    for image, context in ((other, (1, "sys")), (big, (2, "sys")), (big, (1, "other"))):
        entry, key = c.lookup(image, *context)
        assert entry is None and key.result() == c.key(image, *context)
    assert len(beside) == 4
    entry, key = c.lookup(small, 1, "sys")           # small: hashed here even when new
    assert entry is None and key.done() and len(beside) == 4
    c.put(key.result(), "SMALL", 95)                 # evicts BIG: its CRC no longer counts
    assert c.lookup(big, 1, "sys")[0] is None and len(beside) == 5
    assert c.lookup(small, 1, "sys")[0] == "SMALL"
    c.clear()
    assert c.lookup(big, 1, "sys")[0] is None and len(beside) == 6
    off = ScreenCache(0)
    entry, key = off.lookup(big, 1)
    assert entry is None and key.result() is None


def test_lookup_trusts_the_sha256_not_the_crc(monkeypatch):
    from workers import screen_cache
    monkeypatch.setattr(screen_cache, "crc32", lambda data: 7)     # every screenshot's CRC alike
    c = ScreenCache(100)
    a, b = _png(300, 200, 0, level=0), _png(300, 200, 1, level=0)
    assert len(a) == len(b)
    c.put(c.key(a, 1), "A", 10)
    assert c.lookup(b, 1)[0] is None and c.lookup(a, 1)[0] == "A"


def test_a_jobs_cache_scope_is_checked():
    from workers.engine import GroundingRequest, JobError
    ok = GroundingRequest.from_job("j", {"instruction": "click OK", "cache_scope": "k1"}, [b"png"])
    assert ok.cache_scope == "k1"
    assert GroundingRequest.from_job("j", {"instruction": "click OK"}, [b"png"]).cache_scope is None
    for bad in (5, "", "x" * 129):
        with pytest.raises(JobError) as err:
            GroundingRequest.from_job("j", {"instruction": "click OK", "cache_scope": bad}, [b"png"])
        assert err.value.code == "bad_request" and "cache_scope" in err.value.message


def test_a_prefill_job_takes_no_question():
    from workers.engine import GroundingRequest, JobError
    job = GroundingRequest.from_job("j", {"prefill": True, "system": "s", "max_pixels": 9000}, [b"png"])
    assert job.prefill and job.instruction == "" and job.system == "s" and job.max_pixels == 9000
    assert not GroundingRequest.from_job("j", {"instruction": "click OK"}, [b"png"]).prefill
    for params in ({"prefill": True, "instruction": "click OK"}, {"prefill": True, "topk": 3},
                   {"prefill": True, "return_attention": True}, {"prefill": "yes"}):
        with pytest.raises(JobError) as err:
            GroundingRequest.from_job("j", params, [b"png"])
        assert err.value.code == "bad_request" and "prefill" in err.value.message, params


# ---- the engine ----------------------------------------------------------------------------------


def _engine(backbone: str, cache_dir, **spec):
    from common.config import ModelSpec
    from workers.engine import EngineOptions
    from workers.mlx.engine import MlxEngine
    spec.setdefault("max_pixels", 150_000)
    engine = MlxEngine(ModelSpec(path=f"tiny:{backbone}", **spec), EngineOptions("t", str(cache_dir), 1 << 26))
    engine.load()
    return engine


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def engines(request, tmp_path_factory):
    """(engine with the cache, engine without) over one tiny checkpoint."""
    pytest.importorskip("mlx.core")
    cache_dir = tmp_path_factory.mktemp("cache")
    cached, plain = _engine(request.param, cache_dir), _engine(request.param, cache_dir, screenshot_cache_mb=0)
    yield cached, plain
    cached.unload()
    plain.unload()


def _ask(engine, image: bytes, text: str, **kw):
    from workers.engine import GroundingRequest
    job = engine.prepare(GroundingRequest("j", image, text, return_attention=True, **kw))
    (result,) = engine.run([job])
    return job, result


def _same_answer(a, b):
    flat = lambda r: [p[k] for p in r.points for k in ("x", "y", "nx", "ny", "score")]
    assert flat(a) == pytest.approx(flat(b), rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(np.frombuffer(a.attention, "<f4"), np.frombuffer(b.attention, "<f4"),
                               rtol=1e-4, atol=1e-6)
    assert (a.grid, a.image_size, a.resized_size, a.prompt_tokens) == (b.grid, b.image_size, b.resized_size,
                                                                       b.prompt_tokens)


@pytest.mark.mlx
def test_a_second_question_runs_from_the_cache_with_a_fresh_forwards_answer(engines):
    cached, plain = engines
    img = _png(517, 333, 11)
    first_job, first = _ask(cached, img, "click the search box")
    assert first_job.cached is None and first.cached_tokens == 0
    job, second = _ask(cached, img, "open the settings menu, then the second tab")
    assert job.cached is not None and job.image.rgb is None            # nothing decoded
    assert second.cached_tokens == job.image_start + job.image.n_tokens < second.prompt_tokens
    _, want = _ask(plain, img, "open the settings menu, then the second tab")
    assert want.cached_tokens == 0
    _same_answer(second, want)
    _, other = _ask(plain, img, "click the search box")
    assert not np.allclose(np.frombuffer(other.attention, "<f4"), np.frombuffer(second.attention, "<f4"))


@pytest.mark.mlx
def test_a_quantized_model_keeps_screenshots_too(tmp_path):
    cached, plain = (_engine("qwen2_vl", tmp_path, quantize=4, **kw) for kw in ({}, {"screenshot_cache_mb": 0}))
    assert cached._cache.enabled and cached._cache_off == ""
    img = _png(517, 333, 13)
    _ask(cached, img, "click the search box")
    job, second = _ask(cached, img, "open the settings menu, then the second tab")
    assert job.cached is not None and second.cached_tokens > 0
    _same_answer(second, _ask(plain, img, "open the settings menu, then the second tab")[1])
    cached.unload()
    plain.unload()


@pytest.mark.mlx
def test_what_the_kept_state_depends_on_is_part_of_the_key(engines):
    cached, plain = engines
    img = _png(400, 300, 12)
    _ask(cached, img, "click OK")
    for kw in ({"system": "Point at things."}, {"max_pixels": 60_000}, {"min_pixels": 120_000},
               {"cache_scope": "another API key"}):
        _, got = _ask(cached, img, "click Cancel", **kw)
        _, want = _ask(plain, img, "click Cancel", **kw)
        assert got.cached_tokens == 0, kw
        _same_answer(got, want)
    same_pixels = _png(400, 300, 12, level=1)            # other bytes: a new key, decoded again
    assert same_pixels != img
    assert _ask(cached, same_pixels, "click Cancel")[1].cached_tokens == 0
    assert _ask(cached, img, "click Cancel", system="Point at things.")[1].cached_tokens > 0


@pytest.mark.mlx
def test_a_batch_runs_each_new_screenshot_once_and_each_cached_ones_questions_together(engines):
    from workers.engine import GroundingRequest
    cached, plain = engines
    known, new_a, new_b = _png(300, 420, 13), _png(500, 300, 14), _png(260, 260, 15)
    _ask(cached, known, "click OK")
    # questions about one screenshot run as one forward: rows of different lengths, padded
    asks = [(new_a, "click OK"), (known, "open the file menu"), (new_b, "close the dialog"),
            (new_a, "type in the search field at the top of the window, left of the avatar"),
            (known, "x"), (new_a, "go")]
    jobs = [cached.prepare(GroundingRequest(str(i), img, text, return_attention=True))
            for i, (img, text) in enumerate(asks)]
    results = cached.run(jobs)
    assert [r.cached_tokens > 0 for r in results] == [False, True, False, True, True, True]
    assert results[3].timings["forward"] == results[5].timings["forward"]      # one forward for both
    for (img, text), got in zip(asks, results):
        _same_answer(got, _ask(plain, img, text)[1])


@pytest.mark.mlx
def test_questions_padded_to_a_power_of_two_rows_get_their_own_answers(engines):
    """The GPU's way (pad_questions): 3 questions run as 4 rows, the extra one dropped."""
    from workers.engine import GroundingRequest
    cached, plain = engines
    img = _png(350, 280, 16)
    _ask(cached, img, "click OK")
    texts = ["open the file menu", "x", "type in the search field at the top of the window"]
    cached.pad_questions = True
    try:
        jobs = [cached.prepare(GroundingRequest(str(i), img, t, return_attention=True)) for i, t in enumerate(texts)]
        results = cached.run(jobs)
    finally:
        cached.pad_questions = False
    assert len(results) == 3 and all(r.cached_tokens > 0 for r in results)
    for text, got in zip(texts, results):
        _same_answer(got, _ask(plain, img, text)[1])


@pytest.mark.mlx
def test_the_cache_keeps_to_its_budget(tmp_path):
    pytest.importorskip("mlx.core")
    engine = _engine("qwen2_vl", tmp_path, screenshot_cache_mb=1, max_pixels=2_000_000)
    images = [_png(517, 333, 20 + i) for i in range(8)]
    for img in images:
        _ask(engine, img, "click OK")
        assert 0 < engine._cache.nbytes <= 1 << 20
    assert 1 < len(engine._cache) < len(images)
    assert _ask(engine, images[-1], "click Cancel")[1].cached_tokens > 0      # the newest stays
    assert _ask(engine, images[0], "click Cancel")[1].cached_tokens == 0      # the oldest went
    big = _png(1260, 770, 30)          # its state is over 1 MB (~1,460 tokens; the smallest such, for time)
    _ask(engine, big, "click OK")
    assert _ask(engine, big, "click Cancel")[1].cached_tokens == 0
    assert engine._cache.nbytes <= 1 << 20
    engine.unload()


@pytest.mark.mlx
def test_warm_up_leaves_the_cache_empty(tmp_path):
    pytest.importorskip("mlx.core")
    engine = _engine("qwen2_vl", tmp_path, warmup=["320x200"])
    assert engine._cache.enabled and len(engine._cache) == 0
    engine.unload()


def _prefill(engine, image: bytes, **kw):
    from workers.engine import GroundingRequest
    job = engine.prepare(GroundingRequest("p", image, "", prefill=True, **kw))
    (result,) = engine.run([job])
    return job, result


@pytest.mark.mlx
def test_a_prefill_keeps_the_screenshot_for_the_question_that_follows(engines):
    cached, plain = engines
    img = _png(480, 320, 40)
    job, kept = _prefill(cached, img, system="Point at things.")
    assert kept.points == [] and kept.not_kept is None and kept.cached_tokens == 0
    assert kept.kept_tokens == job.prefix == kept.prompt_tokens > kept.image_tokens > 0
    assert kept.grid == job.image.token_grid and kept.image_size == (480, 320)
    again = _prefill(cached, img, system="Point at things.")[1]     # kept already: nothing runs
    assert (again.cached_tokens, again.kept_tokens) == (job.prefix, 0) and "forward" not in again.timings
    _, got = _ask(cached, img, "click the search box", system="Point at things.")
    assert got.cached_tokens == job.prefix and got.kept_tokens == 0
    _same_answer(got, _ask(plain, img, "click the search box", system="Point at things.")[1])
    assert _ask(cached, img, "click the search box")[1].cached_tokens == 0      # another system prompt


@pytest.mark.mlx
def test_a_prefill_and_questions_in_one_batch_share_one_forward(engines):
    """The first question's own forward keeps the screenshot (no forward for the prefill's empty
    question, no second one for that question); the others run from it."""
    from workers.engine import GroundingRequest
    cached, plain = engines
    img = _png(330, 410, 41)
    asks = [("p", ""), ("q", "click OK"), ("r", ""), ("s", "close the dialog")]
    jobs = [cached.prepare(GroundingRequest(name, img, text, prefill=not text, return_attention=bool(text)))
            for name, text in asks]
    kept, answer, again, other = cached.run(jobs)
    prefix = jobs[0].prefix
    assert (answer.cached_tokens, answer.kept_tokens) == (0, prefix) and answer.timings["forward"] > 0
    assert (kept.cached_tokens, again.cached_tokens, other.cached_tokens) == (prefix, prefix, prefix)
    assert kept.points == again.points == [] and kept.not_kept is None
    _same_answer(answer, _ask(plain, img, "click OK")[1])
    _same_answer(other, _ask(plain, img, "close the dialog")[1])


@pytest.mark.mlx
def test_a_prefill_says_why_nothing_is_kept(engines, tmp_path):
    _, plain = engines
    img = _png(300, 200, 42)
    _, off = _prefill(plain, img)
    assert off.kept_tokens == off.cached_tokens == 0 and off.points == []
    assert "screenshot_cache_mb: 0" in off.not_kept and "forward" not in off.timings
    small = _engine("qwen2_vl", tmp_path, screenshot_cache_mb=1, max_pixels=2_000_000)
    img = _png(1260, 770, 43)                   # its state is over 1 MB, as in the budget test
    _, big = _prefill(small, img)
    assert big.kept_tokens == 0 and "larger than the screenshot cache (1 MB" in big.not_kept
    assert "forward" not in big.timings and len(small._cache) == 0
    # beside a question about it: still nothing runs for the prefill, and the question is answered
    from workers.engine import GroundingRequest
    jobs = [small.prepare(GroundingRequest("q", img, "click OK")), small.prepare(GroundingRequest("p", img, "", prefill=True))]
    answer, refused = small.run(jobs)
    assert answer.points and answer.kept_tokens == 0 and "forward" not in refused.timings
    assert "larger than the screenshot cache" in refused.not_kept
    small.unload()
