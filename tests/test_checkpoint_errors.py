"""A bad checkpoint fails the load with a message naming the file or tensor (the worker reports
it as load_failed); model path resolution (folder, local HF cache, tiny:<backbone>)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from workers.mlx.checkpoint import CheckpointError, ensure_tiny, read_checkpoint, resolve_path
from workers.tiny_checkpoint import write_safetensors, write_tiny_checkpoint


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return write_tiny_checkpoint(tmp_path / "ckpt", "qwen2_vl", seed=1)


def _rewrite(path: Path, edit) -> None:
    from safetensors.numpy import load_file
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    write_safetensors(f, tensors)


def _load(path: Path):
    from common.config import ModelSpec
    from workers.engine import EngineOptions
    from workers.mlx.engine import MlxEngine
    engine = MlxEngine(ModelSpec(path=str(path)), EngineOptions("m", str(path.parent), 10**8))
    engine.load()
    return engine


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


# ---- checks before any weight is read (no MLX) --------------------------------------------------

def test_good_checkpoint_reads(ckpt):
    c = read_checkpoint(ckpt)
    assert c.model_type == "qwen2_vl"
    assert sum(k.startswith("multi_patch_pointer_head.") for k in c.tensors) == 14
    assert c.tensors["model.embed_tokens.weight"].shape[0] == c.config["vocab_size"]


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        read_checkpoint(ckpt)


def test_unknown_architecture(ckpt):
    _edit_config(ckpt, architectures=["Qwen2VLForConditionalGeneration"])
    with pytest.raises(CheckpointError, match="unknown architecture.*Qwen2VLForConditionalGenerationWithPointer"):
        read_checkpoint(ckpt)


def test_unknown_model_type(ckpt):
    _edit_config(ckpt, model_type="llama")
    with pytest.raises(CheckpointError, match="unknown model_type 'llama'"):
        read_checkpoint(ckpt)


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        read_checkpoint(ckpt)


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        read_checkpoint(ckpt)


def test_truncated_weights(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors: tensor .* past the end"):
        read_checkpoint(ckpt)


def test_missing_shard(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "sharded", "qwen2_5_vl", seed=0, shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors .*index"):
        read_checkpoint(path)


def test_index_names_a_tensor_its_shard_lacks(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "sharded", "qwen2_vl", seed=0, shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.extra"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="tensor model.norm.extra"):
        read_checkpoint(path)


# ---- path resolution --------------------------------------------------------------------------

def test_local_folder_and_missing_path(ckpt, tmp_path):
    assert resolve_path(str(ckpt), str(tmp_path)) == ckpt
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_path(str(tmp_path / "nope"), str(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        resolve_path(str(tmp_path / "file"), str(tmp_path))


def test_hf_repo_id_from_local_cache_only(tmp_path):
    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--microsoft--GUI-Actor-2B-Qwen2-VL"
    snap = repo / "snapshots" / "abc123"
    write_tiny_checkpoint(snap, "qwen2_vl")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    assert resolve_path("microsoft/GUI-Actor-2B-Qwen2-VL", str(tmp_path), str(hf_home)) == snap
    assert resolve_path("microsoft/GUI-Actor-2B-Qwen2-VL", str(tmp_path), str(hf_home / "hub")) == snap
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache.*never downloads"):
        resolve_path("microsoft/GUI-Actor-7B-Qwen2-VL", str(tmp_path), str(hf_home))


def test_tiny_is_generated_once_atomically(tmp_path):
    cache = tmp_path / "cache"
    p = resolve_path("tiny:qwen2_5_vl", str(cache))
    assert p == cache / "tiny-qwen2_5_vl" and (p / "model.safetensors").is_file()
    assert [e.name for e in cache.iterdir()] == ["tiny-qwen2_5_vl"]  # no temp folder left behind
    mtime = (p / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny("qwen2_5_vl", str(cache)) == p
    assert (p / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(CheckpointError, match="unknown tiny backbone"):
        resolve_path("tiny:llama", str(cache))
    # A copy written by an older generator (other format) is replaced, atomically.
    (p / "tiny_checkpoint.json").write_text(json.dumps({"format": -1}))
    assert ensure_tiny("qwen2_5_vl", str(cache)) == p
    assert json.loads((p / "tiny_checkpoint.json").read_text())["format"] >= 1
    assert [e.name for e in cache.iterdir()] == ["tiny-qwen2_5_vl"]


def test_tiny_checkpoint_is_deterministic_and_fast(tmp_path):
    import time
    t = time.perf_counter()
    a = write_tiny_checkpoint(tmp_path / "a", "qwen2_vl", seed=7)
    assert time.perf_counter() - t < 2.0
    b = write_tiny_checkpoint(tmp_path / "b", "qwen2_vl", seed=7)
    for name in os.listdir(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = write_tiny_checkpoint(tmp_path / "c", "qwen2_vl", seed=8)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert sum(f.stat().st_size for f in a.iterdir()) < 2_000_000


def test_tiny_checkpoint_cli(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "workers.tiny_checkpoint", str(tmp_path / "t"),
                          "--backbone", "qwen2_5_vl", "--seed", "2", "--shards", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGenerationWithPointer"]
    tok = json.loads((tmp_path / "t" / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    for key, token in (("pointer_pad_token_id", "<|pointer_pad|>"), ("image_token_id", "<|image_pad|>"),
                       ("pointer_start_token_id", "<|pointer_start|>")):
        assert cfg[key] == added[token]
    assert list(added)[-5:] == ["<|recipient|>", "<|diff_marker|>", "<|pointer_start|>",
                                "<|pointer_end|>", "<|pointer_pad|>"]
    assert (tmp_path / "t" / "model.safetensors.index.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "workers.tiny_checkpoint", str(tmp_path / "u"),
                          "--backbone", "llama"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


# ---- checks that need the tensors (MLX) ---------------------------------------------------------

@pytest.mark.mlx
def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        _load(ckpt)


@pytest.mark.mlx
def test_wrong_shape(ckpt):
    def edit(t):
        t["visual.blocks.0.attn.qkv.weight"] = np.zeros((5, 7), np.float32)
    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError, match=r"visual\.blocks\.0\.attn\.qkv\.weight in model\.safetensors has shape \[5, 7\]"):
        _load(ckpt)


@pytest.mark.mlx
def test_missing_head_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.pop("multi_patch_pointer_head.projection_dec.2.bias"))
    with pytest.raises(CheckpointError, match=r"multi_patch_pointer_head\.projection_dec\.2\.bias"):
        _load(ckpt)


@pytest.mark.mlx
def test_head_width_differs_from_backbone(ckpt):
    def edit(t):
        t["multi_patch_pointer_head.self_attention.in_proj_weight"] = np.zeros((96, 32), np.float32)
    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError, match="in_proj_weight has shape"):
        _load(ckpt)


@pytest.mark.mlx
def test_pointer_id_disagrees_with_tokenizer(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    _edit_config(ckpt, pointer_pad_token_id=cfg["pointer_pad_token_id"] - 1)
    with pytest.raises(CheckpointError, match="pointer_pad_token_id .* tokenizer.json maps <\\|pointer_pad\\|>"):
        _load(ckpt)


@pytest.mark.mlx
def test_corrupt_tokenizer(ckpt):
    (ckpt / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json .* cannot be loaded"):
        _load(ckpt)


@pytest.mark.mlx
def test_vocab_comes_from_the_embed_tensor(ckpt):
    _edit_config(ckpt, vocab_size=151936)   # the config may disagree with the tensors: trust tensors
    engine = _load(ckpt)
    rows = engine._model.language_model.model.embed_tokens.weight.shape[0]
    assert rows == read_checkpoint(ckpt).tensors["model.embed_tokens.weight"].shape[0] < 151936


# ---- the broker's reservation before a first load: the weights' size from the headers ----------


@pytest.mark.mlx
@pytest.mark.parametrize("backbone,tied", [("qwen2_vl", True), ("qwen2_5_vl", False)])
def test_the_weight_estimate_is_what_the_engine_keeps(tmp_path, backbone, tied):
    from common.config import ModelSpec
    from workers.engine import EngineOptions
    from workers.mlx.checkpoint import estimate_weight_bytes
    from workers.mlx.engine import MlxEngine
    from workers.tiny_checkpoint import Dims
    path = write_tiny_checkpoint(tmp_path / "c", backbone, dims=Dims(tie_embeddings=tied), shards=2)
    assert ("lm_head.weight" in read_checkpoint(path).tensors) is not tied    # dropped at load
    for quantize in (None, 8, 4):
        engine = MlxEngine(ModelSpec(path=str(path), quantize=quantize), EngineOptions("m", str(tmp_path), 10**8))
        loaded = engine.load().weights_bytes
        assert estimate_weight_bytes(str(path), str(tmp_path), None, quantize) == loaded, quantize
        engine.unload()
    # as bf16 (the config's dtype), the float32 checkpoint halves, but for the float32 pointer head
    f32 = estimate_weight_bytes(str(path), str(tmp_path))
    bf16 = estimate_weight_bytes(str(path), str(tmp_path), dtype_bytes=2)
    head = sum(4 * int(np.prod(t.shape)) for n, t in read_checkpoint(path).tensors.items()
               if n.startswith("multi_patch_pointer_head."))
    assert bf16 == (f32 - head) // 2 + head and head > 0


def test_the_weight_estimate_finds_what_the_engine_would_load_and_generates_nothing(tmp_path):
    from workers.mlx.checkpoint import estimate_weight_bytes
    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--microsoft--GUI-Actor-2B-Qwen2-VL"
    snap = write_tiny_checkpoint(repo / "snapshots" / "abc123", "qwen2_vl")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    local = estimate_weight_bytes(str(snap), str(tmp_path))
    assert local > 100_000
    assert estimate_weight_bytes("microsoft/GUI-Actor-2B-Qwen2-VL", str(tmp_path), str(hf_home)) == local
    cache = tmp_path / "cache"
    assert estimate_weight_bytes("microsoft/GUI-Actor-7B-Qwen2-VL", str(cache), str(hf_home)) is None
    assert estimate_weight_bytes(str(tmp_path / "nope"), str(cache)) is None
    assert estimate_weight_bytes("tiny:qwen2_vl", str(cache)) is None and not cache.exists()
    ensure_tiny("qwen2_vl", str(cache))
    assert estimate_weight_bytes("tiny:qwen2_vl", str(cache)) == local     # seed 0 either way, same sizes


def test_the_workers_estimate_follows_the_model_spec(tmp_path):
    from common.config import ModelSpec
    from workers.__main__ import DEFAULT_FAKE_WEIGHTS, estimate_weights_bytes
    from workers.engine import EngineOptions
    from workers.mlx.checkpoint import estimate_weight_bytes
    path = write_tiny_checkpoint(tmp_path / "c", "qwen2_vl")
    opts = EngineOptions("m", str(tmp_path), 10**8)
    env = {"HOME": str(tmp_path)}
    assert estimate_weights_bytes(ModelSpec(path=str(path), dtype="bfloat16", quantize=4), opts, env) == \
        estimate_weight_bytes(str(path), str(tmp_path), None, 4, 2)
    assert estimate_weights_bytes(ModelSpec(path="~/c"), opts, env) == estimate_weight_bytes(str(path), str(tmp_path))
    assert estimate_weights_bytes(ModelSpec(path="org/absent"), opts, env) == DEFAULT_FAKE_WEIGHTS
    assert estimate_weights_bytes(ModelSpec(path=str(path), engine="fake", fake={"weights_bytes": 7}), opts, env) == 7
