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
`FastVision` is the part both backbones share; `FastQwen2Vision` adds Qwen2-VL's LayerNorm and
quick-GELU MLP; workers/mlx/vision_qwen2_5.py adds Qwen2.5-VL's RMSNorm, SwiGLU MLP and windows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from workers.images import CLIP_MEAN, CLIP_STD, MERGE, PATCH
from workers.mlx import cuda_flash_attention, cuda_rotary
from workers.mlx.cuda_rotary import rotate_qk
from workers.mlx.run_ahead import RunAhead

if TYPE_CHECKING:
    from workers.mlx.split import Split

# Exactly transformers' normalisation per channel and byte value: x/255 in float64 -> float32,
# minus mean, over std in float32 (workers.images.normalize), tabulated once.
_LUT = ((np.arange(256, dtype=np.float64)[:, None] * (1 / 255)).astype(np.float32) - CLIP_MEAN) / CLIP_STD

PATCH_VALUES = PATCH * PATCH * 3      # values per patch, channel-last (normalized_patches)
Span = tuple[int, int, int]   # (first token, number of sequences, tokens per sequence)


def normalized_patches(rgb: mx.array, dtype: mx.Dtype) -> mx.array:
    """uint8 [H, W, 3] (H, W multiples of 28) -> [H/14 * W/14, 14*14*3] normalised patches, each
    2x2 merge group contiguous (Qwen2-VL's order), values channel-last within a patch."""
    h, w, _ = rgb.shape
    lut = mx.array(_LUT)                                            # [256, 3]
    x = mx.take_along_axis(lut, rgb.reshape(-1, 3).astype(mx.int32), axis=0).reshape(h, w, 3)
    gh, gw = h // PATCH, w // PATCH
    x = x.reshape(gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH, 3)
    x = x.transpose(0, 3, 1, 4, 2, 5, 6)                            # (gh/2, gw/2, 2, 2, 14, 14, 3)
    return x.reshape(gh * gw, PATCH_VALUES).astype(dtype)


@mx.compile
def _qkv(x, ln_w, ln_b, qkv_w, qkv_b):
    """Qwen2-VL: LayerNorm and qkv projection -> [N, 3*C]."""
    return mx.addmm(qkv_b, mx.fast.layer_norm(x, ln_w, ln_b, 1e-6), qkv_w.T)


@mx.compile
def _post_attention(x, o, proj_w, proj_b, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b):
    """Qwen2-VL: output projection + residual, LayerNorm, MLP with quick-GELU + residual."""
    x = x + mx.addmm(proj_b, o, proj_w.T)
    y = mx.fast.layer_norm(x, ln_w, ln_b, 1e-6)
    h = mx.addmm(fc1_b, y, fc1_w.T)
    h = h * mx.sigmoid(1.702 * h)
    return x + mx.addmm(fc2_b, h, fc2_w.T)


def attend(q: mx.array, k: mx.array, v: mx.array, spans: list[Span], scale: float) -> mx.array:
    """Attention within independent sequences: q, k, v [N, H, D] token-major; each span (start,
    count, size) is `count` sequences of `size` tokens from `start`, spans in order covering N.
    Token-major views go to cuDNN as they are (it reads them in place and writes o in the same
    order, so the output projection needs no transposing copy) -> [N, H*D]."""
    n, heads, hd = q.shape
    outs = []
    for start, count, size in spans:
        end = start + count * size
        qs, ks, vs = (t[start:end].reshape(count, size, heads, hd).transpose(0, 2, 1, 3) for t in (q, k, v))
        o = mx.fast.scaled_dot_product_attention(qs, ks, vs, scale=scale)        # [count, H, size, D]
        outs.append(o.transpose(0, 2, 1, 3).reshape(count * size, heads * hd))
    return mx.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]


class FastVision:
    """The forward both backbones share, over mlx-vlm's parameters: patch embedding as one matmul,
    2D rotary tables, the rotary (CUDA kernel or MLX ops), attention over spans, evaluation every
    few blocks, the merger. Subclasses give the block's norm + qkv, its MLP half, the attention
    spans of each block and, where the model reorders tokens, the order."""

    def __init__(self, tower, eval_every: int = 2):
        self.tower = tower
        self.split: "Split | None" = None       # attention heads shared with helper processes
        # Cut the graph every few blocks: a whole-tower graph kept every block's temporaries alive
        # until the end (+10-15 GB at 1080p on an H200). Two blocks a chunk, two chunks scheduled
        # (engine.RUN_AHEAD) measured best on an H100 (bench/RESULTS.md, bench.memory_profile).
        self.eval_every = eval_every
        attn = tower.blocks[0].attn
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        self.scale = self.head_dim ** -0.5
        w = tower.patch_embed.proj.weight                   # MLX Conv3d layout [out, T, 14, 14, 3]
        self.patch_w = w.sum(axis=1).reshape(w.shape[0], -1).T   # [14*14*3, out], temporal folded
        self.dtype = w.dtype
        self._load_kernels()

    def share_heads(self, split: "Split") -> None:
        """Compute only this rank's share of every block's attention heads (its rows of the qkv
        projection); `split.gather_along` joins the ranks' attention outputs before the output
        projection, which each rank then runs on the whole width for its share of the tokens
        (`_post_attention_by_rows`). Called after the subclass has set `blocks`, whose first
        group ends with the qkv weight and bias. The tower's own qkv layers get the slices too,
        so the whole-width weights are freed (and the worker reports what it holds); mlx-vlm's
        forward of that tower is then no longer valid."""
        if self.heads % split.ranks:
            raise ValueError(f"the vision tower's {self.heads} attention heads do not split over {split.ranks} GPUs")
        full = self.heads * self.head_dim
        self.heads //= split.ranks
        width = self.heads * self.head_dim
        rows = np.concatenate([np.arange(part * full + split.rank * width, part * full + (split.rank + 1) * width)
                               for part in range(3)])                  # this rank's q, k and v rows
        idx = mx.array(rows)
        self.blocks = [((*pre[:-2], pre[-2][idx], pre[-1][idx]), post) for pre, post in self.blocks]
        mx.eval(self.blocks)
        for block, (pre, _) in zip(self.tower.blocks, self.blocks):   # the whole-width ones are freed
            block.attn.qkv.weight, block.attn.qkv.bias = pre[-2], pre[-1]
        self._load_kernels()
        self.split = split

    def _load_kernels(self) -> None:
        """The custom kernels for this many heads (again after `share_heads`)."""
        # rotary on q and k in one kernel where MLX runs on CUDA (None elsewhere)
        self.rotary = cuda_rotary.load(self.heads, self.head_dim, self.dtype)
        # on Hopper, the rotary and an image's whole attention on warpgroup tensor cores (else None)
        self.flash = cuda_flash_attention.load(self.heads, self.head_dim, self.scale, self.dtype)

    # ---- what a family defines --------------------------------------------------------------
    def qkv(self, x: mx.array, block: int) -> mx.array:
        """Norm and qkv projection of block `block` -> [N, 3*C]."""
        raise NotImplementedError

    def post_attention(self, x: mx.array, o: mx.array, block: int) -> mx.array:
        """Output projection, residual, norm, MLP, residual."""
        raise NotImplementedError

    def spans(self, block: int, grids: list[tuple[int, int]]) -> list[Span]:
        """Attention spans of block `block`: by default one per image."""
        starts = np.cumsum([0] + [gh * gw for gh, gw in grids]).tolist()
        return [(s, 1, gh * gw) for s, (gh, gw) in zip(starts, grids)]

    def group_order(self, grids: list[tuple[int, int]]) -> np.ndarray | None:
        """A permutation of the 2x2 merge groups that the blocks run in (None: as given)."""
        return None

    def attention(self, qkv: mx.array, cos: mx.array, sin: mx.array, block: int,
                  grids: list[tuple[int, int]]) -> mx.array:
        """Block `block`'s attention from its qkv projection [N, 3*C]: rotary on q and k, then
        attention within the block's spans -> [N, C]."""
        n = qkv.shape[0]
        spans = self.spans(block, grids)
        if self.flash is not None and all(count == 1 for _, count, _ in spans):    # whole images
            outs = [self.flash(qkv[s:s + size], cos[s:s + size], sin[s:s + size]) for s, _, size in spans]
            return mx.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
        if self.rotary is not None:
            qk = self.rotary(qkv, cos, sin)                                     # [N, 2, H, D]
            q, k = qk[:, 0], qk[:, 1]
        else:
            q, k = rotate_qk(qkv.reshape(n, 3, self.heads, self.head_dim), cos, sin)
        v = qkv.reshape(n, 3, self.heads, self.head_dim)[:, 2]
        return attend(q, k, v, spans, self.scale)

    # ---- the shared forward -----------------------------------------------------------------
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

    def _post_attention_by_rows(self, x: mx.array, o: mx.array, block: int) -> mx.array:
        """Split: each rank runs its share of the rows through the output projection and the MLP,
        then the rows join (all_gather). Every op there works row by row, so each row meets the
        same arithmetic as in one process, only in shorter matmuls; on two H200s this took the
        1080p tower from 58.9 to 49.9 ms, with identical bits (bench.tp_probe, part `rows`). `o`
        holds every row's heads, though a rank uses its own rows only: MLX has no all-to-all, and
        the tower's exchanges cost ~2 ms of device time at 1080p. The last rank's share is padded
        to the others' length, since all_gather joins equal shapes."""
        n = x.shape[0]
        lo, hi, share = self.split.rows(n)
        mine = self.post_attention(x[lo:hi], o[lo:hi], block) if hi > lo else x[:0]
        if hi - lo < share:
            mine = mx.concatenate([mine, mx.zeros((share - (hi - lo), x.shape[1]), x.dtype)])
        return self.split.gather_along(mine, 0)[:n]

    def __call__(self, patches: list[mx.array], grids: list[tuple[int, int]],
                 pace: RunAhead | None = None) -> mx.array:
        """patches[i] [grid_h*grid_w, 588] from `normalized_patches`; grids[i] (grid_h, grid_w) in
        14-px patches -> merger output [sum of tokens, D], images in order. Every `eval_every`
        blocks the graph is handed to `pace` (workers/mlx/run_ahead.py)."""
        pace = pace or RunAhead()
        x = mx.concatenate(patches, axis=0) if len(patches) > 1 else patches[0]
        x = x @ self.patch_w
        tables = [self._rotary(gh, gw) for gh, gw in grids]
        cos = mx.concatenate([t[0] for t in tables]) if len(tables) > 1 else tables[0][0]
        sin = mx.concatenate([t[1] for t in tables]) if len(tables) > 1 else tables[0][1]
        order = self.group_order(grids)
        if order is not None:
            unit = MERGE * MERGE
            idx = mx.array(order)
            x, cos, sin = (t.reshape(-1, unit, t.shape[-1])[idx].reshape(-1, t.shape[-1]) for t in (x, cos, sin))
        for i in range(len(self.blocks)):
            o = self.attention(self.qkv(x, i), cos, sin, i, grids)
            if self.split is None:
                x = self.post_attention(x, o, i)
            else:
                x = self._post_attention_by_rows(x, self.split.gather_along(o, 1), i)
            if self.eval_every and (i + 1) % self.eval_every == 0:
                pace(x)
        if self.split is not None and self.split.rank:
            return x                          # a helper's part ends with the last block
        out = self.tower.merger(x)
        if order is not None:
            out = out[mx.array(np.argsort(order))]
        return out


class FastQwen2Vision(FastVision):
    """Qwen2-VL's ViT: LayerNorm, quick-GELU MLP, full attention within each image."""

    def __init__(self, tower, eval_every: int = 2):
        super().__init__(tower, eval_every)
        self.blocks = [((b.norm1.weight, b.norm1.bias, b.attn.qkv.weight, b.attn.qkv.bias),
                        (b.attn.proj.weight, b.attn.proj.bias, b.norm2.weight, b.norm2.bias,
                         b.mlp.fc1.weight, b.mlp.fc1.bias, b.mlp.fc2.weight, b.mlp.fc2.bias))
                       for b in tower.blocks]

    def qkv(self, x, block):
        return _qkv(x, *self.blocks[block][0])

    def post_attention(self, x, o, block):
        return _post_attention(x, o, *self.blocks[block][1])
