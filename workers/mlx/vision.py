"""Qwen2-VL vision tower, our forward over mlx-vlm's parameters: fast, batched, same math.

Why not mlx-vlm's own `VisionModel.__call__` (bench/RESULTS.md, H200 profile):
- it calls `cu_seqlens.tolist()` in every block, a device sync 32 times per image, which stops
  MLX from queueing work ahead; our segment boundaries are host integers known before the graph;
- its blocks run unfused (rotary in float32, quick-GELU, residuals as separate kernels); ours
  are `mx.compile`d around the attention;
- its patch embedding is a Conv3d over two identical temporal frames. A still image repeated
  over the temporal axis makes that Conv3d a single matmul with the two temporal kernel slices
  summed, over half the input (588 values per patch instead of 1176);
- it needs float32 `[N, 1176]` pixel values from the host (50 MB at 1080p, and 60-200 ms of NumPy
  on the preprocessing thread); we upload the resized uint8 image (6 MB) and normalise and
  patchify on the device, with a lookup table that gives bit-identical values to transformers.
Several images run as one forward: patches are concatenated, attention stays per image.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from workers.images import CLIP_MEAN, CLIP_STD, MERGE, PATCH
from workers.mlx import cuda_rotary

# Exactly transformers' normalisation per channel and byte value: x/255 in float64 -> float32,
# minus mean, over std in float32 (workers.images.normalize), tabulated once.
_LUT = ((np.arange(256, dtype=np.float64)[:, None] * (1 / 255)).astype(np.float32) - CLIP_MEAN) / CLIP_STD


def normalized_patches(rgb: mx.array, dtype: mx.Dtype) -> mx.array:
    """uint8 [H, W, 3] (H, W multiples of 28) -> [H/14 * W/14, 14*14*3] normalised patches, each
    2x2 merge group contiguous (Qwen2-VL's order), values channel-last within a patch."""
    h, w, _ = rgb.shape
    lut = mx.array(_LUT)                                            # [256, 3]
    x = mx.take_along_axis(lut, rgb.reshape(-1, 3).astype(mx.int32), axis=0).reshape(h, w, 3)
    gh, gw = h // PATCH, w // PATCH
    x = x.reshape(gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH, 3)
    x = x.transpose(0, 3, 1, 4, 2, 5, 6)                            # (gh/2, gw/2, 2, 2, 14, 14, 3)
    return x.reshape(gh * gw, PATCH * PATCH * 3).astype(dtype)


def _rotate_half(x: mx.array) -> mx.array:
    x1, x2 = mx.split(x, 2, axis=-1)
    return mx.concatenate([-x2, x1], axis=-1)


@mx.compile
def _pre_attention(x, cos, sin, ln_w, ln_b, qkv_w, qkv_b):
    """LayerNorm, qkv projection, 2D rotary (in float32, as the reference) -> q, k, v [N, H, hd]."""
    n, _ = x.shape
    hd = cos.shape[-1]
    y = mx.fast.layer_norm(x, ln_w, ln_b, 1e-6)
    qkv = mx.addmm(qkv_b, y, qkv_w.T).reshape(n, 3, -1, hd)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    c, s = cos[:, None], sin[:, None]
    qf, kf = q.astype(mx.float32), k.astype(mx.float32)
    q = (qf * c + _rotate_half(qf) * s).astype(x.dtype)
    k = (kf * c + _rotate_half(kf) * s).astype(x.dtype)
    return q, k, v


@mx.compile
def _qkv(x, ln_w, ln_b, qkv_w, qkv_b):
    """LayerNorm and qkv projection -> [N, 3*C] (the CUDA rotary kernel does the rest)."""
    return mx.addmm(qkv_b, mx.fast.layer_norm(x, ln_w, ln_b, 1e-6), qkv_w.T)


@mx.compile
def _post_attention(x, o, proj_w, proj_b, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b):
    """Output projection + residual, LayerNorm, MLP with quick-GELU + residual."""
    x = x + mx.addmm(proj_b, o, proj_w.T)
    y = mx.fast.layer_norm(x, ln_w, ln_b, 1e-6)
    h = mx.addmm(fc1_b, y, fc1_w.T)
    h = h * mx.sigmoid(1.702 * h)
    return x + mx.addmm(fc2_b, h, fc2_w.T)


class FastQwen2Vision:
    """Runs mlx-vlm's qwen2_vl `VisionModel` parameters (patch embed, blocks, merger)."""

    def __init__(self, tower, pad_head_dim: int = 0, eval_every: int = 4):
        self.tower = tower
        # Evaluate every few blocks: a whole-tower graph kept every block's temporaries alive
        # until the end (+10-15 GB at 1080p on an H200, bench/RESULTS.md).
        self.eval_every = eval_every
        self.pad_head_dim = pad_head_dim   # zero-pad q/k/v's head dim for the attention kernel (0: off)
        self.heads = tower.blocks[0].attn.num_heads
        w = tower.patch_embed.proj.weight                   # MLX Conv3d layout [out, T, 14, 14, 3]
        self.patch_w = w.sum(axis=1).reshape(w.shape[0], -1).T   # [14*14*3, out], temporal folded
        self.dtype = w.dtype
        self.blocks = [(b.norm1.weight, b.norm1.bias, b.attn.qkv.weight, b.attn.qkv.bias,
                        b.attn.proj.weight, b.attn.proj.bias, b.norm2.weight, b.norm2.bias,
                        b.mlp.fc1.weight, b.mlp.fc1.bias, b.mlp.fc2.weight, b.mlp.fc2.bias)
                       for b in tower.blocks]
        self.scale = (tower.blocks[0].attn.head_dim) ** -0.5
        # rotary + head-major layout in one kernel where MLX runs on CUDA (None elsewhere)
        self.rotary = cuda_rotary.load(self.heads, tower.blocks[0].attn.head_dim, self.dtype)

    def _rotary(self, grid_h: int, grid_w: int) -> tuple[mx.array, mx.array]:
        """cos, sin [grid_h*grid_w, head_dim/2] for one image, in the merge-group patch order (the
        reference's tables repeat these twice along the last axis)."""
        m = MERGE
        hpos = np.broadcast_to(np.arange(grid_h)[:, None], (grid_h, grid_w))
        wpos = np.broadcast_to(np.arange(grid_w)[None, :], (grid_h, grid_w))
        order = lambda p: p.reshape(grid_h // m, m, grid_w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        table = self.tower.rotary_pos_emb(mx.array(max(grid_h, grid_w)))   # [max, hd/4] float32
        freqs = mx.concatenate([table[mx.array(order(hpos))], table[mx.array(order(wpos))]], axis=-1)
        return mx.cos(freqs), mx.sin(freqs)

    def __call__(self, patches: list[mx.array], grids: list[tuple[int, int]]) -> mx.array:
        """patches[i] [grid_h*grid_w, 588] from `normalized_patches`; grids[i] (grid_h, grid_w) in
        14-px patches -> merger output [sum of tokens, D], images in order."""
        x = mx.concatenate(patches, axis=0) if len(patches) > 1 else patches[0]
        x = x @ self.patch_w
        tables = [self._rotary(gh, gw) for gh, gw in grids]
        cos = mx.concatenate([t[0] for t in tables]) if len(tables) > 1 else tables[0][0]
        sin = mx.concatenate([t[1] for t in tables]) if len(tables) > 1 else tables[0][1]
        if self.rotary is None:
            cos, sin = (mx.concatenate([t, t], axis=-1) for t in (cos, sin))
        bounds = np.cumsum([0] + [gh * gw for gh, gw in grids]).tolist()
        done = 0
        for ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b in self.blocks:
            if self.rotary is not None:
                qkv = _qkv(x, ln1_w, ln1_b, qkv_w, qkv_b)
                qk = self.rotary(qkv, cos, sin)                                     # [N, 2, H, D]
                q, k, v = qk[:, 0], qk[:, 1], qkv.reshape(qk.shape[0], 3, self.heads, -1)[:, 2]
            else:
                q, k, v = _pre_attention(x, cos, sin, ln1_w, ln1_b, qkv_w, qkv_b)     # [N, H, D] each
            outs = []
            for s, e in zip(bounds[:-1], bounds[1:]):       # attention never crosses images
                # token-major views: cuDNN reads them in place and writes o in the same order
                qs, ks, vs = (t[s:e].transpose(1, 0, 2)[None] for t in (q, k, v))
                if self.pad_head_dim > qs.shape[-1]:   # zeros change no dot product; sliced off after
                    width = [(0, 0)] * 3 + [(0, self.pad_head_dim - qs.shape[-1])]
                    hd = qs.shape[-1]
                    qs, ks, vs = (mx.pad(t, width) for t in (qs, ks, vs))
                    outs.append(mx.fast.scaled_dot_product_attention(qs, ks, vs, scale=self.scale)[0][..., :hd])
                    continue
                outs.append(mx.fast.scaled_dot_product_attention(qs, ks, vs, scale=self.scale)[0])
            o = mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]   # [H, N, hd]
            o = o.transpose(1, 0, 2).reshape(x.shape[0], -1)
            x = _post_attention(x, o, proj_w, proj_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b)
            done += 1
            if self.eval_every and done % self.eval_every == 0:
                mx.eval(x)
        return self.tower.merger(x)
