"""The Qwen2-VL / Qwen2.5-VL backbone through mlx-vlm: build it from a checked checkpoint, load
and check its tensors ourselves, and run the two pieces GUI-Actor needs (never the vocab logits):
- `encode_image`: vision tower + merger -> encoder vectors [n_img, D];
- `pointer_states`: language model (all layers + final RMSNorm) -> hidden states at given positions.
"""
from __future__ import annotations

import importlib
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from workers.families.gui_actor import HEAD_PREFIX
from workers.mlx import cuda_weights
from workers.mlx.checkpoint import QUANT_GROUP, Checkpoint, CheckpointError, packed_by_quantize

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
PAD_MULTIPLE = 64   # prompt lengths are padded to this (at most 63 extra tokens, ~2 % at 1080p)
TAIL_MULTIPLE = 32  # the same for the tokens after a kept prefix (workers/screen_cache.py)

# checkpoint name prefix -> mlx-vlm parameter prefix (old layout first, then transformers >= 4.52)
_RENAMES = (("model.language_model.", "language_model.model."), ("model.visual.", "vision_tower."),
            ("visual.", "vision_tower."), ("model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."))


def mlx_name(name: str) -> str:
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def checkpoint_name(name: str) -> str:
    """mlx-vlm parameter name -> the name the released files use (for error messages)."""
    for old, new in (("language_model.model.", "model."), ("vision_tower.", "visual."),
                     ("language_model.lm_head.", "lm_head.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def resolve_dtype(name: str) -> mx.Dtype:
    """`auto`: bfloat16 on a GPU, float32 on the CPU."""
    if name == "auto":
        return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16") from None


def _model_config(arch, ckpt: Checkpoint, vocab: int):
    raw = dict(ckpt.config)
    nested = raw.pop("text_config", None) or {}
    # vocab from the embed tensor, never from the config (GUI-Actor resized the embeddings)
    flat = {**raw, **nested, "vocab_size": vocab, "model_type": ckpt.model_type}
    rope = flat.get("rope_parameters")
    if not flat.get("rope_scaling") and isinstance(rope, dict) and "mrope_section" in rope:
        # transformers >= 5 writes rope_parameters where 4.x wrote rope_scaling + rope_theta
        flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
        flat.setdefault("rope_theta", rope.get("rope_theta", 1000000.0))
    vision = dict(flat.pop("vision_config", None) or {})
    vision["model_type"] = ckpt.model_type
    cfg = arch.ModelConfig.from_dict({**flat, "vision_config": vision})
    cfg.text_config = arch.TextConfig.from_dict(cfg.text_config)
    cfg.vision_config = arch.VisionConfig.from_dict(vision)
    return cfg


def load_backbone(ckpt: Checkpoint, dtype: mx.Dtype, quantize: int | None = None, lm_layers: int | None = None):
    """-> (mlx-vlm Model, head tensors {name: array} in float32). Checks every parameter against
    the checkpoint (missing tensor / wrong shape -> CheckpointError naming tensor and file).
    `lm_layers`: keep only the language model's first layers (workers/mlx/prebuild.py's helpers)."""
    embed = ckpt.tensors.get("model.embed_tokens.weight") or ckpt.tensors.get("model.language_model.embed_tokens.weight")
    if embed is None:
        raise CheckpointError("checkpoint is missing tensor model.embed_tokens.weight")
    arch = importlib.import_module(f"mlx_vlm.models.{ckpt.model_type}")
    try:
        model = arch.Model(_model_config(arch, ckpt, embed.shape[0]))
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise CheckpointError(f"config.json does not describe a valid {ckpt.model_type} model: {exc}") from None
    if "lm_head" in model.language_model:  # grounding never computes vocab logits
        model.language_model.pop("lm_head")
    if lm_layers is not None:
        text = model.language_model.model
        text.layers = text.layers[:lm_layers]
    expected = dict(tree_flatten(model.parameters()))

    by_mlx = {mlx_name(k): k for k in ckpt.tensors if not k.startswith(HEAD_PREFIX)}
    sources = {}          # parameter -> (checkpoint tensor, whether it is PyTorch's Conv3d layout)
    for name, param in expected.items():
        src = by_mlx.get(name)
        if src is None:
            raise CheckpointError(f"checkpoint is missing tensor {checkpoint_name(name)}")
        shape = ckpt.tensors[src].shape
        conv3d = name.endswith("patch_embed.proj.weight") and len(shape) == 5 and shape[1] == 3
        if conv3d:
            shape = (shape[0], *shape[2:], shape[1])     # transposed below
        if shape != tuple(param.shape):
            raise CheckpointError(f"tensor {src} in {ckpt.tensors[src].file.name} has shape "
                                  f"{list(ckpt.tensors[src].shape)}, expected {list(param.shape)}")
        sources[name] = src, conv3d
    head_names = [k for k in ckpt.tensors if k.startswith(HEAD_PREFIX)]
    arrays = _read(ckpt, [*(src for src, _ in sources.values()), *head_names])
    head = {k: v for k, v in arrays.items() if k.startswith(HEAD_PREFIX)}
    weights = []
    for name, (src, conv3d) in sources.items():
        v = arrays.pop(src)
        if conv3d:
            v = v.transpose(0, 2, 3, 4, 1)  # PyTorch Conv3d [out, C, T, H, W] -> MLX [out, T, H, W, C]
        if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype:
            # one tensor at a time, so the stored copy is gone before the next is converted: the
            # load's peak stays near the model's size (a bf16 checkpoint as float32 on the CPU
            # peaked at both copies, 1.5x the model)
            v = v.astype(dtype)
            mx.eval(v)
        weights.append((name, v))
    model.load_weights(weights, strict=True)
    if quantize:
        nn.quantize(model.language_model, group_size=QUANT_GROUP, bits=quantize,
                    class_predicate=lambda path, m: isinstance(m, nn.Linear)
                    and packed_by_quantize(f"{path}.weight", m.weight.shape))
    mx.eval(model.parameters())
    model.eval()
    return model, head


def _read(ckpt: Checkpoint, names: list[str]) -> dict[str, mx.array]:
    """The named tensors as stored: on CUDA straight to the device on several threads
    (workers/mlx/cuda_weights.py), else (or where that declines) by mx.load, which reads a
    tensor when it is first evaluated."""
    direct = cuda_weights.read({k: ckpt.tensors[k] for k in names})
    if direct is not None:
        return direct
    arrays: dict[str, mx.array] = {}
    for f in ckpt.weight_files:
        try:
            arrays.update(mx.load(str(f)))
        except Exception as exc:  # mlx raises RuntimeError/ValueError for unreadable files
            raise CheckpointError(f"cannot read {f.name}: {exc}") from None
    return {k: arrays[k] for k in names}


def encode_image(model, pixel_values: np.ndarray, grid_thw: tuple[int, int, int]) -> mx.array:
    """Vision tower + merger: [grid_h*grid_w, 1176] patches -> [n_img, D] encoder vectors."""
    dtype = model.vision_tower.patch_embed.proj.weight.dtype
    return model.vision_tower(mx.array(pixel_values).astype(dtype), mx.array([list(grid_thw)]),
                              output_hidden_states=False)


def pointer_states(model, input_ids: np.ndarray, image_start: int, image_embeds: mx.array,
                   position_ids: np.ndarray, positions: list[int]) -> mx.array:
    """Hidden states after the final RMSNorm at `positions` -> [len(positions), D].

    `input_ids` [L] holds one contiguous run of image pads at image_start; the embeddings there are
    replaced by `image_embeds`; `position_ids` [3, L] are the M-RoPE positions."""
    lm = model.language_model.model
    ids = mx.array(input_ids[None].astype(np.int32))
    n = image_embeds.shape[0]
    emb = lm.embed_tokens(ids)
    h = mx.concatenate([emb[:, :image_start], image_embeds[None].astype(emb.dtype),
                        emb[:, image_start + n:]], axis=1)
    pos = mx.array(position_ids[:, None, :].astype(np.int32))
    out = lm(ids, inputs_embeds=h, position_ids=pos)        # [1, L, D], after model.norm
    return out[0, mx.array(positions)]


def prompt_multiple(ranks: int = 1) -> int:
    """What prompt lengths are padded to: PAD_MULTIPLE, and divisible by a split's ranks."""
    return math.lcm(PAD_MULTIPLE, ranks)


def padded_length(lengths: list[int], multiple: int) -> int:
    """The batch's prompt length: the longest, rounded up to `multiple`."""
    return -(-max(lengths) // multiple) * multiple


def pointer_states_batch(model, input_ids: list[np.ndarray], image_starts: list[int],
                         image_embeds: list[mx.array], position_ids: list[np.ndarray],
                         pointer_pos: list[int], fast_lm=None, pace=None, keep: list[int] | None = None,
                         split=None):
    """`pointer_states` for several prompts in one forward -> [B, D], one pointer per prompt.

    Prompts are right-padded to the longest, rounded up to a multiple of `PAD_MULTIPLE`: every
    prompt ends at its <|pointer_pad|> and the attention is causal, so padding after it never
    reaches the state we read. The rounding keeps the number of distinct shapes small: each new
    sequence length costs the GPU backend a new attention plan (cuDNN graph) and new compiled
    kernels, and instruction lengths vary with every request. `fast_lm` (a FastLanguageModel over
    the same parameters) runs the language model instead of mlx-vlm's forward, cutting its graph
    with `pace` (a RunAhead). `keep` and `split` (need `fast_lm`): see FastLanguageModel.pointer_states;
    with `split`, prompts are padded to `prompt_multiple(split.ranks)`."""
    lm = model.language_model.model
    rows = []
    for ids, start, img in zip(input_ids, image_starts, image_embeds):
        emb = lm.embed_tokens(mx.array(ids.astype(np.int32)))
        rows.append(mx.concatenate([emb[:start], img.astype(emb.dtype), emb[start + img.shape[0]:]], axis=0))
    h, pos = _right_padded(rows, position_ids, prompt_multiple(split.ranks if split is not None else 1))
    if fast_lm is not None:     # workers/mlx/language.py: same function, fewer and fused kernels
        return fast_lm.pointer_states(h, pos, pointer_pos, pace, keep, split)
    if keep is not None or split is not None:
        raise ValueError("keeping a prompt prefix or splitting the language model needs our language-model forward")
    dummy = mx.zeros(h.shape[:2], dtype=mx.int32)   # unused once inputs_embeds is given
    out = lm(dummy, inputs_embeds=h, position_ids=pos)       # [B, L, D], after model.norm
    return out[mx.arange(len(input_ids)), mx.array(pointer_pos)]


def pointer_state_after(model, fast_lm, kept: list, tail_ids: list[np.ndarray],
                        tail_positions: list[np.ndarray]) -> mx.array:
    """Pointer states [B, D] of prompts that share one kept prefix (`kept`, from
    `pointer_states_batch(..., keep=...)`: the same screenshot and system prompt): tail_ids[b] [T_b]
    are prompt b's tokens after the prefix, ending at its <|pointer_pad|>, tail_positions[b]
    [3, T_b] their M-RoPE positions. Tails are right-padded to the longest, rounded up to a
    multiple of TAIL_MULTIPLE, for the same reasons as in `pointer_states_batch`."""
    lm = model.language_model.model
    rows = [lm.embed_tokens(mx.array(ids.astype(np.int32))) for ids in tail_ids]
    h, pos = _right_padded(rows, tail_positions, TAIL_MULTIPLE)
    return fast_lm.pointer_state_after(kept, h, pos, [len(ids) - 1 for ids in tail_ids])


def _right_padded(rows: list[mx.array], positions: list[np.ndarray], multiple: int) -> tuple[mx.array, mx.array]:
    """Rows [L_b, C] and their M-RoPE positions [3, L_b] -> (h [B, L, C], positions [3, B, L]),
    zeros after each row, L the longest rounded up to `multiple`."""
    length = padded_length([r.shape[0] for r in rows], multiple)
    pos = np.zeros((3, len(rows), length), dtype=np.int32)
    padded = []
    for b, (r, p) in enumerate(zip(rows, positions)):
        if length > r.shape[0]:
            r = mx.concatenate([r, mx.zeros((length - r.shape[0], r.shape[-1]), dtype=r.dtype)], axis=0)
        padded.append(r)
        pos[:, b, :p.shape[1]] = p
    return mx.stack(padded), mx.array(pos)
