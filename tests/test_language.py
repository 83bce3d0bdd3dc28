"""Our language-model forward gives mlx-vlm's pointer states, padded batches included."""
import mlx.core as mx
import mlx.nn as nn
import pytest

from bench.screens import png_bytes
from common.config import ModelSpec
from workers.engine import EngineOptions, GroundingRequest
from workers.mlx.backbone import pointer_states_batch
from workers.mlx.engine import MlxEngine
from workers.mlx.language import FastLanguageModel


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


def test_quantized_language_models_keep_mlx_vlms_forward(tmp_path):
    eng = MlxEngine(ModelSpec(path="tiny:qwen2_vl", quantize=8), EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    assert isinstance(eng._model.language_model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert not FastLanguageModel.supports(eng._model.language_model.model) and eng._lm is None


def test_the_load_probe_catches_a_forward_that_computes_something_else(tmp_path):
    eng = MlxEngine(ModelSpec(path="tiny:qwen2_vl"), EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    text = eng._model.language_model.model
    fast = FastLanguageModel(text)
    assert fast.agrees_with(text)
    (norm_w, qkv_w, qkv_b), rest = fast.layers[0]
    fast.layers[0] = ((norm_w, mx.concatenate([qkv_w[qkv_w.shape[0] // 2:], qkv_w[:qkv_w.shape[0] // 2]]), qkv_b), rest)
    assert not fast.agrees_with(text)
