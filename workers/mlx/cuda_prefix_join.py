"""A cached question's attention inputs for one language-model layer in one CUDA kernel (MLX CUDA
backend only): the tail's q and k rotated (M-RoPE tables as given), and its k and v written after
the kept prefix's, as `pointer_state_after` needs them.

Why (bench/RESULTS.md, thirty-sixth session, H200): a question about a cached screenshot runs the
language model over its ~55 tail tokens against the kept ~2,850-token prefix, ~730 small kernels
in all. MLX's CUDA backend spends 1.6-4.7 us of host time encoding each elementwise kernel (12-34 us
each matmul), so the host, not the GPU (~4 ms of kernels), sets the tail's time (6-11 ms). Per
layer, the MLX-ops path (`reference`) runs ~12 kernels between the q/k/v projection and the
attention: q, k and v out of the projection, `rotate_half`'s negation and concatenation and the
fused rotary for each of q and k, and the two concatenations with the prefix. This is one: 728 ->
420 kernels a tail, ~1.5 ms less.

Same arithmetic as the MLX-ops path (`rope`, compiled): MLX's fused kernel rounds the second
product to the model dtype and fuses the first into the sum (an FMA), and so does this kernel; it
gives the same bits (transformers' eager bf16 rotary, each product rounded, differs from both in the
last place of ~1/4 of the values; measured). `load` probes the kernel against `reference`, bit for
bit, and returns None where it cannot be built or disagrees; the caller then keeps the MLX-ops path.
"""
from __future__ import annotations

import logging

import mlx.core as mx

from workers.mlx.cuda_kernel import Kernel
from workers.mlx.cuda_rotary import on_cuda, rotate_half

log = logging.getLogger(__name__)

_HEADER = """
template <typename T>
__device__ __forceinline__ T rope_pair(float x, float c, float other, float s) {
    // x*c + other*s as MLX's compiled `rope` computes it (measured on an H200, MLX 0.32.4): the
    // second product rounded to T, the first fused into it (fmaf), the sum rounded to T
    return static_cast<T>(fmaf(x, c, static_cast<float>(static_cast<T>(__fmul_rn(other, s)))));
}
"""

_SOURCE = """
    // qkv [B, T, (HEADS + 2 KV) D]; cos, sin [B, T, D]; pk, pv [1, KV, P, D] (the kept prefix)
    // -> q [B, HEADS, T, D] rotated; k, v [B, KV, P + T, D]: the prefix's, then the tail's (k rotated).
    // Three kinds of work, one after another along the threads: a rotated pair (q and k heads),
    // one element of the tail's v, 16 bytes of the prefix's k or v.
    constexpr int D = 2 * HALF;
    constexpr int PIECE = 16 / sizeof(T);                         // elements in 16 bytes
    constexpr int64_t W = (HEADS + 2 * KV) * D;
    const int64_t nb = qkv_shape[0], nt = qkv_shape[1], np = pk_shape[2], nl = np + nt;
    const int64_t n_rot = nb * nt * (HEADS + KV) * HALF;
    const int64_t n_v = nb * nt * KV * D;
    const int64_t per_prefix = KV * np * D / PIECE;               // 16-byte pieces of pk (and of pv)
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n_rot) {
        const int d = i % HALF;
        const int64_t r = i / HALF;
        const int head = r % (HEADS + KV);                        // q heads, then k heads
        const int64_t bt = r / (HEADS + KV);
        const int64_t b = bt / nt, t = bt % nt;
        const int64_t src = bt * W + head * D + d;
        const float x1 = static_cast<float>(qkv[src]);
        const float x2 = static_cast<float>(qkv[src + HALF]);
        const int64_t tab = bt * D + d;
        const T o1 = rope_pair<T>(x1, static_cast<float>(cos[tab]), -x2, static_cast<float>(sin[tab]));
        const T o2 = rope_pair<T>(x2, static_cast<float>(cos[tab + HALF]), x1, static_cast<float>(sin[tab + HALF]));
        T* dst = head < HEADS ? q + ((b * HEADS + head) * nt + t) * D + d
                              : k + ((b * KV + (head - HEADS)) * nl + np + t) * D + d;
        dst[0] = o1;
        dst[HALF] = o2;
        return;
    }
    i -= n_rot;
    if (i < n_v) {
        const int d = i % D;
        const int64_t r = i / D;
        const int h = r % KV;
        const int64_t bt = r / KV;
        const int64_t b = bt / nt, t = bt % nt;
        v[((b * KV + h) * nl + np + t) * D + d] = qkv[bt * W + (HEADS + KV + h) * D + d];
        return;
    }
    i -= n_v;
    if (i < nb * 2 * per_prefix) {
        const int64_t piece = i % per_prefix;
        const int64_t r = i / per_prefix;
        const int64_t b = r / 2;
        const int64_t e = piece * PIECE;                          // element in [KV, P, D]
        const int64_t h = e / (np * D), rest = e % (np * D);
        const int64_t at = (b * KV + h) * nl * D + rest;
        if (r % 2 == 0) {
            reinterpret_cast<uint4*>(k + at)[0] = reinterpret_cast<const uint4*>(pk)[piece];
        } else {
            reinterpret_cast<uint4*>(v + at)[0] = reinterpret_cast<const uint4*>(pv)[piece];
        }
    }
"""


@mx.compile
def rope(q, k, cos, sin):
    """The language model's rotary with MLX ops (every prompt's, and a tail's without the kernel):
    q [B, H, L, D], k [B, KV, L, D], cos/sin [B, L, D] (mlx-vlm's M-RoPE tables, in the model dtype)."""
    c, s = cos[:, None], sin[:, None]
    return (q * c + rotate_half(q) * s).astype(q.dtype), (k * c + rotate_half(k) * s).astype(k.dtype)


def split_heads(qkv: mx.array, heads: int, kv_heads: int, head_dim: int) -> tuple[mx.array, mx.array, mx.array]:
    """The projection's output [B, L, (H + 2 KV) D] -> q [B, H, L, D], k and v [B, KV, L, D] (views)."""
    b, length, _ = qkv.shape
    q, k, v = mx.split(qkv, [heads * head_dim, (heads + kv_heads) * head_dim], axis=-1)
    return tuple(t.reshape(b, length, -1, head_dim).transpose(0, 2, 1, 3) for t in (q, k, v))


def after_prefix(q: mx.array, k: mx.array, v: mx.array, pk: mx.array, pv: mx.array):
    """k and v [B, KV, T, D] joined after the kept prefix's [1, KV, P, D] (shared by every row)."""
    b = q.shape[0]
    if b > 1:
        pk, pv = (mx.broadcast_to(p, (b, *p.shape[1:])) for p in (pk, pv))
    return q, mx.concatenate([pk, k], axis=2), mx.concatenate([pv, v], axis=2)


def reference(qkv, cos, sin, pk, pv, heads: int, kv_heads: int):
    """The MLX-ops path the kernel replaces: -> q [B, H, T, D], k and v [B, KV, P + T, D]."""
    q, k, v = split_heads(qkv, heads, kv_heads, pk.shape[-1])
    q, k = rope(q, k, cos, sin)
    return after_prefix(q, k, v, pk, pv)


class CudaPrefixJoin:
    """`reference` as one kernel: qkv [B, T, (H + 2 KV) D], cos/sin [B, T, D], pk/pv [1, KV, P, D]."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int):
        self.heads, self.kv_heads, self.half = heads, kv_heads, head_dim // 2
        self.kernel = Kernel("lm_prefix_join", ["qkv", "cos", "sin", "pk", "pv"], ["q", "k", "v"], _SOURCE, _HEADER)

    def __call__(self, qkv, cos, sin, pk, pv):
        b, t, _ = qkv.shape
        p, d = pk.shape[2], 2 * self.half
        pieces = 2 * b * self.kv_heads * p * d * qkv.dtype.size // 16
        work = b * t * (self.heads + self.kv_heads) * self.half + b * t * self.kv_heads * d + pieces
        return tuple(self.kernel(
            inputs=[qkv, cos, sin, pk, pv],
            template=[("T", qkv.dtype), ("HEADS", self.heads), ("KV", self.kv_heads), ("HALF", self.half)],
            grid=(work, 1, 1), threadgroup=(256, 1, 1),
            output_shapes=[(b, self.heads, t, d), (b, self.kv_heads, p + t, d), (b, self.kv_heads, p + t, d)],
            output_dtypes=[qkv.dtype] * 3))


def supported(head_dim: int, dtype: mx.Dtype) -> bool:
    """bf16 and float32, where the kernel gives MLX's bits (measured). In float16 MLX's compiled
    rotary differs from it in the last place on some values, so float16 keeps MLX ops. The prefix
    is copied 16 bytes at a time: rows of whole pieces."""
    return dtype in (mx.bfloat16, mx.float32) and head_dim % 2 == 0 and head_dim * dtype.size % 16 == 0


def load(heads: int, kv_heads: int, head_dim: int, dtype: mx.Dtype) -> CudaPrefixJoin | None:
    """The kernel if MLX runs on CUDA and it gives `reference`'s values exactly on a probe, else None."""
    if not on_cuda() or not supported(head_dim, dtype):
        return None
    try:
        join = CudaPrefixJoin(heads, kv_heads, head_dim)
        for b, t, p in ((1, 16, 37), (3, 8, 5)):
            keys = [mx.random.key(4 * b + i) for i in range(4)]   # not split: a gather, built for this probe only
            qkv = (mx.random.normal((b, t, (heads + 2 * kv_heads) * head_dim), key=keys[0]) * 4).astype(dtype)
            ang = mx.random.uniform(0, 60, (b, t, head_dim), key=keys[1])
            cos, sin = mx.cos(ang).astype(dtype), mx.sin(ang).astype(dtype)
            pk, pv = (mx.random.normal((1, kv_heads, p, head_dim), key=kk).astype(dtype) for kk in keys[2:])
            got, want = join(qkv, cos, sin, pk, pv), reference(qkv, cos, sin, pk, pv, heads, kv_heads)
            if any(g.shape != w.shape or not bool(mx.array_equal(g, w)) for g, w in zip(got, want)):
                worst = max((mx.abs(g.astype(mx.float32) - w.astype(mx.float32)).max().item()
                             for g, w in zip(got, want) if g.shape == w.shape), default=float("inf"))
                log.warning("CUDA prefix-join kernel disagrees with the MLX-ops path (max diff %.3g); not used", worst)
                return None
        return join
    except Exception as exc:       # NVRTC missing or failing: the MLX-ops path still works
        log.warning("CUDA prefix-join kernel unavailable (%s: %s); using MLX ops", type(exc).__name__, exc)
        return None
