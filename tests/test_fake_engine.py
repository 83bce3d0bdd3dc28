"""FakeEngine (the simulated engine) against the Engine contract of workers/engine.py."""
from __future__ import annotations

import io
import struct
import threading
import time

import pytest
from PIL import Image

from common.config import ModelSpec
from workers.engine import EngineOptions, GroundingRequest, GroundingResult, JobError, make_engine
from workers.fake_engine import FakeEngine
from tests.rawbroker import png


def engine(max_image_pixels=50_000_000, **fake) -> FakeEngine:
    spec = ModelSpec(path="fake", engine="fake", min_pixels=3136, max_pixels=1_048_576, fake={"load_s": 0, **fake})
    eng = make_engine(spec, EngineOptions(model_id="m", cache_dir="/nonexistent", max_image_pixels=max_image_pixels))
    assert isinstance(eng, FakeEngine)
    return eng


def req(image=None, instruction="click OK", **kw) -> GroundingRequest:
    return GroundingRequest(job_id="j", image=image if image is not None else png(640, 480), instruction=instruction, **kw)


@pytest.mark.parametrize("w,h,max_px,expected", [
    (640, 480, 1_048_576, [644, 476]),          # round to multiples of 28
    (1920, 1080, 1_048_576, [1344, 756]),       # over max: scaled down, floored
    (10, 10, 1_048_576, [56, 56]),              # under min: scaled up, ceiled
])
def test_sizes_are_the_real_engines(w, h, max_px, expected):
    eng = engine()
    eng.load()
    (res,) = eng.run([eng.prepare(req(png(w, h), max_pixels=max_px))])
    assert list(res.resized_size) == expected and res.grid == (expected[1] // 28, expected[0] // 28)


def test_extreme_aspect_is_an_invalid_image():
    with pytest.raises(JobError) as ei:
        engine().prepare(req(png(3000, 10)))
    assert ei.value.code == "invalid_image"


def test_prepare_checks_header_only():
    eng = engine(max_image_pixels=1_000_000)
    prep = eng.prepare(req())
    assert prep.image_size == (640, 480) and prep.resized_size == (644, 476) and prep.grid == (17, 23)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, "JPEG")
    assert eng.prepare(req(buf.getvalue())).image_size == (64, 48)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, "GIF")
    for bad, code in [(b"hello", "invalid_image"), (png()[:24], "invalid_image"), (buf.getvalue(), "invalid_image"),
                      (png(1200, 1000), "payload_too_large")]:
        with pytest.raises(JobError) as ei:
            eng.prepare(req(bad))
        assert ei.value.code == code
    # per-request max_pixels shrinks the grid
    assert eng.prepare(req(max_pixels=100_000)).resized_size[0] * eng.prepare(req(max_pixels=100_000)).resized_size[1] <= 100_000


def test_run_is_deterministic_and_in_bounds():
    eng = engine()
    eng.load()
    a, b, c = (eng.prepare(req(instruction=t, return_attention=True, topk=5)) for t in ("ok", "ok", "cancel"))
    ra, rb, rc = eng.run([a, b, c])
    assert isinstance(ra, GroundingResult) and ra.points == rb.points and ra.points != rc.points
    assert len(ra.points) == 5 and [p["score"] for p in ra.points] == sorted((p["score"] for p in ra.points), reverse=True)
    for pt in ra.points:
        assert 0 <= pt["x"] < 640 and 0 <= pt["y"] < 480 and pt["x"] == pytest.approx(pt["nx"] * 640)
    att = struct.unpack(f"<{17 * 23}f", ra.attention)
    assert sum(att) == pytest.approx(sum(p["score"] for p in ra.points), rel=1e-5)
    result, usage, blobs = ra.to_wire()
    assert result["attention_blob"] == 0 and blobs == [ra.attention] and usage["image_tokens"] == 17 * 23


def test_fault_knobs_and_latency():
    eng = engine(latency_ms=50)
    eng.load()
    ok, failing = eng.prepare(req()), eng.prepare(req(fake={"fail": "overloaded", "sleep_ms": 30}))
    t0 = time.monotonic()
    out = eng.run([ok, failing])
    assert time.monotonic() - t0 >= 0.08
    assert isinstance(out[0], GroundingResult) and isinstance(out[1], JobError) and out[1].code == "overloaded"
    with pytest.raises(RuntimeError, match="disk on fire"):
        engine(fail_load="disk on fire").load()


def test_memory_is_synthetic_weights_plus_running_jobs():
    eng = engine(weights_bytes=1000, job_bytes=10)
    assert eng.memory().active == 0
    assert eng.load().weights_bytes == 1000
    assert eng.memory().active == 1000
    eng.reset_peak()
    batch = [eng.prepare(req(fake={"sleep_ms": 300})) for _ in range(3)]
    t = threading.Thread(target=eng.run, args=(batch,))
    t.start()
    time.sleep(0.1)
    assert eng.memory().active == 1030      # while running
    t.join()
    mem = eng.memory()
    assert mem.active == 1000 and mem.peak == 1030 and mem.weights == 1000
    eng.reset_peak()
    assert eng.memory().peak == 1000
    eng.unload()
    assert eng.memory().active == 0 and eng.memory().weights == 0


def test_header_found_beyond_the_probe_window():
    # a JPEG whose size marker sits after 100 KB of metadata (a big EXIF/ICC block)
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, "JPEG")
    data = buf.getvalue()
    app = b"\xff\xe2" + (65533).to_bytes(2, "big") + b"\0" * 65531   # two max-size APP2 segments
    big = data[:2] + app + app + data[2:]
    assert len(big) > 128 * 1024
    assert engine().prepare(req(big)).image_size == (300, 200)
