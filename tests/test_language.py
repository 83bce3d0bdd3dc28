"""Our language-model forward gives mlx-vlm's pointer states, padded batches included."""
import gc
import weakref

import mlx.core as mx
import mlx.nn as nn
import pytest

from bench.screens import png_bytes
from common.config import ModelSpec
from tests.tiny_engine import engine_keeping_a_screenshot
from workers.engine import EngineOptions, GroundingRequest
from workers.mlx.backbone import pointer_states_batch
from workers.mlx.cuda_prefix_join import reference
from workers.mlx.engine import MlxEngine
from workers.mlx.language import PROBE_REFERENCE_STEP, FastLanguageModel, _reference_forward
from workers.mlx.uncompiled import uncompiled


@pytest.mark.parametrize("backbone", ["qwen2_vl", "qwen2_5_vl"])
def test_same_pointer_states_as_mlx_vlm_for_a_padded_batch(backbone, tmp_path):
    eng = MlxEngine(ModelSpec(path=f"tiny:{backbone}", max_pixels=200_704), EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    assert eng._lm is not None
    jobs = [eng.prepare(GroundingRequest(str(i), png_bytes(w, h, i), text)) for i, (w, h, text) in
            enumerate([(500, 300, "click OK"), (300, 420, "open the settings menu, then the second tab")])]
    assert len(jobs[0].input_ids) != len(jobs[1].input_ids)          # rows of different lengths
    encs, fast = eng.forward(jobs)
    slow = pointer_states_batch(eng._model, [j.input_ids for j in jobs], [j.image_start for j in jobs], encs,
                                [j.position_ids for j in jobs], [j.pointer_pos for j in jobs])
    assert fast.shape == slow.shape == (2, eng._model.language_model.model.norm.weight.shape[0])
    assert mx.allclose(fast, slow, rtol=1e-5, atol=1e-5)
    # what the split's cost rule counts: one layer's projection and MLP weights
    assert eng._lm.layer_params == sum(w.size for w in _layer_weights(eng._model.language_model.model))


def _layer_weights(text) -> list[mx.array]:
    a, m = text.layers[0].self_attn, text.layers[0].mlp
    return [l.weight for l in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_language_models_take_our_forward(bits, tmp_path):
    eng = MlxEngine(ModelSpec(path="tiny:qwen2_vl", quantize=bits, max_pixels=200_704),
                    EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    text = eng._model.language_model.model
    assert isinstance(text.layers[0].self_attn.q_proj, nn.QuantizedLinear) and eng._lm is not None
    jobs = [eng.prepare(GroundingRequest(str(i), png_bytes(w, h, i), t)) for i, (w, h, t) in
            enumerate([(500, 300, "click OK"), (300, 420, "open the settings menu, then the second tab")])]
    eng._lm.dequantize_rows = 0                   # MLX's quantized matmuls, as mlx-vlm's forward runs them
    encs, fast = eng.forward(jobs)
    slow = pointer_states_batch(eng._model, [j.input_ids for j in jobs], [j.image_start for j in jobs], encs,
                                [j.position_ids for j in jobs], [j.pointer_pos for j in jobs])
    assert mx.allclose(fast, slow, rtol=1e-4, atol=1e-4)
    # dequantizing before the matmul (what CUDA does for long prompts) is the same function
    eng._lm.dequantize_rows = 1
    assert mx.allclose(eng.forward(jobs)[1], slow, rtol=1e-4, atol=1e-4)
    # fusing kept one copy of the packed weights: the modules' own are views into the fused ones
    (_, (qkv, fmt), _), _ = eng._lm.layers[0]
    assert fmt[:2] == (64, bits) and qkv[0].shape[0] == sum(
        text.layers[0].self_attn[p].weight.shape[0] for p in ("q_proj", "k_proj", "v_proj"))
    # the split's cost rule counts weights, not the packed words that hold them
    assert eng._lm.layer_params == sum(w.size * 32 // bits for w in _layer_weights(text))


def test_the_load_probe_catches_a_forward_that_computes_something_else(tmp_path):
    eng = MlxEngine(ModelSpec(path="tiny:qwen2_vl"), EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    text = eng._model.language_model.model
    fast = FastLanguageModel(text)
    assert fast.agrees_with(text)
    (norm_w, ((qkv_w,), fmt), qkv_b), rest = fast.layers[0]
    half = qkv_w.shape[0] // 2
    fast.layers[0] = ((norm_w, ((mx.concatenate([qkv_w[half:], qkv_w[:half]]),), fmt), qkv_b), rest)
    assert not fast.agrees_with(text)


def test_the_load_probe_checks_the_dequantizing_path_of_packed_weights(tmp_path):
    eng = MlxEngine(ModelSpec(path="tiny:qwen2_vl", quantize=8), EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    text = eng._model.language_model.model
    fast = FastLanguageModel(text, dequantize_rows=512)
    assert fast.packed and fast.agrees_with(text) and fast.dequantize_rows == 512
    # a dequantizing path gone wrong, which the probe's 140 rows would never take at 512: caught.
    # (Uncompiled, so that the forward looks mx.dequantize up at each call.)
    real = mx.dequantize
    with uncompiled():
        mx.dequantize = lambda *a, **kw: real(*a, **kw) * 3
        try:
            assert not fast.agrees_with(text)
        finally:
            mx.dequantize = real
    assert fast.dequantize_rows == 512 and fast.agrees_with(text)


@pytest.mark.parametrize("backbone,bits", [("qwen2_vl", None), ("qwen2_vl", 4), ("qwen2_5_vl", 4)])
def test_the_probe_reference_run_a_few_tokens_at_a_time_is_mlx_vlms_forward(backbone, bits, tmp_path):
    # on CUDA a packed model's probe reference runs 3 tokens per call, so that MLX compiles no
    # quantized-matmul kernel at load: the same function as the whole call, and still a probe
    eng = MlxEngine(ModelSpec(path=f"tiny:{backbone}", quantize=bits), EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    text = eng._model.language_model.model
    h = mx.random.normal((2, 70, text.norm.weight.shape[0]), key=mx.random.key(5)) * 0.5
    pos = mx.broadcast_to((mx.arange(70) * 2)[None, None], (3, 2, 70)).astype(mx.int32)
    whole = _reference_forward(text, h, pos, 0)
    assert mx.allclose(_reference_forward(text, h, pos, PROBE_REFERENCE_STEP), whole, rtol=1e-4, atol=1e-4)
    fast = FastLanguageModel(text, dequantize_rows=1)
    assert fast.agrees_with(text, reference_step=PROBE_REFERENCE_STEP)
    (norm_w, ((qkv_w, *packed), fmt), qkv_b), rest = fast.layers[0]
    half = qkv_w.shape[0] // 2
    swapped = [mx.concatenate([a[half:], a[:half]]) for a in (qkv_w, *packed)]
    fast.layers[0] = ((norm_w, (tuple(swapped), fmt), qkv_b), rest)
    assert not fast.agrees_with(text, reference_step=PROBE_REFERENCE_STEP)


def test_a_cached_questions_tail_is_traced_once_per_shape(tmp_path):
    # pointer_state_after runs a compiled graph: the Python that builds it (here the prefix join,
    # swapped for a stand-in that counts) runs when a shape is new, not for every question
    eng, img = engine_keeping_a_screenshot(tmp_path)
    lm = eng._lm
    entry = eng.prepare(GroundingRequest("1", img, "x")).cached
    traced = []

    def join(qkv, cos, sin, pk, pv):
        traced.append(qkv.shape)
        return reference(qkv, cos, sin, pk, pv, lm.heads, lm.kv_heads)

    def tail(n: int, seed: int):
        c, dtype = lm.lm.norm.weight.shape[0], lm.lm.norm.weight.dtype
        h = (mx.random.normal((1, n, c), key=mx.random.key(seed)) * 0.5).astype(dtype)
        pos = mx.broadcast_to(mx.arange(entry.prefix, entry.prefix + n)[None, None], (3, 1, n)).astype(mx.int32)
        return h, pos

    lm.prefix_join = None
    h, pos = tail(32, 0)
    want = lm.pointer_state_after(entry.kept, h, pos, [20])
    lm.prefix_join = join                                  # a new join: traced again, with it
    assert mx.array_equal(lm.pointer_state_after(entry.kept, h, pos, [20]), want)
    assert len(traced) == len(lm.layers)
    h2, pos2 = tail(32, 1)
    other = lm.pointer_state_after(entry.kept, h2, pos2, [31])   # same shapes: the trace, other values
    assert len(traced) == len(lm.layers)
    lm.prefix_join = None
    assert mx.array_equal(other, lm.pointer_state_after(entry.kept, h2, pos2, [31]))
    lm.prefix_join = join
    lm.pointer_state_after(entry.kept, *tail(64, 2), [40])       # a longer tail: traced again
    assert len(traced) == 2 * len(lm.layers)
    lm.dequantize_rows += 1                                        # read by the trace: traced again
    lm.pointer_state_after(entry.kept, *tail(64, 2), [40])
    assert len(traced) == 3 * len(lm.layers)


def test_an_unloaded_models_language_model_is_freed_without_the_garbage_collector(tmp_path):
    # the compiled tail must not tie the model in a reference cycle: an unload frees the weights
    # at once, not when the collector next runs
    eng, img = engine_keeping_a_screenshot(tmp_path)
    eng.run([eng.prepare(GroundingRequest("1", img, "open the menu"))])        # a tail, traced
    assert eng._lm._tail_fn is not None
    alive = weakref.ref(eng._lm)
    gc.collect()
    gc.disable()
    try:
        eng.unload()
        assert alive() is None
    finally:
        gc.enable()
