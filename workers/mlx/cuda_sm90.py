"""Hopper (sm_90a) device code that more than one attention kernel uses: the bulk-copy engine and its
mbarriers, warpgroup matrix multiplies (`wgmma`) and their shared-memory descriptors, and the online
softmax of one tile of scores in wgmma's accumulator layout.

Kernels: workers/mlx/cuda_flash_attention.py (the ViT, bf16) and workers/mlx/cuda_head_attention.py
(the pointer head, float32 as TF32). Both are built by workers/mlx/nvrtc.py for sm_90a.
"""
from __future__ import annotations

import struct

from workers.mlx.cuda_driver import CudaError, Driver
from workers.mlx.cuda_rotary import on_cuda


def on_hopper() -> bool:
    """Whether MLX runs on CUDA and its GPU is a Hopper (sm_90), the one these kernels are built for."""
    if not on_cuda():
        return False
    try:
        return Driver().compute_capability()[0] == 9
    except (OSError, CudaError):            # no libcuda, or no device it can see
        return False


def float_bits(x: float) -> int:
    """`x` as its float32 bits, for a kernel's float scalar: MLX 0.32.4 turns away float scalars
    ("Received float but must be one of bool, int or float")."""
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]

# wgmma's operand types: (PTX type, K of one instruction, the immediates after scale-d for each form).
# bf16 takes transpose bits (A K-major, B K-major or MN-major); tf32 takes none (both K-major only).
_TYPES = {
    "bf16": ("bf16", 16, {"ss": "1, 1, 0, 0", "rs_mn": "1, 1, 1"}),
    "tf32": ("tf32", 8, {"ss": "1, 1", "rs": "1, 1"}),
}


def _regs(first: int, count: int) -> str:
    return ", ".join(f"%{i}" for i in range(first, first + count))


def wgmma_ss(n: int, kind: str) -> str:
    """`wgmma_ss_<kind>_n<n>(d, da, db, accumulate)`: D[64 x n] (+)= A B, A and B from shared
    memory, both K-major, float32 accumulators."""
    ptx, k, imm = _TYPES[kind]
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n // 2))
    r = n // 2
    return f"""
__device__ __forceinline__ void wgmma_ss_{kind}_n{n}(float (&d)[{r}], u64 da, u64 db, int accumulate) {{
    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{r + 2}, 0;\\n"
                 "wgmma.mma_async.sync.aligned.m64n{n}k{k}.f32.{ptx}.{ptx} {{{_regs(0, r)}}}, %{r}, %{r + 1}, p, {imm['ss']};\\n}}\\n"
                 : {outs}
                 : "l"(da), "l"(db), "r"(accumulate));
}}
"""


def wgmma_rs(n: int, kind: str, form: str) -> str:
    """`wgmma_<form>_<kind>_n<n>(d, a, db)`: D[64 x n] += A B, A from registers (4 per thread), B from
    shared memory; `form` "rs" (B K-major) or "rs_mn" (B MN-major, bf16 only)."""
    ptx, k, imm = _TYPES[kind]
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n // 2))
    r = n // 2
    return f"""
__device__ __forceinline__ void wgmma_{form}_{kind}_n{n}(float (&d)[{r}], const u32 (&a)[4], u64 db) {{
    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{r + 5}, 0;\\n"
                 "wgmma.mma_async.sync.aligned.m64n{n}k{k}.f32.{ptx}.{ptx} {{{_regs(0, r)}}}, {{{_regs(r, 4)}}}, %{r + 4}, p, {imm[form]};\\n}}\\n"
                 : {outs}
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}}
"""


HELPERS = r"""
typedef unsigned int u32;
typedef unsigned long long u64;
#define NEG_INF __int_as_float(0xff800000)

template <int K> __device__ __forceinline__ void pin(float (&d)[K]) {   // order reads after the waits
    #pragma unroll
    for (int i = 0; i < K; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}
__device__ __forceinline__ u32 smem_addr(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void bar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count));
}
__device__ __forceinline__ void bar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
// bytes copied whole by the bulk-copy engine, completing on the barrier `bar`
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void bar_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bar_wait(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done) {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    }
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory"); }
__device__ __forceinline__ float ex2(float x) { float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
// shared-memory matrix descriptor, no swizzle: lbo and sbo are the bytes between 8-row x 16-byte core
// matrices along K and along M or N (for an MN-major operand: along K and along N)
__device__ __forceinline__ u64 desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32);
}

// Thread 0: `stages` "full" barriers (one arrival: the copier's, with the bytes), `stages` "empty"
// ones (`releasers` arrivals), then q's; the others wait for it at __syncthreads
__device__ __forceinline__ void init_barriers(u32 bars, int stages, u32 releasers) {
    if (threadIdx.x == 0) {
        for (int i = 0; i <= 2 * stages; ++i) bar_init(bars + 8 * i, i >= stages && i < 2 * stages ? releasers : 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
}

struct Row { float m0, m1, l0, l1; };

// O's accumulators zeroed, and a row's running maximum and sum before its first tile
template <int NO> __device__ __forceinline__ Row start_rows(float (&o)[NO]) {
    #pragma unroll
    for (int i = 0; i < NO; ++i) o[i] = 0.0f;
    return Row{NEG_INF, NEG_INF, 0.0f, 0.0f};
}

// O (accumulator layout) rescaled by the online softmax's factors for rows g and g + 8
template <int NO> __device__ __forceinline__ void rescale(float (&o)[NO], float2 f) {
    #pragma unroll
    for (int i = 0; i < NO / 4; ++i) {
        o[4 * i] *= f.x; o[4 * i + 1] *= f.x; o[4 * i + 2] *= f.y; o[4 * i + 3] *= f.y;
    }
}

// The online softmax of one tile's scores (a warpgroup's 64 x 2*NS, wgmma's accumulator layout:
// this thread holds rows g and g + 8 of its warp's 16, columns 8i + 2*t4 and 8i + 2*t4 + 1):
// running maxima and sums updated, the scores turned into probabilities in place; returns the
// factors that rescale what O holds so far (rows g and g + 8). `lim`: this thread's first column
// that is past the last key (keys past it leave the softmax); `sl2`: the scale times log2(e).
template <int NS>
__device__ __forceinline__ float2 online_softmax(int lim, float sl2, float (&s)[NS], Row& r) {
    if (lim < 2 * NS) {
        #pragma unroll
        for (int i = 0; i < NS / 4; ++i) {
            if (i * 8 >= lim) { s[4 * i] = NEG_INF; s[4 * i + 2] = NEG_INF; }
            if (i * 8 + 1 >= lim) { s[4 * i + 1] = NEG_INF; s[4 * i + 3] = NEG_INF; }
        }
    }
    float m0 = r.m0, m1 = r.m1;
    #pragma unroll
    for (int i = 0; i < NS / 4; ++i) {
        m0 = fmaxf(m0, fmaxf(s[4 * i], s[4 * i + 1]));
        m1 = fmaxf(m1, fmaxf(s[4 * i + 2], s[4 * i + 3]));
    }
    m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 1));
    m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 2));
    m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 1));
    m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 2));
    const float c0 = ex2((r.m0 - m0) * sl2), c1 = ex2((r.m1 - m1) * sl2);
    const float b0 = m0 * sl2, b1 = m1 * sl2;
    float l0 = 0.0f, l1 = 0.0f;
    #pragma unroll
    for (int i = 0; i < NS / 4; ++i) {
        s[4 * i] = ex2(fmaf(s[4 * i], sl2, -b0));
        s[4 * i + 1] = ex2(fmaf(s[4 * i + 1], sl2, -b0));
        s[4 * i + 2] = ex2(fmaf(s[4 * i + 2], sl2, -b1));
        s[4 * i + 3] = ex2(fmaf(s[4 * i + 3], sl2, -b1));
        l0 += s[4 * i] + s[4 * i + 1];
        l1 += s[4 * i + 2] + s[4 * i + 3];
    }
    r.m0 = m0; r.m1 = m1;
    r.l0 = r.l0 * c0 + l0;
    r.l1 = r.l1 * c1 + l1;
    return make_float2(c0, c1);
}

// The row sums of a warp's quads added up, and 1 / sum for rows g and g + 8
__device__ __forceinline__ float2 inverse_sums(const Row& r) {
    float l0 = r.l0, l1 = r.l1;
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    return make_float2(1.0f / l0, 1.0f / l1);
}
"""
