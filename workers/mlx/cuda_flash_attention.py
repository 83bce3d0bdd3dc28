"""The ViT's full attention on Hopper's warpgroup tensor cores (MLX CUDA backend, sm_90 only).

Why: at one 1080p screenshot, half of the 2B forward was the ViT's attention over 10,764 patches,
16 heads of 80, at ~350-380 TFLOP/s through cuDNN (bench/RESULTS.md); cuDNN runs 128-wide heads
faster, and zero-padding to 96 or 128 lost. This computes attention at D=80 as it stands with
`wgmma`, Hopper's asynchronous warpgroup matrix multiply, which MLX's own kernel compiler cannot
emit (it builds for sm_90; wgmma needs sm_90a): workers/mlx/nvrtc.py builds the cubin and
`mx.fast.precompiled_cuda_kernel` runs it. On an H100 at 1080p (`bench.flash_attention`): 1.24 ms
per block for the rotary and attention, against 1.70-1.78 ms for the rotary kernel and cuDNN.

Two kernels:
- `tiles` rotates q and k exactly as workers/mlx/cuda_rotary.py does and writes q, k and v in
  tiles of 128 tokens, each tile's 20 KB in the order wgmma reads them from shared memory (8x8
  core matrices, no swizzle), rows past N zero (a thread block per tile and head, through shared
  memory: whole rows in, one contiguous run out; 0.10 ms at 1080p, the rotary kernel's 0.08);
- the attention (the flash-attention algorithm): a thread block takes 192 query rows of one head,
  three warpgroups of 64; one thread (of the warpgroup that is last to finish with each tile) copies
  each k/v tile whole with the bulk-copy engine into one of four stages, each with an mbarrier that
  says "full" and one that says "empty"; per tile, a warpgroup issues S = Q K^T and the previous
  tile's O += P V together, runs this tile's online softmax in registers while the second
  multiplies, and rescales O. The warpgroups take turns issuing (named barriers), so one's
  exponentials run while another's products do.

The card's power limit sets its pace: at 1080p an H100 draws its 700 W and lowers its clock to
~1.6 GHz. Moving a share of the exponentials onto the FMA units (FlashAttention-4's way) or
skipping O's rescale where no maximum moved saved nothing measurable (bench/RESULTS.md).

The arithmetic is cuDNN's: bf16 operands, float32 scores, softmax and accumulation, probabilities
rounded to bf16 before they meet v. On random 1080p inputs its output differs from the rotary
kernel + cuDNN by a mean of 7e-7 (largest 0.008 of values up to 4). Where the cubin cannot be built
or disagrees on a probe at load, `load` returns None and the tower keeps the rotary kernel and cuDNN.
"""
from __future__ import annotations

import hashlib
import logging
import os

import mlx.core as mx

from workers.mlx import cuda_sm90, nvrtc
from workers.mlx.cuda_kernel import Kernel
from workers.mlx.cuda_rotary import ROTARY_HELPERS, rotate_qk
from workers.mlx.uncompiled import uncompiled

log = logging.getLogger(__name__)

WARPGROUPS = 3           # of 64 query rows each, in a thread block
BKV = 128                # keys per tile
STAGES = 4               # k/v tiles resident in shared memory
AHEAD = 2                # tiles copied ahead of the one in use (STAGES >= AHEAD + 2)


def source(heads: int, head_dim: int) -> str:
    """The attention kernel's CUDA source for `heads` heads of `head_dim` (80: see `supported`)."""
    prelude = _PRELUDE.format(heads=heads, hd=head_dim, bkv=BKV, stages=STAGES, ahead=AHEAD, wgs=WARPGROUPS)
    return prelude + cuda_sm90.HELPERS + cuda_sm90.wgmma_ss(BKV, "bf16") + cuda_sm90.wgmma_rs(head_dim, "bf16", "rs_mn") + _BODY


_PRELUDE = """
typedef unsigned short bf16_t;
#define HEADS {heads}
#define HD {hd}
#define WGMMA_RS wgmma_rs_mn_bf16_n{hd}
constexpr int BKV = {bkv}, STAGES = {stages}, AHEAD = {ahead};
#ifndef WGS
#define WGS {wgs}                              // warpgroups: WARPGROUPS, unless a variant defines it
#endif
"""

_BODY = r"""
// The warpgroup whose first thread copies the k and v tiles: the last in the ring of turns. It is
// the last to be done with any tile, so a stage is empty by the time it refills it; a copier ahead
// of the others would wait for them there, and hold up its own softmax (1.17 against 1.22 ms at 1080p).
#ifndef PRODUCER
#define PRODUCER (WGS - 1)
#endif
constexpr int BQ = 64 * WGS, NT = 128 * WGS;
constexpr int KC = HD / 8;                      // 16-byte pieces in a row
constexpr int ROWB = KC * 128;                  // bytes between groups of 8 rows in a tile
constexpr int TILE = BKV * HD;                  // elements in a tile of q, k or v
constexpr int TILE_BYTES = TILE * 2;
constexpr int STAGE_BYTES = 2 * TILE_BYTES;     // k tile, then v tile
constexpr int NS = BKV / 2;                     // score registers per thread (64 x BKV per warpgroup)
constexpr int NO = HD / 2;                      // output registers per thread

// the warpgroups take turns at the tensor cores, in a ring: warpgroup w waits at named barrier 1 + w
// for the one before it to pass (256 threads: the 128 waiting and the 128 passing)
__device__ __forceinline__ void turn_wait(int wg) { asm volatile("bar.sync %0, 256;\n" :: "r"(1 + wg) : "memory"); }
__device__ __forceinline__ void turn_pass(int wg) { asm volatile("bar.arrive %0, 256;\n" :: "r"(1 + (wg + 1) % WGS) : "memory"); }
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}

struct Ctx {
    u32 sq, sk0, bars;
    const bf16_t* kg;      // this head's first k tile
    const bf16_t* vg;      // this head's first v tile
    int n;
    float sl2;
};

__device__ __forceinline__ void load_kv(const Ctx& c, int tile) {
    const u32 st = tile % STAGES, base = c.sk0 + st * STAGE_BYTES, bar = c.bars + 8 * st;
    bar_expect(bar, STAGE_BYTES);
    bulk_load(base, c.kg + (long)tile * TILE, TILE_BYTES, bar);
    bulk_load(base + TILE_BYTES, c.vg + (long)tile * TILE, TILE_BYTES, bar);
}

__device__ __forceinline__ void issue_s(const Ctx& c, float (&s)[NS], int tile) {
    const int wg = threadIdx.x >> 7;
    const u32 kb = c.sk0 + (tile % STAGES) * STAGE_BYTES;
    const u32 qb = c.sq + wg * 8 * ROWB;
    wg_fence();
    #pragma unroll
    for (int k = 0; k < HD / 16; ++k)
        wgmma_ss_bf16_n128(s, desc(qb + k * 256, 128, ROWB), desc(kb + k * 256, 128, ROWB), k > 0);
    wg_commit();
}

// v's tile is laid out as k's (rows = keys): for O += P V it is the MN-major (transposed) operand
__device__ __forceinline__ void issue_pv(const Ctx& c, float (&o)[NO], const u32 (&p)[BKV / 16][4], int tile) {
    const u32 vb = c.sk0 + (tile % STAGES) * STAGE_BYTES + TILE_BYTES;
    wg_fence();
    #pragma unroll
    for (int k = 0; k < BKV / 16; ++k) WGMMA_RS(o, p[k], desc(vb + k * 2 * ROWB, ROWB, 128));
    wg_commit();
}

// The online softmax of tile j's scores (keys past n leave it)
__device__ __forceinline__ float2 softmax(const Ctx& c, int j, float (&s)[NS], Row& r) {
    return online_softmax(c.n - j * BKV - 2 * (threadIdx.x & 3), c.sl2, s, r);
}

// P as wgmma's A operand: the scores' accumulator layout is the A fragments' layout, rounded to bf16
__device__ __forceinline__ void pack_p(const float (&s)[NS], u32 (&p)[BKV / 16][4]) {
    #pragma unroll
    for (int k = 0; k < BKV / 16; ++k) {
        p[k][0] = pack_bf16(s[8 * k], s[8 * k + 1]);
        p[k][1] = pack_bf16(s[8 * k + 2], s[8 * k + 3]);
        p[k][2] = pack_bf16(s[8 * k + 4], s[8 * k + 5]);
        p[k][3] = pack_bf16(s[8 * k + 6], s[8 * k + 7]);
    }
}

// Tile j after tile j - 1 (FlashAttention-3's order within a warpgroup): S_j and O += P_{j-1} V_{j-1}
// go to the tensor cores together; S_j's softmax runs while the second is still multiplying. Every
// iteration ends with nothing in flight: ptxas serializes wgmma whose registers stay in flight
// across a loop's back edge.
extern "C" __global__ void __launch_bounds__(NT, 1)
KNAME(const bf16_t* tiles, bf16_t* out, int n, int sl2_bits) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int ntiles = (n + BKV - 1) / BKV, qblocks = (n + BQ - 1) / BQ;
    const int h = blockIdx.x / qblocks, q0 = (blockIdx.x % qblocks) * BQ;
    Ctx c;
    c.sq = smem_addr(smem);
    c.sk0 = c.sq + BQ * HD * 2;
    c.bars = c.sk0 + STAGES * STAGE_BYTES;         // STAGES "full", STAGES "empty", then q's
    c.kg = tiles + (long)(HEADS + h) * ntiles * TILE;
    c.vg = tiles + (long)(2 * HEADS + h) * ntiles * TILE;
    c.n = n; c.sl2 = __int_as_float(sl2_bits);
    const u32 qbar = c.bars + 16 * STAGES, empty = c.bars + 8 * STAGES;
    const int wg = threadIdx.x >> 7;
    init_barriers(c.bars, STAGES, WGS);
    if (threadIdx.x == 0) {
        // each warpgroup's 64 rows of q: half a tile, contiguous (row groups 0-7 or 8-15)
        const int halves = min(WGS, 2 * ntiles - q0 / 64);
        bar_expect(qbar, halves * TILE_BYTES / 2);
        for (int w = 0; w < halves; ++w)
            bulk_load(c.sq + w * TILE_BYTES / 2, tiles + ((long)h * ntiles) * TILE + (long)(q0 + 64 * w) * HD,
                      TILE_BYTES / 2, qbar);
        for (int t = 0; t <= AHEAD && t < ntiles; ++t) load_kv(c, t);
    }

    float s[NS], o[NO];
    u32 p[BKV / 16][4];
    Row r = start_rows(o);
    bar_wait(qbar, 0);
    bar_wait(c.bars, 0);
    issue_s(c, s, 0);
    wg_wait<0>();
    pin(s);
    softmax(c, 0, s, r);
    pack_p(s, p);
    if (wg == WGS - 1) turn_pass(wg);  // warpgroup 0 goes first
    for (int j = 1; j < ntiles; ++j) {
        bar_wait(c.bars + 8 * (j % STAGES), (j / STAGES) & 1);
        turn_wait(wg);
        issue_s(c, s, j);
        issue_pv(c, o, p, j - 1);
        turn_pass(wg);
        if (threadIdx.x == 128 * PRODUCER && j + AHEAD < ntiles) {   // tile j - 2's stage, once every warpgroup let it go
            const int t = j + AHEAD;
            if (t >= STAGES) bar_wait(empty + 8 * (t % STAGES), ((t / STAGES) & 1) ^ 1);
            load_kv(c, t);
        }
        wg_wait<1>();
        pin(s);
        const float2 f = softmax(c, j, s, r);
        wg_wait<0>();
        pin(o);
        if ((threadIdx.x & 127) == 0) bar_arrive(empty + 8 * ((j - 1) % STAGES));   // tile j - 1 is used up
        rescale(o, f);
        pack_p(s, p);
    }
    if (wg == 0 && ntiles > 1) turn_wait(wg);     // the last warpgroup's last pass, so none is left pending
    issue_pv(c, o, p, ntiles - 1);
    wg_wait<0>();
    pin(o);

    const float2 inv = inverse_sums(r);
    const float i0 = inv.x, i1 = inv.y;
    const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int row = q0 + (threadIdx.x >> 5) * 16 + g;    // warp w of the block: rows 16w..16w+15
    u32* o32 = reinterpret_cast<u32*>(out);
    #pragma unroll
    for (int i = 0; i < NO / 4; ++i) {
        const long col = h * HD + i * 8 + 2 * t4;
        if (row < n) o32[((long)row * (HEADS * HD) + col) / 2] = pack_bf16(o[4 * i] * i0, o[4 * i + 1] * i0);
        if (row + 8 < n) o32[((long)(row + 8) * (HEADS * HD) + col) / 2] = pack_bf16(o[4 * i + 2] * i1, o[4 * i + 3] * i1);
    }
}
"""


_TILES_SOURCE = """
    // a thread block per (part, head, tile): the tile's rows of this head come in row by row
    // (whole 160-byte rows from global memory), go out piece by piece in wgmma's order (one
    // contiguous 20 KB run)
    constexpr int KC = HALF / 4;                          // 16-byte pieces in a row of one head
    constexpr int PIECES = ROWS * KC;
    __shared__ uint4 rows[PIECES];
    const int64_t n_tok = cos_shape[0];
    const int ntiles = (n_tok + ROWS - 1) / ROWS;         // not a template argument: no new build per size
    const int tile = blockIdx.x % ntiles;
    const int ph = blockIdx.x / ntiles;                   // part * HEADS + head
    const T* src = qkv + ph * (2 * HALF);
    for (int i = threadIdx.x; i < PIECES; i += blockDim.x) {
        const int64_t n = (int64_t)tile * ROWS + i / KC;
        rows[i] = n < n_tok ? *reinterpret_cast<const uint4*>(src + n * (3 * HEADS * 2 * HALF) + (i % KC) * 8)
                            : make_uint4(0, 0, 0, 0);
    }
    __syncthreads();
    uint4* dst = reinterpret_cast<uint4*>(out) + (int64_t)blockIdx.x * PIECES;
    for (int o = threadIdx.x; o < PIECES; o += blockDim.x) {
        const int r = (o / (8 * KC)) * 8 + o % 8, c = (o / 8) % KC;
        const int64_t n = (int64_t)tile * ROWS + r;
        uint4 w = rows[r * KC + c];
        if (ph < 2 * HEADS && n < n_tok) {                // q and k: the rotary, as cuda_rotary does it
            const bool first = c < KC / 2;
            const uint4 pw = rows[r * KC + (first ? c + KC / 2 : c - KC / 2)];
            const int d0 = (first ? c : c - KC / 2) * 8;
            float cs[8], sn[8];
            *reinterpret_cast<float4*>(cs) = *reinterpret_cast<const float4*>(cos + n * HALF + d0);
            *reinterpret_cast<float4*>(cs + 4) = *reinterpret_cast<const float4*>(cos + n * HALF + d0 + 4);
            *reinterpret_cast<float4*>(sn) = *reinterpret_cast<const float4*>(sin + n * HALF + d0);
            *reinterpret_cast<float4*>(sn + 4) = *reinterpret_cast<const float4*>(sin + n * HALF + d0 + 4);
            const T* x = reinterpret_cast<const T*>(&w);
            const T* y = reinterpret_cast<const T*>(&pw);
            uint4 res;
            T* rot = reinterpret_cast<T*>(&res);
            #pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float a = static_cast<float>(x[e]), b = static_cast<float>(y[e]);
                // a is the element, b its partner: (x1, x2) = (a, b) in the first half, (b, a) in the second
                rot[e] = static_cast<T>(first ? rotary_first(a, b, cs[e], sn[e]) : rotary_second(b, a, cs[e], sn[e]));
            }
            w = res;
        }
        dst[o] = w;
    }
"""


TILER = Kernel("vit_flash_tiles", ["qkv", "cos", "sin"], ["out"], _TILES_SOURCE, ROTARY_HELPERS)


def smem_bytes(head_dim: int, warpgroups: int) -> int:
    return 64 * warpgroups * head_dim * 2 + STAGES * 2 * BKV * head_dim * 2 + 8 * (2 * STAGES + 1)


class CudaFlashAttention:
    """qkv [N, 3*H*D] (the projection's output) and the rotary tables cos, sin [N, D/2] float32 ->
    attention over all N tokens, [N, H*D] bf16, token-major (what the output projection takes).
    `defines` are the source's compile-time switches (bench.flash_attention compares them)."""

    def __init__(self, heads: int, head_dim: int, scale: float, defines: dict | None = None):
        self.heads, self.head_dim = heads, head_dim
        self.warpgroups = (defines or {}).get("WGS", WARPGROUPS)
        src = source(heads, head_dim)
        flags = [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
        self.name = f"vit_flash_sm90_{hashlib.sha256((src + repr(flags)).encode()).hexdigest()[:12]}"
        self.cubin, self.log = nvrtc.cached_cubin(src, "sm_90a", flags + [f"-DKNAME={self.name}", "--ptxas-options=-v"])
        self.sl2_bits = cuda_sm90.float_bits(scale * 1.4426950408889634)    # the scale times log2(e)

    def tiles(self, qkv: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        """[3, H, T, 128*D]: rotated q, rotated k, v, in the attention kernel's tiles."""
        n, hd = qkv.shape[0], self.head_dim
        t = -(-n // BKV)
        (out,) = TILER(inputs=[qkv, cos, sin],
                       template=[("T", qkv.dtype), ("HEADS", self.heads), ("HALF", hd // 2), ("ROWS", BKV)],
                       grid=(3 * self.heads * t * 256, 1, 1), threadgroup=(256, 1, 1),
                       output_shapes=[(3, self.heads, t, BKV * hd)], output_dtypes=[qkv.dtype])
        return out

    def attend(self, tiles: mx.array, n: int) -> mx.array:
        wgs = self.warpgroups
        (out,) = mx.fast.precompiled_cuda_kernel(
            name=self.name, compiled_source=self.cubin, inputs=[tiles],
            output_shapes=[(n, self.heads * self.head_dim)], output_dtypes=[mx.bfloat16],
            scalars=[n, self.sl2_bits], grid=(-(-n // (64 * wgs)) * self.heads * 128 * wgs, 1, 1),
            threadgroup=(128 * wgs, 1, 1), shared_memory=smem_bytes(self.head_dim, wgs))
        return out

    def __call__(self, qkv: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        return self.attend(self.tiles(qkv, cos, sin), qkv.shape[0])


def reference(qkv: mx.array, cos: mx.array, sin: mx.array, heads: int, scale: float) -> mx.array:
    """The same with MLX ops, as the tower runs it elsewhere: the rotary (`rotate_qk`), then cuDNN
    (or MLX's attention) over all N tokens -> [N, H*D]."""
    from workers.mlx.vision import attend       # vision imports this module
    n = qkv.shape[0]
    t = qkv.reshape(n, 3, heads, qkv.shape[1] // (3 * heads))
    q, k = rotate_qk(t, cos, sin)
    return attend(q, k, t[:, 2], [(0, 1, n)], scale)


def supported(head_dim: int, dtype: mx.Dtype) -> bool:
    """Whether MLX runs on a Hopper GPU (sm_90), the model is what the kernel is written for, and
    GROUNDING_FLASH_ATTENTION=0 is not in the environment (the switch back to cuDNN)."""
    if os.environ.get("GROUNDING_FLASH_ATTENTION") == "0":
        return False
    return dtype == mx.bfloat16 and head_dim == 80 and cuda_sm90.on_hopper()


def load(heads: int, head_dim: int, scale: float, dtype: mx.Dtype) -> CudaFlashAttention | None:
    """The kernels if `supported` and they match the MLX-ops path on a probe (300 and 1000 tokens:
    one partial tile and several), else None."""
    if not supported(head_dim, dtype):
        return None
    try:
        att = CudaFlashAttention(heads, head_dim, scale)
        for n in (300, 1000):
            qkv = (mx.random.normal((n, 3 * heads * head_dim), key=mx.random.key(n)) * 2).astype(dtype)
            ang = mx.random.uniform(0, 60, (n, head_dim // 2), key=mx.random.key(n + 1))
            cos, sin = mx.cos(ang), mx.sin(ang)
            got = att(qkv, cos, sin).astype(mx.float32)
            with uncompiled():   # built for this probe only (workers/mlx/uncompiled.py)
                want = reference(qkv, cos, sin, heads, scale).astype(mx.float32)
            diff = mx.abs(got - want)
            # bf16 rounding apart (the order of the softmax's sums, the rotary's contractions)
            tol = mx.abs(want) * 2.0 ** -5 + 2.0 ** -6 * mx.abs(want).max()
            if got.shape != want.shape or not bool(mx.all(diff <= tol)):
                log.warning("CUDA flash attention kernel disagrees with the MLX-ops path (max diff %.3g); "
                            "not used", diff.max().item())
                return None
        return att
    except Exception as exc:       # NVRTC missing or failing: the rotary kernel and cuDNN still work
        log.warning("CUDA flash attention kernel unavailable (%s: %s); using cuDNN", type(exc).__name__, exc)
        return None
