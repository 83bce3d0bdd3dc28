"""Parity with transformers' own Qwen2-VL / Qwen2.5-VL (PyTorch CPU, float32) on the same tiny
GUI-Actor checkpoint: tokenizer and prompt, image preprocessing, vision-merger output (encoder
vectors), final-norm hidden state at <|pointer_pad|> (decoder vector), and the head against
torch.nn.MultiheadAttention. Tolerance 1e-4 (docs/gui-actor.md section 11)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.mlx

from PIL import Image  # noqa: E402

from common.config import ModelSpec  # noqa: E402
from workers import images
from workers.engine import EngineOptions, GroundingRequest  # noqa: E402
from workers.families import gui_actor  # noqa: E402
from workers.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402

TOL = 1e-4
# The authors' chat template (src/gui_actor/constants.py): Qwen2-VL's without the default system.
GUI_ACTOR_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TORCH_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def pair(request, tmp_path_factory):
    """(backbone, checkpoint path, loaded MlxEngine, transformers model) on one tiny checkpoint."""
    from workers.mlx.engine import MlxEngine
    backbone = request.param
    path = write_tiny_checkpoint(tmp_path_factory.mktemp(backbone) / "ckpt", backbone, seed=3)
    engine = MlxEngine(ModelSpec(path=str(path), dtype="float32", max_pixels=120_000),
                       EngineOptions("parity", str(path.parent), 8192 * 8192))
    engine.load()
    cls = getattr(transformers, TORCH_CLASSES[backbone])
    model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    # Only the pointer head is foreign to transformers: every backbone tensor must have loaded.
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.startswith(gui_actor.HEAD_PREFIX) for k in info["unexpected_keys"])
    assert len(info["unexpected_keys"]) == 14
    return backbone, path, engine, model.eval()


def _png(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.NEAREST)  # blocky: real structure
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_tokenizer_and_prompt_match_transformers(pair):
    backbone, path, engine, _ = pair
    tok = transformers.AutoTokenizer.from_pretrained(path)
    job = engine.prepare(GroundingRequest("t", _png(300, 200, 1), "open the Settings menu"))
    n = job.image.n_tokens
    # Our prompt string equals the authors' template + assistant starter, cut at <|pointer_pad|>.
    system = gui_actor.SYSTEM_PROMPTS[backbone]
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]},
                {"role": "user", "content": [{"type": "image", "image": "x"},
                                             {"type": "text", "text": "open the Settings menu"}]}]
    templated = tok.apply_chat_template(messages, chat_template=GUI_ACTOR_TEMPLATE, tokenize=False,
                                        add_generation_prompt=False)
    reference = templated + gui_actor.ASSISTANT_STARTER + "<|pointer_end|>)"
    ours = gui_actor.full_prompt(system, "open the Settings menu", 1, cut=False)
    assert ours == reference
    expanded = reference.replace("<|image_pad|>", "<|image_pad|>" * n)
    ref_ids = tok(expanded, add_special_tokens=False)["input_ids"]
    cut = ref_ids.index(tok.convert_tokens_to_ids("<|pointer_pad|>")) + 1
    assert job.input_ids.tolist() == ref_ids[:cut]
    for key in ("pointer_pad_token_id", "pointer_start_token_id", "image_token_id"):
        assert getattr(pair[3].config, key, None) in (None, tok.convert_tokens_to_ids(
            {"pointer_pad_token_id": "<|pointer_pad|>", "pointer_start_token_id": "<|pointer_start|>",
             "image_token_id": "<|image_pad|>"}[key]))


def test_backbone_and_head_match_transformers(pair):
    import mlx.core as mx
    backbone, path, engine, model = pair
    job = engine.prepare(GroundingRequest("t", _png(371, 229, 2), "click OK"))
    encs, dec = engine.forward([job])
    enc, dec = np.array(encs[0]), np.array(dec)

    ids = torch.tensor(job.input_ids[None].astype(np.int64))
    pv = torch.from_numpy(images.pixel_values_of(job.image.rgb))   # what transformers feeds its ViT
    grid = torch.tensor([list(job.image.grid_thw)])
    with torch.no_grad():
        ref_enc = model.model.visual(pv, grid_thw=grid).pooler_output.numpy()
        out = model.model(input_ids=ids, pixel_values=pv, image_grid_thw=grid,
                          mm_token_type_ids=(ids == model.config.image_token_id).int())
        ref_dec = out.last_hidden_state[0, job.pointer_pos].numpy()
    assert enc.shape == ref_enc.shape == (job.image.n_tokens, model.config.text_config.hidden_size)
    err_enc = np.abs(enc - ref_enc).max() / max(1.0, np.abs(ref_enc).max())
    err_dec = np.abs(dec[0] - ref_dec).max() / max(1.0, np.abs(ref_dec).max())
    print(f"\n{backbone}: image embeds max err {err_enc:.2e}, pointer state max err {err_dec:.2e}")
    assert err_enc < TOL and err_dec < TOL
    assert np.abs(ref_dec).max() > 0.1  # not a degenerate comparison

    # Head: PyTorch's own MultiheadAttention / LayerNorm / exact GELU with the checkpoint tensors.
    from safetensors.torch import load_file
    t = {k[len(gui_actor.HEAD_PREFIX):]: v for k, v in load_file(path / "model.safetensors").items()
         if k.startswith(gui_actor.HEAD_PREFIX)}
    D = t["layer_norm.weight"].shape[0]
    mha = torch.nn.MultiheadAttention(D, 8, bias=True)
    mha.load_state_dict({"in_proj_weight": t["self_attention.in_proj_weight"],
                         "in_proj_bias": t["self_attention.in_proj_bias"],
                         "out_proj.weight": t["self_attention.out_proj.weight"],
                         "out_proj.bias": t["self_attention.out_proj.bias"]})
    mha.eval()

    def mlp(prefix, x):
        x = torch.nn.functional.linear(x, t[f"{prefix}.0.weight"], t[f"{prefix}.0.bias"])
        x = torch.nn.functional.gelu(x)
        return torch.nn.functional.linear(x, t[f"{prefix}.2.weight"], t[f"{prefix}.2.bias"])

    with torch.no_grad():
        e = torch.from_numpy(ref_enc)[:, None]  # [n, 1, D]
        a, _ = mha(e, e, e, need_weights=False)
        h = torch.nn.functional.layer_norm((e + a)[:, 0], (D,), t["layer_norm.weight"], t["layer_norm.bias"], 1e-5)
        logits = mlp("projection_dec", torch.from_numpy(ref_dec)[None]) @ mlp("projection_enc", h).T / D ** 0.5
        ref_scores = torch.softmax(logits, dim=-1)[0].numpy()
    scores = np.array(engine._head(mx.array(enc), mx.array(dec)))[0]
    assert np.abs(scores - ref_scores).max() < TOL * max(ref_scores.max(), 1e-3)
    assert scores.max() > 3 / scores.size  # a peaked map, not uniform


def test_checkpoint_resaved_by_transformers_5_loads(pair, tmp_path):
    """transformers >= 5 re-saves with a nested text_config and rope_parameters (and drops the
    head): with the head tensors and tokenizer put back, the answer must not change."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from workers.mlx.engine import MlxEngine
    backbone, path, engine, model = pair
    out = tmp_path / "resaved"
    model.save_pretrained(out)
    cfg = json_load(out / "config.json")
    assert "text_config" in cfg and "rope_parameters" in cfg["text_config"]
    cfg["architectures"] = [gui_actor.ARCHITECTURES[backbone]]   # what the authors' class saves
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(out / "model.safetensors"))
    tensors.update({k: v for k, v in load_file(str(path / "model.safetensors")).items()
                    if k.startswith(gui_actor.HEAD_PREFIX)})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(path / name, out / name)
    other = MlxEngine(ModelSpec(path=str(out), dtype="float32", max_pixels=120_000),
                      EngineOptions("resaved", str(tmp_path), 8192 * 8192))
    other.load()
    req = GroundingRequest("r", _png(240, 180, 4), "click", return_attention=True)
    a, b = engine.run([engine.prepare(req)])[0], other.run([other.prepare(req)])[0]
    np.testing.assert_allclose(np.frombuffer(a.attention, "<f4"), np.frombuffer(b.attention, "<f4"), rtol=1e-5, atol=1e-7)


def json_load(p):
    return json.loads(p.read_text())
