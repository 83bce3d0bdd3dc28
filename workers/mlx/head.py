"""GUI-Actor's action head (`VisionHead_MultiPatch`) in MLX, run in float32.

On CUDA, MLX runs float32 matmuls as TF32 unless MLX_ENABLE_TF32=0 is set (relative error ~3e-4
per matmul instead of ~1e-6; still far finer than the reference's bf16 head). There the head took
2.2 ms for a 1080p screenshot's tokens, against 3.8 ms in full float32 (bench.head_precision on an
H100, bench/RESULTS.md); 1.7-1.9 ms on an H200 since its keys are padded (`_aligned_keys`), and 1.3
ms where its self-attention runs as one CUDA kernel (Hopper GPUs, heads up to 256 wide:
workers/mlx/cuda_head_attention.py), which never writes the score matrix. The engine logs which
of these it got at load.

Parameter names equal the checkpoint's `multi_patch_pointer_head.*` names without the prefix, so
the 14 tensors load with `load_weights(strict=True)`. Math (docs/gui-actor.md section 7.4):
self-attention over the visual tokens (8 heads, scale 1/sqrt(D/8), packed q;k;v in_proj, out_proj
with bias), residual + LayerNorm (eps 1e-5), projection_enc / projection_dec (Linear, exact-erf
GELU, Linear), logits = dec_proj @ enc_projᵀ / sqrt(D), softmax over visual tokens.
"""
from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import mlx.nn as nn
from mlx.utils import tree_flatten

from workers.families.gui_actor import HEAD_HEADS, HEAD_PREFIX
from workers.mlx import cuda_head_attention

KEY_ALIGN = 64                         # keys padded to a multiple of this where n % 4 != 0 ...
PAD_FROM = 2048                        # ... and n >= this: below it the padding's own ops cost about
                                       # what alignment saves (H200, bench/RESULTS.md, 33rd session)
MASKED_SCORE = -1e30                   # a padded key's score: exp() of it is exactly 0


class _SelfAttention(nn.Module):
    """torch.nn.MultiheadAttention's parameter layout, self-attention only, no mask. `fused`: the
    CUDA kernel (workers/mlx/cuda_head_attention.py) where `head_from_tensors` loaded one."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = mx.zeros((3 * dim, dim))
        self.in_proj_bias = mx.zeros((3 * dim,))
        self.out_proj = nn.Linear(dim, dim, bias=True)
        self.fused = None

    def __call__(self, x: mx.array) -> mx.array:
        qkv = x @ self.in_proj_weight.T + self.in_proj_bias             # [n, 3D]
        o = self.fused(qkv) if self.fused is not None else attend_mlx(qkv, self.heads)
        return self.out_proj(o)


def attend_mlx(qkv: mx.array, heads: int) -> mx.array:
    """qkv [n, 3D] (q;k;v, each `heads` heads) -> softmax(q k^T / sqrt(D / heads)) v, [n, D], with
    MLX ops."""
    n, dim = qkv.shape[0], qkv.shape[1] // 3
    hd = dim // heads
    q, k, v = (t.reshape(n, heads, hd).transpose(1, 0, 2) for t in mx.split(qkv, 3, axis=-1))
    q = q * (1.0 / math.sqrt(hd))
    if n % 4 and n >= PAD_FROM:
        q, k, v = _aligned_keys(q, k, v)
    # One product for all queries: MLX evaluates a chunked product's chunks together, so
    # chunks did not bound the score matrix's memory, and cost time (RESULTS, 33rd session).
    o = mx.softmax(q @ k.transpose(0, 2, 1), axis=-1) @ v           # [heads, n, hd]
    return o.transpose(1, 0, 2).reshape(n, dim)


def _aligned_keys(q: mx.array, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """Keys and values padded to a multiple of KEY_ALIGN, with padded keys scoring MASKED_SCORE.

    The [heads, n, n] float32 score matrix's rows are n floats long; where n % 4 != 0 (1080p's
    2,691 visual tokens, 1440p's 4,641) no row after the first starts 16-byte aligned, and the
    products and the softmax over it run slower. The whole head on an H200 (bench.head_precision,
    two rounds): 1080p 2.08-2.24 -> 1.74-1.93 ms, 1440p 4.09-4.38 -> 2.65-2.67 ms. The mask is one
    more feature rather than a bias added to the scores, which would be another pass over them:
    1 in every query, 0 in a real key, MASKED_SCORE in a padded one (then 7 zeros, keeping rows
    16-byte aligned). A real key's scores are unchanged, a padded key's weight is exactly 0, and
    padded values are zeros."""
    heads, n, _ = k.shape
    m = -(-n // KEY_ALIGN) * KEY_ALIGN
    q = mx.concatenate([q, mx.ones((heads, n, 1)), mx.zeros((heads, n, 7))], axis=-1)
    mark = mx.concatenate([mx.zeros((n, 1)), mx.full((m - n, 1), MASKED_SCORE)])
    k = mx.concatenate([mx.pad(k, [(0, 0), (0, m - n), (0, 0)]), mx.broadcast_to(mark, (heads, m, 1)),
                        mx.zeros((heads, m, 7))], axis=-1)
    return q, k, mx.pad(v, [(0, 0), (0, m - n), (0, 0)])


class PointerHead(nn.Module):
    def __init__(self, dim: int, heads: int = HEAD_HEADS):
        super().__init__()
        self.dim = dim
        self.self_attention = _SelfAttention(dim, heads)
        self.layer_norm = nn.LayerNorm(dim, eps=1e-5)
        self.projection_enc = [nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)]
        self.projection_dec = [nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)]

    @staticmethod
    def _mlp(layers, x):
        for layer in layers:
            x = layer(x)
        return x

    def __call__(self, enc: mx.array, dec: mx.array) -> mx.array:
        """enc [n_img, D] visual tokens, dec [n_ptr, D] pointer states -> [n_ptr, n_img]
        attention over visual tokens (rows sum to 1), float32."""
        return self.point(self.encode_image(enc), dec)

    def encode_image(self, enc: mx.array) -> mx.array:
        """The image's side, [n_img, D] float32: all of the head's work that does not depend on
        the instruction, so a screenshot's can be kept for its next question."""
        enc = enc.astype(mx.float32)
        h = self.layer_norm(enc + self.self_attention(enc))
        return self._mlp(self.projection_enc, h)

    def point(self, image_side: mx.array, dec: mx.array) -> mx.array:
        """`encode_image`'s output and dec [n_ptr, D] -> [n_ptr, n_img] attention, float32."""
        d = self._mlp(self.projection_dec, dec.astype(mx.float32))
        logits = (d @ image_side.T) / math.sqrt(self.dim)
        return mx.softmax(logits, axis=-1)


def float32_matmul_error() -> float:
    """Max relative error of a float32 matmul on the default device against float64: ~1e-6 where
    float32 matmuls are full float32, ~1e-4 or more where they run as TF32."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 512)).astype(np.float32)
    b = rng.standard_normal((512, 256)).astype(np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64)
    got = np.array(mx.array(a) @ mx.array(b))
    return float(np.abs(got - want).max() / np.abs(want).max())


def head_from_tensors(tensors: dict[str, mx.array], hidden_size: int) -> PointerHead:
    """Build the head from the checkpoint's `multi_patch_pointer_head.*` tensors (prefix kept in
    the keys). D comes from `in_proj_weight`; it must equal the backbone's `hidden_size`. Raises
    ValueError naming the missing or misshapen tensor."""
    key = HEAD_PREFIX + "self_attention.in_proj_weight"
    if key not in tensors:
        raise ValueError(f"checkpoint has no tensor {key} (the pointer head)")
    dim = tensors[key].shape[1]
    if dim != hidden_size:
        raise ValueError(f"tensor {key} has shape {list(tensors[key].shape)}: head width {dim} "
                         f"differs from the backbone's hidden_size {hidden_size}")
    head = PointerHead(dim)
    expected = dict(tree_flatten(head.parameters()))
    weights = []
    for name, param in expected.items():
        full = HEAD_PREFIX + name
        if full not in tensors:
            raise ValueError(f"checkpoint has no tensor {full} (the pointer head)")
        t = tensors[full]
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"tensor {full} has shape {list(t.shape)}, expected {list(param.shape)}")
        weights.append((name, t.astype(mx.float32)))
    extra = sorted(set(tensors) - {HEAD_PREFIX + n for n in expected})
    if extra:
        raise ValueError(f"unexpected pointer-head tensor {extra[0]}")
    head.load_weights(weights, strict=True)
    head.eval()
    head.self_attention.fused = cuda_head_attention.load(HEAD_HEADS, dim // HEAD_HEADS)
    return head
