"""The pointer head's self-attention over the visual tokens in one kernel, float32 as TF32 on Hopper's
warpgroup tensor cores (MLX CUDA backend, sm_90 only).

Why: the head (workers/mlx/head.py) attends over every visual token in 8 heads of D = hidden / 8
(192 for GUI-Actor-2B). With MLX ops its [8, n, n] float32 score matrix is written, read by the
softmax, written again and read by the product with v: at 1080p (2,691 tokens) ~1.2 of the head's
1.7-1.9 ms on an H200, for ~46 GFLOP that the tensor cores' TF32 does in ~0.1 ms (bench/RESULTS.md,
thirty-third session). Fused attention through cuDNN (`mx.fast.scaled_dot_product_attention`) runs
only in bf16/fp16, which would take the head below float32. This kernel is the flash-attention
algorithm in TF32 (FlashAttention's online softmax; the score matrix never leaves registers):

- `tiles` (an MLX JIT kernel) cuts q, k and v out of the in-projection's output [n, 3 * H * D],
  rounds them to TF32 to nearest (rather than leave the tensor cores to drop the low bits) and
  writes them in tiles in
  the order wgmma reads them from shared memory (8-row x 16-byte core matrices, no swizzle; rows
  past n zero): q in tiles of 64 tokens, k in tiles of BKV, and v transposed (D rows of BKV keys),
  since a TF32 wgmma reads both operands K-major only. Within each 8 keys of a v tile the keys go
  in the order of the probabilities' registers (below), so P needs no shuffle;
- the attention: a thread block (one warpgroup) takes 64 queries of one head; one thread copies
  each k/v tile with the bulk-copy engine into one of STAGES stages, two tiles ahead. Per tile it
  issues S = Q K^T (A and B from shared memory) and the previous tile's O += P V (P from registers)
  together, runs this tile's online softmax while the second multiplies, and rescales O
  (workers/mlx/cuda_sm90.py has the parts both attention kernels use).

P from registers: the scores' accumulator gives a thread columns 2t and 2t + 1 of each 8, and
TF32's A fragment wants columns t and t + 4; the sum over keys does not care which key is which
column as long as v's rows follow, so the v tiles list each 8 keys as 0, 2, 4, 6, 1, 3, 5, 7.

Arithmetic: TF32 operands (q, k, v and P rounded to nearest), float32 scores, softmax and
accumulation; the MLX path's matmuls are TF32 too. On an H200 (bench.head_attention, bench/RESULTS.md,
thirty-fourth session) both err by 1.0-1.3e-3 of the largest output against float64; at 1080p the
attention takes 0.41 ms with the tiles against the MLX ops' 0.80, the head's image side 0.83 against
1.48 ms and 174 against 451 MB. The kernel alone runs at ~145 TFLOP/s there, about what L2 can feed
it: each 64-query block reads all of its head's k and v. Where the kernel cannot be built, does not fit
the head's D, or disagrees with the MLX-ops path on a probe at load, `load` returns None and the
head keeps its MLX ops.
"""
from __future__ import annotations

import hashlib
import logging
import os

import mlx.core as mx

from workers.mlx import cuda_sm90, nvrtc
from workers.mlx.cuda_kernel import Kernel

log = logging.getLogger(__name__)

BQ = 64                  # queries per thread block (one warpgroup)
STAGES = 3               # k/v tiles resident in shared memory
SMEM_MAX = 227 * 1024    # an H100's / H200's shared memory per block
ENV_SWITCH = "GROUNDING_HEAD_ATTENTION"     # "0": the head's MLX ops instead


def key_tile(head_dim: int) -> int | None:
    """Keys per k/v tile for heads of `head_dim`: the largest of 32 and 16 whose q tile and
    STAGES k/v tiles fit in shared memory; None where none does, or where D is not a multiple
    of 8 (TF32's K) or its output would not fit in registers (D <= 256)."""
    if head_dim % 8 or head_dim > 256:
        return None
    for bkv in (32, 16):
        if smem_bytes(head_dim, bkv) <= SMEM_MAX:
            return bkv
    return None


def smem_bytes(head_dim: int, bkv: int) -> int:
    return BQ * head_dim * 4 + STAGES * 2 * bkv * head_dim * 4 + 8 * (2 * STAGES + 1)


def source(heads: int, head_dim: int, bkv: int) -> str:
    """The attention kernel's CUDA source for `heads` heads of `head_dim`, `bkv` keys a tile."""
    prelude = f"#define HEADS {heads}\n#define HD {head_dim}\n#define BKV {bkv}\n#define STAGES {STAGES}\n"
    return (prelude + cuda_sm90.HELPERS + cuda_sm90.wgmma_ss(bkv, "tf32") + cuda_sm90.wgmma_rs(head_dim, "tf32", "rs")
            + f"#define WGMMA_S wgmma_ss_tf32_n{bkv}\n#define WGMMA_PV wgmma_rs_tf32_n{head_dim}\n" + _BODY)


_BODY = r"""
constexpr int ROWB_QK = (HD / 4) * 128;         // bytes between 8-row groups of a q or k tile
constexpr int ROWB_V = (BKV / 4) * 128;         // of a v tile (rows: D; columns: keys)
constexpr int Q_BYTES = 64 * HD * 4;
constexpr int KV_BYTES = BKV * HD * 4;          // one k tile, or one v tile
constexpr int STAGE_BYTES = 2 * KV_BYTES;       // k tile, then v tile
constexpr int NS = BKV / 2;                     // score registers per thread (64 x BKV)
constexpr int NO = HD / 2;                      // output registers per thread (64 x HD)

struct Ctx {
    u32 sq, sk0, bars;
    const float* kg;       // this head's first k tile
    const float* vg;       // this head's first v tile
    int n;
    float sl2;
};

__device__ __forceinline__ u32 tf32(float x) {
    u32 r; asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x)); return r;
}

__device__ __forceinline__ void load_kv(const Ctx& c, int tile) {
    const u32 st = tile % STAGES, base = c.sk0 + st * STAGE_BYTES, bar = c.bars + 8 * st;
    bar_expect(bar, STAGE_BYTES);
    bulk_load(base, c.kg + (long)tile * BKV * HD, KV_BYTES, bar);
    bulk_load(base + KV_BYTES, c.vg + (long)tile * BKV * HD, KV_BYTES, bar);
}

__device__ __forceinline__ void issue_s(const Ctx& c, float (&s)[NS], int tile) {
    const u32 kb = c.sk0 + (tile % STAGES) * STAGE_BYTES;
    wg_fence();
    #pragma unroll
    for (int k = 0; k < HD / 8; ++k)
        WGMMA_S(s, desc(c.sq + k * 256, 128, ROWB_QK), desc(kb + k * 256, 128, ROWB_QK), k > 0);
    wg_commit();
}

__device__ __forceinline__ void issue_pv(const Ctx& c, float (&o)[NO], const u32 (&p)[BKV / 8][4], int tile) {
    const u32 vb = c.sk0 + (tile % STAGES) * STAGE_BYTES + KV_BYTES;
    wg_fence();
    #pragma unroll
    for (int k = 0; k < BKV / 8; ++k) WGMMA_PV(o, p[k], desc(vb + k * 256, 128, ROWB_V));
    wg_commit();
}

// P as TF32 A fragments: a thread's (row g, key 2t), (g + 8, 2t), (g, 2t + 1), (g + 8, 2t + 1) of
// each 8 keys, which the v tiles hold at rows t, t, t + 4, t + 4 of A's 8 columns
__device__ __forceinline__ void to_p(const float (&s)[NS], u32 (&p)[BKV / 8][4]) {
    #pragma unroll
    for (int k = 0; k < BKV / 8; ++k) {
        p[k][0] = tf32(s[4 * k]);
        p[k][1] = tf32(s[4 * k + 2]);
        p[k][2] = tf32(s[4 * k + 1]);
        p[k][3] = tf32(s[4 * k + 3]);
    }
}

__device__ __forceinline__ float2 softmax(const Ctx& c, int j, float (&s)[NS], Row& r) {
    return online_softmax(c.n - j * BKV - 2 * (threadIdx.x & 3), c.sl2, s, r);
}

// Tile j after tile j - 1 (as in cuda_flash_attention.py): S_j and O += P_{j-1} V_{j-1} go to the
// tensor cores together, S_j's softmax runs while the second multiplies; every iteration ends with
// nothing in flight. Tile j + 2 is copied into tile j - 1's stage once every warp is done with it.
extern "C" __global__ void __launch_bounds__(128, 1)
KNAME(const float* qt, const float* kt, const float* vt, float* out, int n, int sl2_bits) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int ntiles = (n + BKV - 1) / BKV, qblocks = (n + 63) / 64;
    const int h = blockIdx.x / qblocks, qb = blockIdx.x % qblocks;
    Ctx c;
    c.sq = smem_addr(smem);
    c.sk0 = c.sq + Q_BYTES;
    c.bars = c.sk0 + STAGES * STAGE_BYTES;         // STAGES "full", STAGES "empty", then q's
    c.kg = kt + (long)h * ntiles * BKV * HD;
    c.vg = vt + (long)h * ntiles * BKV * HD;
    c.n = n; c.sl2 = __int_as_float(sl2_bits);
    const u32 qbar = c.bars + 16 * STAGES, empty = c.bars + 8 * STAGES;
    init_barriers(c.bars, STAGES, 4);
    if (threadIdx.x == 0) {
        bar_expect(qbar, Q_BYTES);
        bulk_load(c.sq, qt + ((long)h * qblocks + qb) * 64 * HD, Q_BYTES, qbar);
        for (int t = 0; t < STAGES && t < ntiles; ++t) load_kv(c, t);
    }

    float s[NS], o[NO];
    u32 p[BKV / 8][4];
    Row r = start_rows(o);
    bar_wait(qbar, 0);
    bar_wait(c.bars, 0);
    issue_s(c, s, 0);
    wg_wait<0>();
    pin(s);
    softmax(c, 0, s, r);
    to_p(s, p);
    for (int j = 1; j < ntiles; ++j) {
        bar_wait(c.bars + 8 * (j % STAGES), (j / STAGES) & 1);
        issue_s(c, s, j);
        issue_pv(c, o, p, j - 1);
        wg_wait<1>();
        pin(s);
        const float2 f = softmax(c, j, s, r);
        wg_wait<0>();
        pin(o);
        if ((threadIdx.x & 31) == 0) bar_arrive(empty + 8 * ((j - 1) % STAGES));   // tile j - 1 is used up
        if (threadIdx.x == 0 && j + STAGES - 1 < ntiles) {
            const int t = j + STAGES - 1;                                            // into tile j - 1's stage
            bar_wait(empty + 8 * (t % STAGES), ((t / STAGES) & 1) ^ 1);
            load_kv(c, t);
        }
        rescale(o, f);
        to_p(s, p);
    }
    issue_pv(c, o, p, ntiles - 1);
    wg_wait<0>();
    pin(o);

    const float2 inv = inverse_sums(r);
    const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int row = qb * 64 + (threadIdx.x >> 5) * 16 + g;    // warp w: rows 16w..16w+15 of the block's 64
    #pragma unroll
    for (int i = 0; i < NO / 4; ++i) {
        const long col = h * HD + i * 8 + 2 * t4;
        if (row < n) *reinterpret_cast<float2*>(out + (long)row * (HEADS * HD) + col) = make_float2(o[4 * i] * inv.x, o[4 * i + 1] * inv.x);
        if (row + 8 < n) *reinterpret_cast<float2*>(out + (long)(row + 8) * (HEADS * HD) + col) = make_float2(o[4 * i + 2] * inv.y, o[4 * i + 3] * inv.y);
    }
}
"""

_TILES_HEADER = """
__device__ __forceinline__ float tf32_rounded(float x) {
    unsigned int r; asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x)); return __uint_as_float(r);
}
"""

_TILES_SOURCE = """
    // one thread per 16-byte piece of the output, in wgmma's order for a K-major tile: 8-row groups,
    // each group's 8-row x 16-byte core matrices one after another along K (COLS floats a row)
    constexpr int KC = COLS / 4;
    constexpr int PIECES = ROWS * KC;
    constexpr int TOK = PART == 2 ? COLS : ROWS;          // tokens a tile (v: keys are its columns)
    constexpr int HD = PART == 2 ? ROWS : COLS;
    const int64_t n_tok = qkv_shape[0];
    const int64_t ntiles = (n_tok + TOK - 1) / TOK;       // not a template argument: no new build per size
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= HEADS * ntiles * PIECES) return;
    const int o = idx % PIECES;
    const int64_t ht = idx / PIECES;                      // head * ntiles + tile
    const int h = ht / ntiles;
    const int64_t tile = ht % ntiles;
    const int r = (o / (8 * KC)) * 8 + o % 8, c = (o / 8) % KC;
    const int64_t stride = 3 * HEADS * HD;
    float e[4];
    if (PART < 2) {                                       // q or k: row r is a token, its D along K
        const int64_t t = tile * TOK + r;
        const float4 x = t < n_tok ? *reinterpret_cast<const float4*>(qkv + t * stride + PART * HEADS * HD + h * HD + c * 4)
                                   : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        e[0] = x.x; e[1] = x.y; e[2] = x.z; e[3] = x.w;
    } else {                                              // v transposed: row r is one of D, keys along K
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int col = c * 4 + i, w = col % 8;       // each 8 keys as 0, 2, 4, 6, 1, 3, 5, 7
            const int64_t key = tile * TOK + (col - w) + (w < 4 ? 2 * w : 2 * (w - 4) + 1);
            e[i] = key < n_tok ? qkv[key * stride + 2 * HEADS * HD + h * HD + r] : 0.0f;
        }
    }
    reinterpret_cast<float4*>(out)[idx] = make_float4(tf32_rounded(e[0]), tf32_rounded(e[1]), tf32_rounded(e[2]), tf32_rounded(e[3]));
"""


TILER = Kernel("head_attention_tiles", ["qkv"], ["out"], _TILES_SOURCE, _TILES_HEADER)


class CudaHeadAttention:
    """qkv [n, 3*H*D] float32 (the in-projection's output, q;k;v) -> softmax(q k^T / sqrt(D)) v,
    [n, H*D] float32, token-major (what the out-projection takes)."""

    def __init__(self, heads: int, head_dim: int, bkv: int | None = None):
        bkv = bkv or key_tile(head_dim)
        if bkv is None or smem_bytes(head_dim, bkv) > SMEM_MAX:
            raise ValueError(f"no tile of keys fits heads of {head_dim}")
        self.heads, self.head_dim, self.bkv = heads, head_dim, bkv
        src = source(heads, head_dim, bkv)
        self.name = f"head_attention_sm90_{hashlib.sha256(src.encode()).hexdigest()[:12]}"
        self.cubin, self.log = nvrtc.cached_cubin(src, "sm_90a", [f"-DKNAME={self.name}", "--ptxas-options=-v"])
        self.sl2_bits = cuda_sm90.float_bits(head_dim ** -0.5 * 1.4426950408889634)   # the scale times log2(e)

    def tiles(self, qkv: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """q [H, ceil(n/64), 64*D], k [H, T, BKV*D], v transposed [H, T, D*BKV], in the kernel's order."""
        n, heads, hd, bkv = qkv.shape[0], self.heads, self.head_dim, self.bkv
        out = []
        for part, rows, cols, tok in ((0, BQ, hd, BQ), (1, bkv, hd, bkv), (2, hd, bkv, bkv)):
            t = -(-n // tok)
            pieces = heads * t * rows * cols // 4
            (x,) = TILER(inputs=[qkv], template=[("PART", part), ("ROWS", rows), ("COLS", cols), ("HEADS", heads)],
                         grid=(-(-pieces // 256) * 256, 1, 1), threadgroup=(256, 1, 1),
                         output_shapes=[(heads, t, rows * cols // 4, 4)], output_dtypes=[mx.float32])
            out.append(x.reshape(heads, t, rows * cols))
        return out[0], out[1], out[2]

    def attend(self, q: mx.array, k: mx.array, v: mx.array, n: int) -> mx.array:
        (out,) = mx.fast.precompiled_cuda_kernel(
            name=self.name, compiled_source=self.cubin, inputs=[q, k, v],
            output_shapes=[(n, self.heads * self.head_dim)], output_dtypes=[mx.float32],
            scalars=[n, self.sl2_bits], grid=(-(-n // BQ) * self.heads * 128, 1, 1),
            threadgroup=(128, 1, 1), shared_memory=smem_bytes(self.head_dim, self.bkv))
        return out

    def __call__(self, qkv: mx.array) -> mx.array:
        return self.attend(*self.tiles(qkv), qkv.shape[0])


def reference(qkv: mx.array, heads: int) -> mx.array:
    """The same with MLX ops, as the head runs them without the kernel -> [n, H*D] float32."""
    from workers.mlx.head import attend_mlx        # head imports this module
    return attend_mlx(qkv, heads)


def supported(head_dim: int) -> bool:
    """Whether MLX runs on a Hopper GPU (sm_90), heads of `head_dim` fit the kernel, and
    GROUNDING_HEAD_ATTENTION=0 is not in the environment (the switch back to MLX ops)."""
    return os.environ.get(ENV_SWITCH) != "0" and key_tile(head_dim) is not None and cuda_sm90.on_hopper()


def load(heads: int, head_dim: int) -> CudaHeadAttention | None:
    """The kernels if `supported` and they match the MLX-ops path on a probe, else None. The probe
    (300 and 1000 tokens: partial tiles, several tiles) makes attention peaked (scores' standard
    deviation 4), so that a key or value out of place moves the output."""
    if not supported(head_dim):
        return None
    try:
        att = CudaHeadAttention(heads, head_dim)
        for n in (300, 1000):
            qkv = mx.random.normal((n, 3 * heads * head_dim), key=mx.random.key(n)) * 2.0
            got = att(qkv)
            want = reference(qkv, heads)
            diff = mx.abs(got - want)
            # TF32 apart: the two round q, k, v and the probabilities differently
            tol = mx.abs(want) * 2.0 ** -6 + 2.0 ** -7 * mx.abs(want).max()
            if got.shape != want.shape or not bool(mx.all(diff <= tol)):
                log.warning("CUDA head attention kernel disagrees with the MLX-ops path (max diff %.3g); "
                            "not used", diff.max().item())
                return None
        return att
    except Exception as exc:       # NVRTC missing or failing: the head's MLX ops still work
        log.warning("CUDA head attention kernel unavailable (%s: %s); using MLX ops", type(exc).__name__, exc)
        return None
