"""With the resize left to the device, the engine's answer is the one it gives resizing on the CPU;
and the warm-up at load.

The engine turns device resizing on only on a GPU; here, on MLX's CPU backend, the test turns it
on by hand to run the same code path against the tiny checkpoint.
"""
import time

import numpy as np

from bench.screens import png_bytes
from common.config import ModelSpec
from workers import parallel_resize
from workers.engine import EngineOptions, GroundingRequest
from workers.mlx.engine import MlxEngine


def test_device_resize_gives_the_same_grounding(tmp_path):
    # no screenshot cache: the second job must run the whole forward on the device-resized pixels
    eng = MlxEngine(ModelSpec(path="tiny:qwen2_vl", max_pixels=200_704, screenshot_cache_mb=0),
                    EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    req = GroundingRequest("a", png_bytes(900, 600, seed=3), "click Button 4")
    cpu = eng.prepare(req)
    assert cpu.image.resize_order is None
    eng._device_resize = True
    deadline = time.monotonic() + 30
    while parallel_resize.order_for((900, 600), cpu.image.resized) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    dev = eng.prepare(req)
    assert dev.image.resize_order in ("hv", "vh") and dev.image.rgb.shape == (600, 900, 3)
    assert np.array_equal(np.array(eng._resized(dev.image)), cpu.image.rgb)
    (a,), (b,) = eng.run([cpu]), eng.run([dev])
    assert a.points == b.points and a.resized_size == b.resized_size


def test_warm_up_runs_each_configured_size_at_load_and_learns_its_resize(tmp_path, caplog):
    spec = ModelSpec(path="tiny:qwen2_vl", max_pixels=200_704, warmup=["700x500"])
    with caplog.at_level("INFO", logger="workers.mlx.engine"):
        MlxEngine(spec, EngineOptions("t", str(tmp_path), 1 << 30)).load()
    assert any("warm-up at 700x500 took" in r.getMessage() for r in caplog.records)
    assert parallel_resize.learned_order((700, 500), (504, 364)) in ("hv", "vh")


def test_a_warm_up_that_cannot_run_does_not_fail_the_load(tmp_path, caplog):
    spec = ModelSpec(path="tiny:qwen2_vl", max_pixels=200_704, max_context_length=64, warmup=["700x500"])
    with caplog.at_level("INFO", logger="workers.mlx.engine"):
        eng = MlxEngine(spec, EngineOptions("t", str(tmp_path), 1 << 30))
        eng.load()
    assert any("warm-up at 700x500 skipped" in r.getMessage() for r in caplog.records)
    assert eng.memory().weights > 0
