"""Random-weight GUI-Actor checkpoints in the released Hugging Face layout (no download).

    python -m workers.tiny_checkpoint OUT --backbone qwen2_vl|qwen2_5_vl [--seed N] [--shards N]

Writes config.json (a `...WithPointer` architecture with the pointer token ids), safetensors with
the real tensor names (backbone + the 14 `multi_patch_pointer_head.*` tensors), a byte-level BPE
tokenizer built locally with `tokenizers` (Qwen specials + the five GUI-Actor tokens; ids are small
because the vocabulary is tiny), tokenizer_config.json with the chat template,
preprocessor_config.json and generation_config.json. Answers are random: it exists for tests,
`make serve` out of the box, and (with `Dims.gui_actor_2b()`) size-true benchmarks.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BACKBONES = ("qwen2_vl", "qwen2_5_vl")
ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGenerationWithPointer",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGenerationWithPointer"}
HEAD_PREFIX = "multi_patch_pointer_head."
FORMAT = 1                      # bump when the generated weights or files change (cached copies regenerate)
MARKER = "tiny_checkpoint.json"

# Qwen's added tokens in id order (Qwen2-VL: 151643..151656; Qwen2.5-VL adds 151657..151664).
QWEN2_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                     "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                     "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                     "<|image_pad|>", "<|video_pad|>"]
QWEN2_5_VL_EXTRA = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
GUI_ACTOR_TOKENS = ["<|recipient|>", "<|diff_marker|>", "<|pointer_start|>", "<|pointer_end|>",
                    "<|pointer_pad|>"]
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The stock Qwen2-VL chat template (what the released tokenizer_config.json carries).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Dims:
    """Model sizes. `hidden` is the LLM width D (also the head width); `vis_*` the ViT."""
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    mrope_section: tuple = (2, 3, 3)       # sums to head_dim / 2
    vis_embed: int = 32
    vis_depth: int = 2
    vis_heads: int = 2
    vis_intermediate: int = 76             # Qwen2.5-VL SwiGLU width (Qwen2-VL uses 4 * vis_embed); like
                                           # the real 3420, not a multiple of 16 (widened at load)
    fullatt_blocks: tuple = (1,)           # Qwen2.5-VL blocks with full (not window) attention
    vocab: int | None = None               # None: len(tokenizer), as the released checkpoints
    tie_embeddings: bool = True

    @staticmethod
    def gui_actor_2b() -> "Dims":
        """GUI-Actor-2B-Qwen2-VL sizes (Qwen2-VL-2B backbone, vocab 151662)."""
        return Dims(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960,
                    mrope_section=(16, 24, 24), vis_embed=1280, vis_depth=32, vis_heads=16,
                    vocab=151662)

    @staticmethod
    def gui_actor_3b_qwen2_5() -> "Dims":
        """GUI-Actor-3B-Qwen2.5-VL sizes (Qwen2.5-VL-3B backbone; windowed ViT)."""
        return Dims(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008,
                    mrope_section=(16, 24, 24), vis_embed=1280, vis_depth=32, vis_heads=16,
                    vis_intermediate=3420, fullatt_blocks=(7, 15, 23, 31), vocab=151670)

    @staticmethod
    def gui_actor_7b_qwen2_5() -> "Dims":
        """GUI-Actor-7B-Qwen2.5-VL sizes (Qwen2.5-VL-7B backbone: untied lm_head; windowed ViT)."""
        return Dims(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                    mrope_section=(16, 24, 24), vis_embed=1280, vis_depth=32, vis_heads=16,
                    vis_intermediate=3420, fullatt_blocks=(7, 15, 23, 31), vocab=151670,
                    tie_embeddings=False)

    @staticmethod
    def gui_actor_7b() -> "Dims":
        """GUI-Actor-7B-Qwen2-VL sizes (Qwen2-VL-7B backbone: untied lm_head, same ViT)."""
        return Dims(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                    mrope_section=(16, 24, 24), vis_embed=1280, vis_depth=32, vis_heads=16,
                    vocab=151662, tie_embeddings=False)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def special_tokens(backbone: str) -> list[str]:
    """All added tokens in id order, GUI-Actor's five last."""
    extra = QWEN2_5_VL_EXTRA if backbone == "qwen2_5_vl" else []
    return QWEN2_VL_SPECIALS + extra + GUI_ACTOR_TOKENS


def build_tokenizer(backbone: str):
    """A byte-level BPE tokenizer (256 byte tokens, no merges) with Qwen's added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens(backbone)])
    return tok


def _config(backbone: str, d: Dims, ids: dict[str, int], vocab: int) -> dict:
    text = {"attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|diff_marker|>"]], "hidden_act": "silu", "hidden_size": d.hidden,
            "initializer_range": 0.02, "intermediate_size": d.intermediate,
            "max_position_embeddings": 32768, "max_window_layers": d.layers,
            "num_attention_heads": d.heads, "num_hidden_layers": d.layers,
            "num_key_value_heads": d.kv_heads, "rms_norm_eps": 1e-06,
            "rope_scaling": {"type": "mrope", "mrope_section": list(d.mrope_section)},
            "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": d.tie_embeddings,
            "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
            "vocab_size": vocab}
    if backbone == "qwen2_vl":
        vision = {"depth": d.vis_depth, "embed_dim": d.vis_embed, "mlp_ratio": 4,
                  "num_heads": d.vis_heads, "in_chans": 3, "hidden_size": d.hidden,
                  "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                  "temporal_patch_size": 2}
        version = "4.47.1"
    else:
        vision = {"depth": d.vis_depth, "hidden_act": "silu", "hidden_size": d.vis_embed,
                  "intermediate_size": d.vis_intermediate, "num_heads": d.vis_heads, "in_chans": 3,
                  "out_hidden_size": d.hidden, "patch_size": 14, "spatial_merge_size": 2,
                  "spatial_patch_size": 14, "window_size": 112,
                  "fullatt_block_indexes": list(d.fullatt_blocks), "tokens_per_second": 2,
                  "temporal_patch_size": 2}
        version = "4.51.3"
    return {"architectures": [ARCHITECTURES[backbone]], "model_type": backbone, **text,
            "transformers_version": version, "vision_config": vision,
            "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
            "vision_token_id": ids["<|vision_pad|>"],
            "pointer_start_token_id": ids["<|pointer_start|>"],
            "pointer_end_token_id": ids["<|pointer_end|>"],
            "pointer_pad_token_id": ids["<|pointer_pad|>"]}


def tensor_shapes(backbone: str, d: Dims, vocab: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint with its shape (transformers <= 4.51 names)."""
    D, hd = d.hidden, d.hidden // d.heads
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, D)}
    for i in range(d.layers):
        p = f"model.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": (D, D), p + "self_attn.q_proj.bias": (D,),
                  p + "self_attn.k_proj.weight": (d.kv_heads * hd, D), p + "self_attn.k_proj.bias": (d.kv_heads * hd,),
                  p + "self_attn.v_proj.weight": (d.kv_heads * hd, D), p + "self_attn.v_proj.bias": (d.kv_heads * hd,),
                  p + "self_attn.o_proj.weight": (D, D),
                  p + "mlp.gate_proj.weight": (d.intermediate, D), p + "mlp.up_proj.weight": (d.intermediate, D),
                  p + "mlp.down_proj.weight": (D, d.intermediate),
                  p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,)})
    s["model.norm.weight"] = (D,)
    if not d.tie_embeddings:
        s["lm_head.weight"] = (vocab, D)
    E = d.vis_embed
    s["visual.patch_embed.proj.weight"] = (E, 3, 2, 14, 14)
    for i in range(d.vis_depth):
        p = f"visual.blocks.{i}."
        s.update({p + "attn.qkv.weight": (3 * E, E), p + "attn.qkv.bias": (3 * E,),
                  p + "attn.proj.weight": (E, E), p + "attn.proj.bias": (E,)})
        if backbone == "qwen2_vl":
            s.update({p + "norm1.weight": (E,), p + "norm1.bias": (E,), p + "norm2.weight": (E,),
                      p + "norm2.bias": (E,), p + "mlp.fc1.weight": (4 * E, E), p + "mlp.fc1.bias": (4 * E,),
                      p + "mlp.fc2.weight": (E, 4 * E), p + "mlp.fc2.bias": (E,)})
        else:
            I = d.vis_intermediate
            s.update({p + "norm1.weight": (E,), p + "norm2.weight": (E,),
                      p + "mlp.gate_proj.weight": (I, E), p + "mlp.gate_proj.bias": (I,),
                      p + "mlp.up_proj.weight": (I, E), p + "mlp.up_proj.bias": (I,),
                      p + "mlp.down_proj.weight": (E, I), p + "mlp.down_proj.bias": (E,)})
    s["visual.merger.ln_q.weight"] = (E,)
    if backbone == "qwen2_vl":
        s["visual.merger.ln_q.bias"] = (E,)
    s.update({"visual.merger.mlp.0.weight": (4 * E, 4 * E), "visual.merger.mlp.0.bias": (4 * E,),
              "visual.merger.mlp.2.weight": (D, 4 * E), "visual.merger.mlp.2.bias": (D,)})
    h = HEAD_PREFIX
    s.update({h + "self_attention.in_proj_weight": (3 * D, D), h + "self_attention.in_proj_bias": (3 * D,),
              h + "self_attention.out_proj.weight": (D, D), h + "self_attention.out_proj.bias": (D,),
              h + "layer_norm.weight": (D,), h + "layer_norm.bias": (D,)})
    for proj in ("projection_enc", "projection_dec"):
        for j in (0, 2):
            s[f"{h}{proj}.{j}.weight"] = (D, D)
            s[f"{h}{proj}.{j}.bias"] = (D,)
    return s


def _random(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Weights scaled 1/sqrt(fan_in) so activations neither vanish nor explode; norms near 1."""
    if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name or "ln_q.weight" in name \
            or name.endswith("layernorm.weight") or name.endswith("layer_norm.weight"):
        if name.endswith("bias"):
            return (0.1 * rng.standard_normal(shape, dtype=np.float32))
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32))
    if len(shape) == 1:
        return 0.1 * rng.standard_normal(shape, dtype=np.float32)
    if name == "model.embed_tokens.weight" or name == "lm_head.weight":
        return rng.standard_normal(shape, dtype=np.float32)
    fan_in = int(np.prod(shape[1:]))
    # The head's last projections are scaled up so that random maps are peaked (several regions).
    gain = 3.0 if name.startswith(HEAD_PREFIX) and name.endswith(".2.weight") else 1.0
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(gain * fan_in ** -0.5)


def _to_bf16_bytes(a: np.ndarray) -> bytes:
    """float32 -> bfloat16 bits, round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> int:
    """Minimal safetensors writer (F32 or BF16 from float32 arrays). Returns bytes of data."""
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        data = _to_bf16_bytes(arr) if dtype == "BF16" else np.ascontiguousarray(arr, np.float32).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for b in blobs:
            fh.write(b)
    return offset


def _tokenizer_files(out: Path, backbone: str, tok) -> dict[str, int]:
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in special_tokens(backbone)}
    base = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    (out / "vocab.json").write_text(json.dumps(base, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n")
    (out / "added_tokens.json").write_text(json.dumps(ids, indent=2))
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for t, i in ids.items()}
    tok_cfg = {"add_prefix_space": False, "added_tokens_decoder": decoder,
               "additional_special_tokens": GUI_ACTOR_TOKENS, "bos_token": None,
               "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
               "eos_token": "<|im_end|>", "errors": "replace", "extra_special_tokens": {},
               "model_max_length": 32768, "pad_token": "<|endoftext|>",
               "processor_class": "Qwen2VLProcessor" if backbone == "qwen2_vl" else "Qwen2_5_VLProcessor",
               "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    tok_entry = lambda t: {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False}
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": GUI_ACTOR_TOKENS, "eos_token": tok_entry("<|im_end|>"),
         "pad_token": tok_entry("<|endoftext|>")}, indent=2))
    return ids


def write_tiny_checkpoint(out_dir: str | os.PathLike, backbone: str = "qwen2_vl", seed: int = 0,
                          shards: int = 1, dims: Dims | None = None, dtype: str = "F32") -> Path:
    """Write a random GUI-Actor checkpoint into `out_dir` (created; existing files overwritten).

    `shards` > 1 splits the weights into `model-0000i-of-0000n.safetensors` with an index.
    `dtype` is the safetensors dtype: "F32" (tests) or "BF16" (size-true benchmarks)."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    d = dims or Dims()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(backbone)
    ids = _tokenizer_files(out, backbone, tok)
    vocab = d.vocab or tok.get_vocab_size(with_added_tokens=True)
    if vocab < tok.get_vocab_size(with_added_tokens=True):
        raise ValueError(f"vocab {vocab} is smaller than the tokenizer")
    config = _config(backbone, d, ids, vocab)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|diff_marker|>"]],
         "pad_token_id": ids["<|endoftext|>"], "transformers_version": config["transformers_version"]},
        indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
         "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "rescale_factor": 1 / 255,
         "image_processor_type": "Qwen2VLImageProcessor", "merge_size": 2, "min_pixels": 3136,
         "max_pixels": 5720064, "patch_size": 14, "temporal_patch_size": 2,
         "processor_class": "Qwen2VLProcessor" if backbone == "qwen2_vl" else "Qwen2_5_VLProcessor"},
        indent=2))
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(backbone, d, vocab)
    names = list(shapes)
    # Contiguous shards drawn in name order: the weights do not depend on the shard count.
    bounds = np.linspace(0, len(names), shards + 1).round().astype(int)
    groups = [names[bounds[i]:bounds[i + 1]] for i in range(shards)]
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        fname = "model.safetensors" if shards == 1 else f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        # One shard in memory at a time keeps the 2B-sized generation within a few GB.
        total += write_safetensors(out / fname, {n: _random(n, shapes[n], rng) for n in group}, dtype)
        weight_map.update({n: fname for n in group})
    (out / MARKER).write_text(json.dumps({"generator": "workers.tiny_checkpoint", "format": FORMAT,
                                          "backbone": backbone, "seed": seed, "random_weights": True}))
    if shards > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workers.tiny_checkpoint",
                                 description="Write a random-weight GUI-Actor checkpoint (HF layout).")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--backbone", choices=BACKBONES, default="qwen2_vl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1, help="safetensors files (>1 writes an index)")
    args = ap.parse_args(argv)
    if args.shards < 1:
        ap.error("--shards must be >= 1")
    try:
        path = write_tiny_checkpoint(args.out, args.backbone, args.seed, args.shards)
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
