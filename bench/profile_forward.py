"""Where does a GUI-Actor-2B-shaped forward pass spend its time? (GPU profiling, random weights)

    python -m bench.profile_forward [W H] [reps] [--tiny]

Times, with mx.synchronize around each: mlx-vlm's full forward (with vocabulary logits, as
prefill_floor.py does), its vision tower alone, the language model to the final norm (no
logits), position ids, and our fast vision path (one host-side split for attention instead of a
`.tolist()` sync per block, patch embedding as one matmul, shared rotary tables, mx.compile'd
blocks). Used to decide what to optimise; the engine's own path is timed by bench/gpu_ground.py.
"""
from __future__ import annotations

import math
import statistics
import sys

import mlx.core as mx
from mlx_vlm.models.qwen2_vl import Model, ModelConfig, TextConfig, VisionConfig

from bench.timing import device_times
from workers.mlx.cuda_rotary import rotate_half

args = [a for a in sys.argv[1:] if not a.startswith("--")]
TINY = "--tiny" in sys.argv
W = int(args[0]) if args else 1920
H = int(args[1]) if len(args) > 1 else 1080
REPS = int(args[2]) if len(args) > 2 else 10
IMG = 151655


def smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=5720064):
    hb = max(factor, round(h / factor) * factor)
    wb = max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    return hb, wb


TXT = dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
           num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=151936, max_position_embeddings=32768,
           rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
           tie_word_embeddings=True)
VIS = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4.0, patch_size=14,
           spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
if TINY:
    TXT.update(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=151936)
    VIS.update(depth=2, embed_dim=64, hidden_size=64, num_heads=4)

rh, rw = smart_resize(H, W)
gh, gw = rh // 14, rw // 14
n_patches = gh * gw
ids = [151644] * 20 + [151652] + [IMG] * (n_patches // 4) + [151653] + [872] * 38
DT = mx.float32 if TINY else mx.bfloat16

cfg = dict(model_type="qwen2_vl", image_token_id=IMG, video_token_id=151656, vision_start_token_id=151652,
           vision_config=dict(model_type="qwen2_vl", **VIS), **TXT)
mc = ModelConfig.from_dict(cfg)
mc.text_config = TextConfig.from_dict(mc.text_config)
mc.vision_config = VisionConfig.from_dict(mc.vision_config)
model = Model(mc)
model.set_dtype(DT)
mx.eval(model.parameters())
input_ids = mx.array([ids])
pv = mx.random.normal((n_patches, 1176)).astype(DT)
grid = mx.array([[1, gh, gw]])
vt = model.vision_tower


def timeit(name, fn, reps=REPS):
    ts = device_times(fn, reps)
    print(f"{name:<44} median {statistics.median(ts)*1e3:8.1f} ms  min {min(ts)*1e3:8.1f} ms", flush=True)
    return statistics.median(ts)


# ---- fast vision path ----------------------------------------------------------------------------
def rope_tables(t, h, w):
    """cos/sin [N, head_dim] for Qwen2-VL's 2D vision rotary, built once per image."""
    m = vt.spatial_merge_size
    hpos = mx.broadcast_to(mx.arange(h)[:, None], (h, w)).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).flatten()
    wpos = mx.broadcast_to(mx.arange(w)[None, :], (h, w)).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).flatten()
    table = vt.rotary_pos_emb(mx.array(max(h, w)))
    freqs = mx.concatenate([table[hpos], table[wpos]], axis=-1)      # [N, head_dim/2]
    freqs = mx.tile(freqs, (t, 1))
    emb = mx.concatenate([freqs, freqs], axis=-1)                      # [N, head_dim]
    return mx.cos(emb), mx.sin(emb)


def make_block_fn(heads):
    def block(x, cos, sin, blk_params):
        # x [N, C]
        norm1, qkv_w, qkv_b, proj_w, proj_b, norm2, fc1_w, fc1_b, fc2_w, fc2_b = blk_params
        n, c = x.shape
        hd = c // heads
        y = mx.fast.layer_norm(x, norm1[0], norm1[1], 1e-6)
        qkv = mx.addmm(qkv_b, y, qkv_w.T).reshape(n, 3, heads, hd)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        qf, kf = q.astype(mx.float32), k.astype(mx.float32)
        q = (qf * cos[:, None] + rotate_half(qf) * sin[:, None]).astype(x.dtype)
        k = (kf * cos[:, None] + rotate_half(kf) * sin[:, None]).astype(x.dtype)
        q, k, v = (t.transpose(1, 0, 2)[None] for t in (q, k, v))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=hd ** -0.5)
        o = o[0].transpose(1, 0, 2).reshape(n, c)
        x = x + mx.addmm(proj_b, o, proj_w.T)
        y = mx.fast.layer_norm(x, norm2[0], norm2[1], 1e-6)
        hmid = mx.addmm(fc1_b, y, fc1_w.T)
        hmid = hmid * mx.sigmoid(1.702 * hmid)
        return x + mx.addmm(fc2_b, hmid, fc2_w.T)
    return block


block_fn = make_block_fn(VIS["num_heads"])
block_compiled = mx.compile(block_fn)
params = [((b.norm1.weight, b.norm1.bias), b.attn.qkv.weight, b.attn.qkv.bias, b.attn.proj.weight, b.attn.proj.bias,
           (b.norm2.weight, b.norm2.bias), b.mlp.fc1.weight, b.mlp.fc1.bias, b.mlp.fc2.weight, b.mlp.fc2.bias)
          for b in vt.blocks]
pe_w = vt.patch_embed.proj.weight          # MLX Conv3d layout [out, t, kh, kw, in]
pe_mat = pe_w.transpose(0, 4, 1, 2, 3).reshape(pe_w.shape[0], -1).T   # [in*t*kh*kw, out] matching pixel_values order


def fast_vision(pv, compiled=True):
    x = pv @ pe_mat
    cos, sin = rope_tables(1, gh, gw)
    fn = block_compiled if compiled else block_fn
    for p in params:
        x = fn(x, cos, sin, p)
    return vt.merger(x)


ref = vt(pv, grid)
fast = fast_vision(pv)
err = mx.abs(ref.astype(mx.float32) - fast.astype(mx.float32)).max().item()
print(f"device {mx.default_device()}  {W}x{H} -> {rw}x{rh}, patches {n_patches}, tokens {len(ids)}, "
      f"fast-vision max|diff| {err:.3g}", flush=True)

emb = model.get_input_embeddings(input_ids, pv, image_grid_thw=grid)
mx.eval(emb.inputs_embeds, emb.position_ids)
lm = model.language_model

timeit("full forward incl. logits (mlx-vlm)", lambda: model(input_ids, pixel_values=pv, image_grid_thw=grid).logits[:, -1])
timeit("vision tower (mlx-vlm)", lambda: vt(pv, grid))
timeit("fast vision, uncompiled", lambda: fast_vision(pv, compiled=False))
timeit("fast vision, compiled blocks", lambda: fast_vision(pv))
timeit("get_rope_index (host)", lambda: lm.get_rope_index(input_ids, grid)[0])
timeit("LM to final norm, no logits", lambda: lm.model(input_ids, inputs_embeds=emb.inputs_embeds,
                                                        position_ids=emb.position_ids)[:, -1])
timeit("LM + tied logits (all positions)", lambda: lm.model.embed_tokens.as_linear(
    lm.model(input_ids, inputs_embeds=emb.inputs_embeds, position_ids=emb.position_ids))[:, -1])
nh, hd = VIS["num_heads"], VIS["embed_dim"] // VIS["num_heads"]
q = mx.random.normal((1, nh, n_patches, hd)).astype(DT)
timeit(f"vision sdpa alone x{VIS['depth']} (D={hd})", lambda: [mx.fast.scaled_dot_product_attention(q, q, q, scale=0.1) for _ in range(VIS["depth"])])
print("peak GB", mx.get_peak_memory() / 1e9, flush=True)
