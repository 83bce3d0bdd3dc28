"""Cutting the forward into chunks (workers/mlx/run_ahead.py) changes when it runs, not what it
computes."""
import mlx.core as mx
import pytest

from bench.screens import png_bytes
from common.config import ModelSpec
from workers.engine import EngineOptions, GroundingRequest
from workers.mlx.engine import MlxEngine
from workers.mlx.run_ahead import RunAhead


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = MlxEngine(ModelSpec(path="tiny:qwen2_vl", max_pixels=200_704),
                    EngineOptions("t", str(tmp_path_factory.mktemp("ra")), 1 << 30))
    eng.load()
    assert eng._lm is not None and len(eng._lm.layers) >= 2 and len(eng._vision.blocks) >= 2
    return eng


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_forward_cut_after_every_layer_is_bit_identical(engine, depth):
    jobs = [engine.prepare(GroundingRequest(str(i), png_bytes(w, h, i), text)) for i, (w, h, text) in
            enumerate([(500, 300, "click OK"), (300, 420, "open the settings menu")])]
    saved = engine._vision.eval_every, engine._lm.eval_every, engine.run_ahead
    try:
        engine._vision.eval_every = engine._lm.eval_every = 0
        whole_encs, whole_dec = engine.forward(jobs)
        engine._vision.eval_every = engine._lm.eval_every = 1
        engine.run_ahead = depth
        encs, dec = engine.forward(jobs)
    finally:
        engine._vision.eval_every, engine._lm.eval_every, engine.run_ahead = saved
    assert all(mx.array_equal(a, b).item() for a, b in zip(encs, whole_encs))
    assert mx.array_equal(dec, whole_dec).item()


def test_run_ahead_waits_for_earlier_chunks_and_refuses_depth_zero():
    pace = RunAhead(2)
    chunks = [mx.full((64,), float(i)) * 2 for i in range(4)]
    for c in chunks:
        pace(c)
    assert len(pace._pending) == 1 and pace._pending[0] is chunks[-1]
    assert [c[0].item() for c in chunks] == [0.0, 2.0, 4.0, 6.0]
    with pytest.raises(ValueError):
        RunAhead(0)
