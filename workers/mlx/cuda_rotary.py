"""The ViT's 2D rotary embedding on q and k in one CUDA kernel (MLX CUDA backend only).

Why (bench/RESULTS.md, `bench.vit_ops` on an H100 at 1080p): the rotary written with MLX ops
(float32 upcast, `rotate_half`'s split and concatenate, even compiled) took 10.3 ms over the 32
blocks, at 360 GB/s; this kernel reads q and k once from the qkv projection and writes them
rotated, at ~1.2 TB/s. It keeps the projection's token-major layout ([N, H, D] per tensor): cuDNN's
attention reads that layout in place and writes its output in the same order, so the output
projection needs no transposing copy either (a head-major [H, N, D] output was measured slower).

Same arithmetic as the reference (transformers' `apply_rotary_pos_emb_vision`): upcast to float32,
q*cos + rotate_half(q)*sin, round to the model dtype; multiply and add each rounded
(`__fmul_rn`/`__fadd_rn`, so no fused multiply-add changes the low bits). Where the kernel cannot
be built or disagrees with the MLX-ops path on a probe, `load` returns None and the caller keeps
the MLX-ops path.
"""
from __future__ import annotations

import logging

import mlx.core as mx

from workers.mlx.cuda_kernel import Kernel
from workers.mlx.uncompiled import uncompiled

log = logging.getLogger(__name__)

# The rotary of one pair (x1 at d, x2 at d + HALF) in float32, for every kernel that rotates q or
# k: x1*c - x2*s and x2*c + x1*s, each product and the sum rounded on its own (`__fmul_rn`,
# `__fadd_rn`), so that no fused multiply-add changes the low bits.
ROTARY_HELPERS = """
__device__ __forceinline__ float rotary_first(float x1, float x2, float c, float s) {
    return __fadd_rn(__fmul_rn(x1, c), -__fmul_rn(x2, s));
}
__device__ __forceinline__ float rotary_second(float x1, float x2, float c, float s) {
    return __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}
"""

_SOURCE = """
    // one thread per (token n, q or k, head h, pair d / d + HALF), in memory order
    const int64_t n_tok = cos_shape[0];
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n_tok * 2 * HEADS * HALF) return;
    const int d = idx % HALF;
    const int64_t r = idx / HALF;                      // (n * 2 + part) * HEADS + h
    const int64_t n = r / (2 * HEADS);
    const int64_t src = (n * 3 * HEADS + r % (2 * HEADS)) * (2 * HALF) + d;   // qkv [N, 3, H, D]
    const int64_t dst = r * (2 * HALF) + d;                                    // out [N, 2, H, D]
    const float x1 = static_cast<float>(qkv[src]);
    const float x2 = static_cast<float>(qkv[src + HALF]);
    const float c = cos[n * HALF + d];
    const float s = sin[n * HALF + d];
    out[dst] = static_cast<T>(rotary_first(x1, x2, c, s));
    out[dst + HALF] = static_cast<T>(rotary_second(x1, x2, c, s));
"""


class CudaRotary:
    """qkv [N, 3*H*D] (the projection's output), cos/sin [N, D/2] float32 -> rotated q and k
    [N, 2, H, D] (v is the projection's third part, untouched)."""

    def __init__(self, heads: int, head_dim: int):
        self.heads, self.half = heads, head_dim // 2
        self.kernel = Kernel("vit_qkv_rotary", ["qkv", "cos", "sin"], ["out"], _SOURCE, ROTARY_HELPERS)

    def __call__(self, qkv: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        n = qkv.shape[0]
        (out,) = self.kernel(inputs=[qkv, cos, sin],
                             template=[("T", qkv.dtype), ("HEADS", self.heads), ("HALF", self.half)],
                             grid=(n * 2 * self.heads * self.half, 1, 1), threadgroup=(256, 1, 1),
                             output_shapes=[(n, 2, self.heads, 2 * self.half)], output_dtypes=[qkv.dtype])
        return out


def rotate_half(x: mx.array) -> mx.array:
    x1, x2 = mx.split(x, 2, axis=-1)
    return mx.concatenate([-x2, x1], axis=-1)


@mx.compile
def rotate_qk(qkv: mx.array, cos: mx.array, sin: mx.array) -> tuple[mx.array, mx.array]:
    """The same rotary with MLX ops (elsewhere than CUDA, and the kernel's reference): qkv
    [N, 3, H, D], cos/sin [N, D/2] -> q, k [N, H, D], in float32 as transformers does."""
    c = mx.concatenate([cos, cos], axis=-1)[:, None]
    s = mx.concatenate([sin, sin], axis=-1)[:, None]
    qf, kf = qkv[:, 0].astype(mx.float32), qkv[:, 1].astype(mx.float32)
    return ((qf * c + rotate_half(qf) * s).astype(qkv.dtype),
            (kf * c + rotate_half(kf) * s).astype(qkv.dtype))


def reference(qkv: mx.array, cos: mx.array, sin: mx.array, heads: int) -> mx.array:
    """`rotate_qk` in the kernel's input and output layouts: [N, 3*H*D] -> [N, 2, H, D]."""
    n = qkv.shape[0]
    return mx.stack(rotate_qk(qkv.reshape(n, 3, heads, 2 * cos.shape[-1]), cos, sin), axis=1)


def on_cuda() -> bool:
    """Whether MLX's default device is a GPU of its CUDA backend."""
    return hasattr(mx, "cuda") and mx.cuda.is_available() and mx.default_device() == mx.gpu


def load(heads: int, head_dim: int, dtype: mx.Dtype) -> CudaRotary | None:
    """The kernel if MLX runs on CUDA and the kernel matches the MLX-ops path on a probe, else None."""
    if not on_cuda():
        return None
    try:
        rot = CudaRotary(heads, head_dim)
        n = 301
        qkv = (mx.random.normal((n, 3 * heads * head_dim), key=mx.random.key(0)) * 4).astype(dtype)
        ang = mx.random.uniform(0, 60, (n, head_dim // 2), key=mx.random.key(1))
        cos, sin = mx.cos(ang), mx.sin(ang)
        got = rot(qkv, cos, sin)
        with uncompiled():       # built for this probe only (workers/mlx/uncompiled.py)
            want = reference(qkv, cos, sin, heads)
        diff = mx.abs(got.astype(mx.float32) - want.astype(mx.float32))
        # one unit in the last place of the model dtype at most (fma contraction in the MLX path)
        tol = mx.abs(want.astype(mx.float32)) * (2.0 ** -7 if dtype == mx.bfloat16 else 2.0 ** -10) + 1e-6
        if got.shape != want.shape or not bool(mx.all(diff <= tol)):
            log.warning("CUDA rotary kernel disagrees with the MLX-ops path (max diff %.3g); not used",
                        diff.max().item())
            return None
        return rot
    except Exception as exc:       # NVRTC missing or failing: the MLX-ops path still works
        log.warning("CUDA rotary kernel unavailable (%s: %s); using MLX ops", type(exc).__name__, exc)
        return None
