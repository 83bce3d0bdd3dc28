"""Qwen2.5-VL's windowed attention with its rotary embedding in one CUDA kernel, on tensor cores
(MLX CUDA backend only).

Why (bench/RESULTS.md, fifteenth session, H200 at 1080p): in the 28 windowed blocks of a Qwen2.5-VL
tower, the rotary kernel (workers/mlx/cuda_rotary.py) and then cuDNN's attention over windows of at
most 64 patches took 6.7 ms for little work: per block ~3.5 GFLOP and ~110 MB of memory traffic,
the rotated q and k making a round trip through memory in between. Here one thread block takes one
(window, head): it reads the window's q, k and v from the qkv projection, rotates q and k and rounds
them to bf16 in shared memory (the rotary kernel's arithmetic), and computes the attention with
mma.sync on tensor cores: 3.6-3.8 ms for the same 28 blocks (`python3 -m bench.window_attention_kernel`,
`bench.tower_ops`). Inside the whole forward less of that shows: on one H200 the 3B-Qwen2.5-VL
tower took 37.2 against 38.8 ms, and the 1080p forward 79.3 against 81.5 ms.

The arithmetic is cuDNN's: bf16 operands, float32 accumulation and softmax, the probabilities
rounded to bf16 before they meet v. Its output matched the rotary kernel + cuDNN to a mean
difference of 2.5e-7 on random 1080p inputs (largest 0.03 of values up to 9.9). Where the kernel
cannot be built or disagrees with the MLX-ops path on a probe at load, `load` returns None and the
tower keeps the rotary kernel and cuDNN.
"""
from __future__ import annotations

import logging

import mlx.core as mx

from workers.mlx.cuda_kernel import Kernel
from workers.mlx.cuda_rotary import ROTARY_HELPERS, on_cuda, rotate_qk
from workers.mlx.uncompiled import uncompiled
from workers.mlx.vision import attend

log = logging.getLogger(__name__)

WINDOW_MAX = 64       # tokens per window: 8 x 8 patches (112-pixel windows of 14-pixel patches)

BF16_HELPERS = """
__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
    return (unsigned int)bf16_bits(lo) | ((unsigned int)bf16_bits(hi) << 16);
}
"""

# mma.sync m16n8k16 (bf16 in, float32 accumulate), four warps of 16 query rows each, the scores'
# accumulator fragments reused as the probabilities' operand (as flash-attention does), the probabilities rounded to bf16 before meeting v (as cuDNN does). Shared
# rows padded (88 and 72 elements) so that each fragment load hits 32 distinct banks; v is stored
# transposed so its operand pairs are adjacent. Rows and keys past a window's size are zeros in
# shared memory and masked out of the softmax.
_HEADER = BF16_HELPERS + ROTARY_HELPERS + """
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
"""

_SOURCE = """
    constexpr int D = 2 * HALF;
    constexpr int QS = D + 8;                              // shared row stride of q and k
    constexpr int VS = WMAX + 8;                           // shared row stride of v transposed
    const int w = blockIdx.x / HEADS;
    const int h = blockIdx.x % HEADS;
    const int start = win_start[w];
    const int size = win_size[w];
    const int t = threadIdx.x;
    const int64_t stride = 3 * HEADS * D;                  // a qkv row: [3, H, D]
    __shared__ __align__(16) unsigned short qs[WMAX * QS];
    __shared__ __align__(16) unsigned short ks[WMAX * QS];
    __shared__ __align__(16) unsigned short vt[D * VS];
    for (int i = t; i < WMAX * HALF; i += blockDim.x) {
        const int r = i / HALF, d = i % HALF;
        unsigned short q1b = 0, q2b = 0, k1b = 0, k2b = 0, v1b = 0, v2b = 0;
        if (r < size) {
            const int64_t n = start + r;
            const int64_t base = n * stride + h * D + d;
            const float c = cos[n * HALF + d];
            const float s = sin[n * HALF + d];
            const float q1 = static_cast<float>(qkv[base]);
            const float q2 = static_cast<float>(qkv[base + HALF]);
            const float k1 = static_cast<float>(qkv[base + HEADS * D]);
            const float k2 = static_cast<float>(qkv[base + HEADS * D + HALF]);
            q1b = bf16_bits(rotary_first(q1, q2, c, s));
            q2b = bf16_bits(rotary_second(q1, q2, c, s));
            k1b = bf16_bits(rotary_first(k1, k2, c, s));
            k2b = bf16_bits(rotary_second(k1, k2, c, s));
            v1b = qkv[base + 2 * HEADS * D].bits;
            v2b = qkv[base + 2 * HEADS * D + HALF].bits;
        }
        qs[r * QS + d] = q1b;
        qs[r * QS + d + HALF] = q2b;
        ks[r * QS + d] = k1b;
        ks[r * QS + d + HALF] = k2b;
        vt[d * VS + r] = v1b;
        vt[(d + HALF) * VS + r] = v2b;
    }
    __syncthreads();
    const int lane = t & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int r0 = (t >> 5) * 16;                          // this warp's 16 query rows
    if (r0 >= size) return;
    const unsigned* q32 = reinterpret_cast<const unsigned*>(qs);
    const unsigned* k32 = reinterpret_cast<const unsigned*>(ks);
    const unsigned* v32 = reinterpret_cast<const unsigned*>(vt);
    float sacc[WMAX / 8][4];
    #pragma unroll
    for (int n = 0; n < WMAX / 8; ++n) { sacc[n][0] = 0.0f; sacc[n][1] = 0.0f; sacc[n][2] = 0.0f; sacc[n][3] = 0.0f; }
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        unsigned a[4];
        a[0] = q32[((r0 + g) * QS + kk * 16 + 2 * tq) / 2];
        a[1] = q32[((r0 + g + 8) * QS + kk * 16 + 2 * tq) / 2];
        a[2] = q32[((r0 + g) * QS + kk * 16 + 8 + 2 * tq) / 2];
        a[3] = q32[((r0 + g + 8) * QS + kk * 16 + 8 + 2 * tq) / 2];
        #pragma unroll
        for (int n = 0; n < WMAX / 8; ++n) {
            const unsigned b0 = k32[((n * 8 + g) * QS + kk * 16 + 2 * tq) / 2];
            const unsigned b1 = k32[((n * 8 + g) * QS + kk * 16 + 8 + 2 * tq) / 2];
            mma16816(sacc[n], a, b0, b1);
        }
    }
    const float ninf = __int_as_float(0xff800000);
    const float sl2 = scale[0] * 1.4426950408889634f;
    float m0 = ninf, m1 = ninf;                            // rows g and g + 8
    #pragma unroll
    for (int n = 0; n < WMAX / 8; ++n) {
        const int key = n * 8 + 2 * tq;
        if (key >= size) { sacc[n][0] = ninf; sacc[n][2] = ninf; }
        if (key + 1 >= size) { sacc[n][1] = ninf; sacc[n][3] = ninf; }
        m0 = fmaxf(m0, fmaxf(sacc[n][0], sacc[n][1]));
        m1 = fmaxf(m1, fmaxf(sacc[n][2], sacc[n][3]));
    }
    m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 1));
    m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 2));
    m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 1));
    m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 2));
    float l0 = 0.0f, l1 = 0.0f;
    unsigned p[WMAX / 16][4];
    #pragma unroll
    for (int n = 0; n < WMAX / 8; ++n) {
        const float p00 = exp2f((sacc[n][0] - m0) * sl2), p01 = exp2f((sacc[n][1] - m0) * sl2);
        const float p10 = exp2f((sacc[n][2] - m1) * sl2), p11 = exp2f((sacc[n][3] - m1) * sl2);
        l0 += p00 + p01;
        l1 += p10 + p11;
        p[n / 2][(n & 1) * 2] = pack2(p00, p01);
        p[n / 2][(n & 1) * 2 + 1] = pack2(p10, p11);
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    float oacc[D / 8][4];
    #pragma unroll
    for (int n = 0; n < D / 8; ++n) { oacc[n][0] = 0.0f; oacc[n][1] = 0.0f; oacc[n][2] = 0.0f; oacc[n][3] = 0.0f; }
    #pragma unroll
    for (int kk = 0; kk < WMAX / 16; ++kk) {
        #pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            const unsigned b0 = v32[((n * 8 + g) * VS + kk * 16 + 2 * tq) / 2];
            const unsigned b1 = v32[((n * 8 + g) * VS + kk * 16 + 8 + 2 * tq) / 2];
            mma16816(oacc[n], p[kk], b0, b1);
        }
    }
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    unsigned* o32 = reinterpret_cast<unsigned*>(out);
    #pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        const int64_t col = h * D + n * 8 + 2 * tq;
        if (r0 + g < size)
            o32[((start + r0 + g) * (int64_t)(HEADS * D) + col) / 2] = pack2(oacc[n][0] * inv0, oacc[n][1] * inv0);
        if (r0 + g + 8 < size)
            o32[((start + r0 + g + 8) * (int64_t)(HEADS * D) + col) / 2] = pack2(oacc[n][2] * inv1, oacc[n][3] * inv1);
    }
"""



class CudaWindowAttention:
    """qkv [N, 3*H*D] (the projection's output, tokens in window order), cos/sin [N, D/2] float32,
    window starts and sizes (int32, each window at most WINDOW_MAX tokens) -> attention output
    [N, H*D] bf16, token-major (what the output projection takes)."""

    name, source, header = "vit_window_attention", _SOURCE, _HEADER
    threads = 32 * WINDOW_MAX // 16                             # a warp per 16 query rows

    def __init__(self, heads: int, head_dim: int, scale: float):
        self.heads, self.half = heads, head_dim // 2
        self.scale = mx.array([scale], dtype=mx.float32)
        self.kernel = Kernel(self.name, ["qkv", "cos", "sin", "win_start", "win_size", "scale"], ["out"],
                             self.source, self.header)

    def __call__(self, qkv: mx.array, cos: mx.array, sin: mx.array, starts: mx.array, sizes: mx.array) -> mx.array:
        threads = self.threads
        (out,) = self.kernel(inputs=[qkv, cos, sin, starts, sizes, self.scale],
                             template=[("T", qkv.dtype), ("HEADS", self.heads), ("HALF", self.half),
                                       ("WMAX", WINDOW_MAX)],
                             grid=(starts.shape[0] * self.heads * threads, 1, 1), threadgroup=(threads, 1, 1),
                             output_shapes=[(qkv.shape[0], 2 * self.heads * self.half)], output_dtypes=[qkv.dtype])
        return out


def windows(spans) -> tuple[mx.array, mx.array]:
    """Attention spans [(first token, windows, tokens each)] -> each window's first token and size."""
    starts, sizes = [], []
    for start, count, size in spans:
        starts += [start + c * size for c in range(count)]
        sizes += [size] * count
    return mx.array(starts, dtype=mx.int32), mx.array(sizes, dtype=mx.int32)


def reference(qkv: mx.array, cos: mx.array, sin: mx.array, spans, heads: int, scale: float) -> mx.array:
    """The same with MLX ops, as the tower runs it elsewhere: the rotary (`rotate_qk`), then
    `attend` over the spans -> [N, H*D]."""
    n = qkv.shape[0]
    t = qkv.reshape(n, 3, heads, qkv.shape[1] // (3 * heads))
    q, k = rotate_qk(t, cos, sin)
    return attend(q, k, t[:, 2], spans, scale)

def load(heads: int, head_dim: int, scale: float, dtype: mx.Dtype, window_tokens: int) -> CudaWindowAttention | None:
    """The kernel if MLX runs on CUDA, the model is bf16, the head and the windows fit it, and it
    matches the MLX-ops path on a probe (windows of 64, 48, 16 and 12 tokens); else None."""
    if not on_cuda() or dtype != mx.bfloat16 or head_dim % 16 or window_tokens > WINDOW_MAX:
        return None
    try:
        att = CudaWindowAttention(heads, head_dim, scale)
        spans = [(0, 5, 64), (320, 3, 48), (464, 2, 16), (496, 1, 12)]
        n = 508
        qkv = (mx.random.normal((n, 3 * heads * head_dim), key=mx.random.key(0)) * 2).astype(dtype)
        ang = mx.random.uniform(0, 60, (n, head_dim // 2), key=mx.random.key(1))
        cos, sin = mx.cos(ang), mx.sin(ang)
        got = att(qkv, cos, sin, *windows(spans)).astype(mx.float32)
        with uncompiled():       # built for this probe only (workers/mlx/uncompiled.py)
            want = reference(qkv, cos, sin, spans, heads, scale).astype(mx.float32)
        diff = mx.abs(got - want)
        # bf16 rounding apart (q and k rotated with or without fused multiply-adds, probabilities)
        tol = mx.abs(want) * 2.0 ** -5 + 2.0 ** -6 * mx.abs(want).max()
        if got.shape != want.shape or not bool(mx.all(diff <= tol)):
            log.warning("CUDA window attention kernel disagrees with the MLX-ops path (max diff %.3g); not used",
                        diff.max().item())
            return None
        return att
    except Exception as exc:       # NVRTC missing or failing: the rotary kernel and cuDNN still work
        log.warning("CUDA window attention kernel unavailable (%s: %s); using cuDNN", type(exc).__name__, exc)
        return None
