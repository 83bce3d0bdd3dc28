"""Qwen2.5-VL vision tower, our forward over mlx-vlm's parameters: same math, batched windows.

Qwen2.5-VL's ViT attends within 112x112-pixel windows (8x8 patches) in all blocks but a few
(`fullatt_block_indexes`), over tokens reordered window by window. mlx-vlm runs one attention call
per window after a `cu_seqlens.tolist()` device sync in every block: ~180 windows per 1080p image
times 28 windowed blocks. Here the windows are ordered by size (full 64-patch windows first, then
the clipped ones at the right and bottom edges), so each block needs one batched attention call
per window size (at most four per image) and no sync. Attention within a window does not depend
on where the window sits in the sequence, and full attention does not depend on token order, so
this ordering computes the reference's function; the merger output is put back in image order.
RMSNorm and the SwiGLU MLP are compiled around the attention, as for Qwen2-VL.

The MLP's width, 3420 in the released checkpoints, is widened with zeros to a multiple of
`MLP_ALIGN` at load (`widened_mlp`): see there. On CUDA the windowed blocks' rotary and attention
run as one kernel (workers/mlx/cuda_window_attention.py).
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from workers.images import MERGE, PATCH
from workers.mlx import cuda_window_attention
from workers.mlx.checkpoint import VISION_MLP_ALIGN
from workers.mlx.vision import FastVision, Span


@mx.compile
def _qkv_rms(x, norm_w, qkv_w, qkv_b):
    """RMSNorm and qkv projection -> [N, 3*C]."""
    return mx.addmm(qkv_b, mx.fast.rms_norm(x, norm_w, 1e-6), qkv_w.T)


@mx.compile
def _post_attention_swiglu(x, o, proj_w, proj_b, norm_w, gate_w, gate_b, up_w, up_b, down_w, down_b):
    """Output projection + residual, RMSNorm, SwiGLU MLP + residual."""
    x = x + mx.addmm(proj_b, o, proj_w.T)
    y = mx.fast.rms_norm(x, norm_w, 1e-6)
    g = mx.addmm(gate_b, y, gate_w.T)
    h = g * mx.sigmoid(g) * mx.addmm(up_b, y, up_w.T)
    return x + mx.addmm(down_b, h, down_w.T)


# cuBLAS ran the projection and SwiGLU MLP of a 1080p screenshot 2.3x slower at Qwen2.5-VL's
# width 3420 than Qwen2-VL's projection and MLP at 5120, the same arithmetic: 46.3 against 20.2 ms
# for 32 blocks on an H200 (bench.tower_ops; bench/RESULTS.md). The cause, by all appearances: a
# row of 3420 bf16 values is not a multiple of 16 bytes, which keeps cuBLAS off its fast kernels
# for the [N, 3420] operands. Widened to 3424 (rows of 16-byte multiples) the same work took
# 20.7 ms, to 3456 (a multiple of 64) 20.0 ms; the extra 1 % of arithmetic is lost in that.
MLP_ALIGN = VISION_MLP_ALIGN      # one rule with the checkpoint's weight estimate


def widened_mlp(gate_w, gate_b, up_w, up_b, down_w, align: int = MLP_ALIGN):
    """The SwiGLU MLP's weights with its width padded to a multiple of `align`: zero rows in gate
    and up, zero columns in down. A padded unit computes silu(0) * 0 = 0 and meets zero weights,
    so the MLP's function is unchanged (only a matmul's summation order may differ)."""
    pad = -gate_w.shape[0] % align
    if not pad:
        return gate_w, gate_b, up_w, up_b, down_w
    rows = lambda t: mx.concatenate([t, mx.zeros((pad, *t.shape[1:]), t.dtype)])
    return (rows(gate_w), rows(gate_b), rows(up_w), rows(up_b),
            mx.concatenate([down_w, mx.zeros((down_w.shape[0], pad), down_w.dtype)], axis=1))


def window_layout(grid_h: int, grid_w: int, window: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """For one image of grid_h x grid_w patches and windows of `window` x `window` merge groups:
    (merge-group order, windows largest first; [(groups per window, number of windows)] in that
    order). Windows tile the group grid from the top left; within a window, groups are row-major,
    as in transformers' `get_window_index`."""
    lh, lw = grid_h // MERGE, grid_w // MERGE
    groups = np.arange(lh * lw).reshape(lh, lw)
    windows = [groups[r:r + window, c:c + window].reshape(-1)
               for r in range(0, lh, window) for c in range(0, lw, window)]
    windows.sort(key=len, reverse=True)                     # stable: same-size windows keep their order
    runs: list[tuple[int, int]] = []
    for w in windows:
        if runs and runs[-1][0] == len(w):
            runs[-1] = (len(w), runs[-1][1] + 1)
        else:
            runs.append((len(w), 1))
    return np.concatenate(windows), runs


class FastQwen25Vision(FastVision):
    """Qwen2.5-VL's ViT: RMSNorm, SwiGLU MLP, window attention except in the full-attention blocks."""

    def __init__(self, tower, eval_every: int = 2):
        super().__init__(tower, eval_every)
        for b in tower.blocks:      # widened in place: no second copy, and mlx-vlm's forward stays valid
            m = b.mlp
            (m.gate_proj.weight, m.gate_proj.bias, m.up_proj.weight, m.up_proj.bias,
             m.down_proj.weight) = widened_mlp(m.gate_proj.weight, m.gate_proj.bias, m.up_proj.weight,
                                               m.up_proj.bias, m.down_proj.weight)
            mx.eval(m.parameters())
        self.window = tower.window_size // MERGE // PATCH            # merge groups per window side
        self.full_blocks = set(tower.fullatt_block_indexes)
        self.blocks = [((b.norm1.weight, b.attn.qkv.weight, b.attn.qkv.bias),
                        (b.attn.proj.weight, b.attn.proj.bias, b.norm2.weight,
                         b.mlp.gate_proj.weight, b.mlp.gate_proj.bias, b.mlp.up_proj.weight,
                         b.mlp.up_proj.bias, b.mlp.down_proj.weight, b.mlp.down_proj.bias))
                       for b in tower.blocks]
        self._layouts: dict[tuple[int, int], tuple[np.ndarray, list[tuple[int, int]]]] = {}
        self._windows: dict[tuple, tuple[mx.array, mx.array]] = {}

    def _load_kernels(self) -> None:
        super()._load_kernels()
        # on CUDA, the windowed blocks' rotary and attention in one kernel on tensor cores
        self.window_attention = cuda_window_attention.load(
            self.heads, self.head_dim, self.scale, self.dtype, (self.tower.window_size // PATCH) ** 2)

    def attention(self, qkv, cos, sin, block, grids):
        if self.window_attention is None or block in self.full_blocks:
            return super().attention(qkv, cos, sin, block, grids)
        key = tuple(grids)
        if key not in self._windows:
            if len(self._windows) > 64:
                self._windows.clear()
            self._windows[key] = cuda_window_attention.windows(self.spans(block, grids))
        return self.window_attention(qkv, cos, sin, *self._windows[key])

    def qkv(self, x, block):
        return _qkv_rms(x, *self.blocks[block][0])

    def post_attention(self, x, o, block):
        return _post_attention_swiglu(x, o, *self.blocks[block][1])

    def _layout(self, grid: tuple[int, int]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        if grid not in self._layouts:
            if len(self._layouts) > 64:
                self._layouts.clear()
            self._layouts[grid] = window_layout(grid[0], grid[1], self.window)
        return self._layouts[grid]

    def group_order(self, grids):
        orders, base = [], 0
        for gh, gw in grids:
            order, _ = self._layout((gh, gw))
            orders.append(order + base)
            base += (gh // MERGE) * (gw // MERGE)
        return np.concatenate(orders)

    def spans(self, block, grids) -> list[Span]:
        if block in self.full_blocks:
            return super().spans(block, grids)
        unit = MERGE * MERGE
        out, start = [], 0
        for gh, gw in grids:
            for groups, count in self._layout((gh, gw))[1]:
                out.append((start, count, groups * unit))
                start += count * groups * unit
        return out
