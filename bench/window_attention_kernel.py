"""Qwen2.5-VL's windowed rotary + attention in one CUDA kernel on CUDA cores: tried, not kept.

    python3 -m bench.window_attention_kernel [--size 1920x1080] [--reps N]

The first version of what workers/mlx/cuda_window_attention.py now does on tensor cores: one thread
block per (window, head), q and k rotated and rounded to bf16 in shared memory, then
softmax(q k^T * scale) v in float32 with two threads per query row. On an H200 at 1080p it took
6.74-6.88 ms for 28 blocks against 6.66-8.10 ms for the rotary kernel + cuDNN (bench/RESULTS.md,
fifteenth session): no gain on CUDA cores, where each bf16 operand is unpacked before its use. `main`
times it, the server's tensor-core kernel and the rotary kernel + cuDNN side by side.
"""
from __future__ import annotations

from workers.mlx.cuda_rotary import ROTARY_HELPERS
from workers.mlx.cuda_window_attention import BF16_HELPERS, WINDOW_MAX, CudaWindowAttention

# Two threads per query row, each owning half of the head's dims (HALF = D / 2), which is also
# how the rotary pairs them: element d rotates with d + HALF. Shared memory holds the window's
# rotated q and k and its v as bf16 bits, read 8 at a time, and each row's scores in float32 (rows
# padded by one against bank conflicts): 3 * 64 * 80 * 2 + 64 * 65 * 4 = 47,360 bytes at D = 80,
# under the 48 KB of static shared memory. bf16 only (the unpacking below is bf16's layout).
_HEADER = BF16_HELPERS + ROTARY_HELPERS + """
__device__ __forceinline__ void unpack8(const uint4 u, float* f) {
    f[0] = __uint_as_float(u.x << 16); f[1] = __uint_as_float(u.x & 0xffff0000u);
    f[2] = __uint_as_float(u.y << 16); f[3] = __uint_as_float(u.y & 0xffff0000u);
    f[4] = __uint_as_float(u.z << 16); f[5] = __uint_as_float(u.z & 0xffff0000u);
    f[6] = __uint_as_float(u.w << 16); f[7] = __uint_as_float(u.w & 0xffff0000u);
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
        qs[r * D + d] = bf16_bits(rotary_first(q1, q2, c, s));
        qs[r * D + d + HALF] = bf16_bits(rotary_second(q1, q2, c, s));
        ks[r * D + d] = bf16_bits(rotary_first(k1, k2, c, s));
        ks[r * D + d + HALF] = bf16_bits(rotary_second(k1, k2, c, s));
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


class SimtWindowAttention(CudaWindowAttention):
    """The server's kernel's interface and launch, this file's CUDA-core source: two threads per
    query row."""
    name, source, header, threads = "vit_window_attention_simt", _SOURCE, _HEADER, 2 * WINDOW_MAX


def main() -> None:
    """Both kernels (this one and the server's, workers/mlx/cuda_window_attention.py) against the
    rotary kernel + `attend` at one screenshot's windows, 16 heads of 80: largest and mean
    difference, and ms for 28 blocks in one graph."""
    import argparse

    import mlx.core as mx

    from bench.timing import median_ms
    from workers.mlx import cuda_rotary
    from workers.mlx.cuda_window_attention import windows
    from workers.mlx.vision import attend
    from workers.mlx.vision_qwen2_5 import window_layout

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    gh, gw = round(h / 28) * 2, round(w / 28) * 2
    heads, hd, blocks = 16, 80, 28
    n, scale = gh * gw, hd ** -0.5
    spans, start = [], 0
    for groups, count in window_layout(gh, gw, 4)[1]:
        spans.append((start, count, groups * 4))
        start += count * groups * 4
    qkv = (mx.random.normal((n, 3 * heads * hd), key=mx.random.key(0)) * 2).astype(mx.bfloat16)
    ang = mx.random.uniform(0, 60, (n, hd // 2), key=mx.random.key(1))
    cos, sin = mx.cos(ang), mx.sin(ang)
    rot = cuda_rotary.load(heads, hd, mx.bfloat16)

    def tower_way():
        if rot is None:                                            # not CUDA: a check of this script
            q, k = cuda_rotary.rotate_qk(qkv.reshape(n, 3, heads, hd), cos, sin)
        else:
            qk = rot(qkv, cos, sin)
            q, k = qk[:, 0], qk[:, 1]
        return attend(q, k, qkv.reshape(n, 3, heads, hd)[:, 2], spans, scale)

    ref = tower_way().astype(mx.float32)
    print(f"{a.size}: {n} patches, windows {spans}; 28 blocks' worth per timing")
    print(f"rotary kernel + cuDNN (the tower): {median_ms(lambda: [tower_way() for _ in range(blocks)], a.reps):.2f} ms", flush=True)
    wins = windows(spans)
    for cls in (SimtWindowAttention, CudaWindowAttention):
        try:
            k = cls(heads, hd, scale)
            got = k(qkv, cos, sin, *wins).astype(mx.float32)
            diff = mx.abs(got - ref)
            ms = median_ms(lambda: [k(qkv, cos, sin, *wins) for _ in range(blocks)], a.reps)
            print(f"{cls.__name__}: {ms:.2f} ms; max |diff| {diff.max().item():.3g}, mean {diff.mean().item():.3g} "
                  f"(largest value {mx.abs(ref).max().item():.3g})", flush=True)
        except Exception as exc:
            print(f"{cls.__name__}: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
