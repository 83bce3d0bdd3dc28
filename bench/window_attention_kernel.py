"""Qwen2.5-VL's window attention with the rotary embedding in one CUDA kernel: tried, not kept.

`bench.tower_ops` times it against what the tower runs (the rotary kernel, then cuDNN's attention
per run of same-size windows). The idea: in the 28 windowed blocks of a Qwen2.5-VL tower at 1080p,
those two took ~7.3 ms (H200) for little work, ~3.5 GFLOP and ~110 MB of memory traffic per
block. Here one thread block takes one (window, head): it reads the window's q, k and v from the
qkv projection, rotates q and k and rounds them to bf16 (workers/mlx/cuda_rotary.py's arithmetic),
and computes softmax(q k^T * scale) v in float32 from shared memory, two threads per query row.
Measured on an H200 (bench/RESULTS.md, fifteenth session): 6.88 ms for 28 blocks against 8.10 ms
for the rotary kernel + cuDNN, bf16-rounding apart (max |diff| 0.0156), but the whole tower was
not faster with it wired in (40.65 against 38.74 ms). Not worth more device time then; kept here so the
finding can be rerun.
"""
from __future__ import annotations

import mlx.core as mx

from workers.mlx.cuda_rotary import kernel_name

WINDOW_MAX = 64       # tokens per window: 8 x 8 patches (112-pixel windows of 14-pixel patches)

# Two threads per query row, each owning half of the head's dims (HALF = D / 2), which is also
# how the rotary pairs them: element d rotates with d + HALF. Shared memory holds the window's
# rotated q and k and its v as bf16 bits, read 8 at a time, and each row's scores in float32 (rows
# padded by one against bank conflicts): 3 * 64 * 80 * 2 + 64 * 65 * 4 = 47,360 bytes at D = 80,
# under the 48 KB of static shared memory. bf16 only (the unpacking below is bf16's layout).
_HEADER = """
__device__ __forceinline__ void unpack8(const uint4 u, float* f) {
    f[0] = __uint_as_float(u.x << 16); f[1] = __uint_as_float(u.x & 0xffff0000u);
    f[2] = __uint_as_float(u.y << 16); f[3] = __uint_as_float(u.y & 0xffff0000u);
    f[4] = __uint_as_float(u.z << 16); f[5] = __uint_as_float(u.z & 0xffff0000u);
    f[6] = __uint_as_float(u.w << 16); f[7] = __uint_as_float(u.w & 0xffff0000u);
}
__device__ __forceinline__ unsigned short bf16_bits(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
    return (unsigned int)bf16_bits(lo) | ((unsigned int)bf16_bits(hi) << 16);
}
"""

_SOURCE = """
    constexpr int D = 2 * HALF;
    const int w = blockIdx.x / HEADS;
    const int h = blockIdx.x % HEADS;
    const int start = win_start[w];
    const int size = win_size[w];
    const int t = threadIdx.x;
    const int64_t stride = 3 * HEADS * D;                  // a qkv row: [3, H, D]
    __shared__ __align__(16) unsigned short qs[WMAX * D];
    __shared__ __align__(16) unsigned short ks[WMAX * D];
    __shared__ __align__(16) unsigned short vs[WMAX * D];
    __shared__ float ss[WMAX * (WMAX + 1)];
    for (int i = t; i < size * HALF; i += blockDim.x) {
        const int r = i / HALF, d = i % HALF;
        const int64_t n = start + r;
        const int64_t base = n * stride + h * D + d;
        const float c = cos[n * HALF + d];
        const float s = sin[n * HALF + d];
        const float q1 = static_cast<float>(qkv[base]);
        const float q2 = static_cast<float>(qkv[base + HALF]);
        const float k1 = static_cast<float>(qkv[base + HEADS * D]);
        const float k2 = static_cast<float>(qkv[base + HEADS * D + HALF]);
        qs[r * D + d] = bf16_bits(__fadd_rn(__fmul_rn(q1, c), -__fmul_rn(q2, s)));
        qs[r * D + d + HALF] = bf16_bits(__fadd_rn(__fmul_rn(q2, c), __fmul_rn(q1, s)));
        ks[r * D + d] = bf16_bits(__fadd_rn(__fmul_rn(k1, c), -__fmul_rn(k2, s)));
        ks[r * D + d + HALF] = bf16_bits(__fadd_rn(__fmul_rn(k2, c), __fmul_rn(k1, s)));
        vs[r * D + d] = __bfloat16_as_ushort(qkv[base + 2 * HEADS * D]);
        vs[r * D + d + HALF] = __bfloat16_as_ushort(qkv[base + 2 * HEADS * D + HALF]);
    }
    __syncthreads();
    const int row = t >> 1;
    const int off = (t & 1) * HALF;
    const bool live = row < size;
    float q[HALF];
    #pragma unroll
    for (int c = 0; c < HALF / 8; ++c) {
        if (live) {
            unpack8(*reinterpret_cast<const uint4*>(qs + row * D + off + c * 8), q + c * 8);
        } else {
            #pragma unroll
            for (int e = 0; e < 8; ++e) q[c * 8 + e] = 0.0f;
        }
    }
    const float sc = scale[0];
    float m = __int_as_float(0xff800000);                  // -inf
    for (int j = 0; j < size; ++j) {
        const uint4* kr = reinterpret_cast<const uint4*>(ks + j * D + off);
        float part = 0.0f;
        #pragma unroll
        for (int c = 0; c < HALF / 8; ++c) {
            float kf[8];
            unpack8(kr[c], kf);
            #pragma unroll
            for (int e = 0; e < 8; ++e) part = fmaf(q[c * 8 + e], kf[e], part);
        }
        const float s = (part + __shfl_xor_sync(0xffffffffu, part, 1)) * sc;   // the pair's sum, same in both
        ss[row * (WMAX + 1) + j] = s;
        m = fmaxf(m, s);
    }
    float o[HALF];
    #pragma unroll
    for (int i = 0; i < HALF; ++i) o[i] = 0.0f;
    float l = 0.0f;
    for (int j = 0; j < size; ++j) {
        const float p = expf(ss[row * (WMAX + 1) + j] - m);
        l += p;
        const uint4* vr = reinterpret_cast<const uint4*>(vs + j * D + off);
        #pragma unroll
        for (int c = 0; c < HALF / 8; ++c) {
            float vf[8];
            unpack8(vr[c], vf);
            #pragma unroll
            for (int e = 0; e < 8; ++e) o[c * 8 + e] = fmaf(p, vf[e], o[c * 8 + e]);
        }
    }
    if (live) {
        uint4* dst = reinterpret_cast<uint4*>(out + (int64_t)(start + row) * HEADS * D + h * D + off);
        #pragma unroll
        for (int c = 0; c < HALF / 8; ++c) {
            uint4 u;
            u.x = pack2(o[c * 8 + 0] / l, o[c * 8 + 1] / l);
            u.y = pack2(o[c * 8 + 2] / l, o[c * 8 + 3] / l);
            u.z = pack2(o[c * 8 + 4] / l, o[c * 8 + 5] / l);
            u.w = pack2(o[c * 8 + 6] / l, o[c * 8 + 7] / l);
            dst[c] = u;
        }
    }
"""


class CudaWindowAttention:
    """qkv [N, 3*H*D] (the projection's output, tokens in window order), cos/sin [N, D/2] float32,
    window starts and sizes (int32, each window at most WINDOW_MAX tokens) -> attention output
    [N, H*D] in the model dtype, token-major (what the output projection takes)."""

    def __init__(self, heads: int, head_dim: int, scale: float):
        self.heads, self.half = heads, head_dim // 2
        self.scale = mx.array([scale], dtype=mx.float32)
        self.kernel = mx.fast.cuda_kernel(name=kernel_name("vit_window_attention", _SOURCE),
                                          input_names=["qkv", "cos", "sin", "win_start", "win_size", "scale"],
                                          output_names=["out"], source=_SOURCE, header=_HEADER)

    def __call__(self, qkv: mx.array, cos: mx.array, sin: mx.array, starts: mx.array, sizes: mx.array) -> mx.array:
        n = qkv.shape[0]
        threads = 2 * WINDOW_MAX                                   # two per query row
        (out,) = self.kernel(inputs=[qkv, cos, sin, starts, sizes, self.scale],
                             template=[("T", qkv.dtype), ("HEADS", self.heads), ("HALF", self.half),
                                       ("WMAX", WINDOW_MAX)],
                             grid=(starts.shape[0] * self.heads * threads, 1, 1), threadgroup=(threads, 1, 1),
                             output_shapes=[(n, 2 * self.heads * self.half)], output_dtypes=[qkv.dtype])
        return out


def windows(spans) -> tuple[mx.array, mx.array]:
    """Attention spans [(first token, windows, tokens each)] -> each window's first token and size."""
    starts, sizes = [], []
    for start, count, size in spans:
        starts += [start + c * size for c in range(count)]
        sizes += [size] * count
    return mx.array(starts, dtype=mx.int32), mx.array(sizes, dtype=mx.int32)
