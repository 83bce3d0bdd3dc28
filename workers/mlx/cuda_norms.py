"""The ViT blocks' norms as CUDA kernels, the residual add folded into the second norm (MLX CUDA
backend only), and the same operations with MLX ops everywhere else.

Why: MLX's LayerNorm and RMSNorm give each row its own block of threads, read the row three times
and synchronise the block twice; over a 1080p screenshot's 10,764 rows of 1280 values the
LayerNorm ran at ~840 GB/s on an H100 (bench.vit_ops, first session), a third of the card's
bandwidth. Here one warp holds a whole row in registers (16-byte loads), so each value is read
once and written once. The second norm of a block follows the attention's residual add
(`x + proj(o)`), which MLX runs as its own kernel; the kernel adds, writes the sum and normalises
it in one pass. That is 4 row-sized reads and writes instead of 7 per block, and two norms that
run near the card's bandwidth.

Arithmetic, as the reference (transformers, PyTorch's kernels) does it:
- the residual sum is rounded to the model dtype first, as `x + proj(o)` is in bf16;
- LayerNorm: mean and variance in float32, `(s - mean) * rstd * w + b` in float32, one rounding
  (MLX's kernel rounds the normalised value and the product too);
- RMSNorm (Qwen2RMSNorm): `s * rstd` rounded to the model dtype, then times w, rounded again.
Where the kernel cannot be built, or disagrees with the MLX-ops path on a probe, `load` returns
the MLX-ops path. GROUNDING_CUDA_NORMS=0 keeps the MLX-ops path on purpose.
"""
from __future__ import annotations

import logging
import os
import struct

import mlx.core as mx

from workers.mlx.cuda_rotary import kernel_name, on_cuda

log = logging.getLogger(__name__)

EPS = 1e-6          # both ViTs' norms (Qwen2-VL's LayerNorm, Qwen2.5-VL's RMSNorm)
ROWS_PER_BLOCK = 4  # warps (one row each) per block of threads

# Template arguments: T the dtype, C the row width (a multiple of 16 bytes' worth of T), RMS (1:
# RMSNorm, 0: LayerNorm), ADD (1: the input is x + p, also written out as `s`), EPS_BITS the
# epsilon's float32 bits (MLX's kernels take no float template arguments).
_SOURCE = """
    constexpr int VEC = 16 / sizeof(T);                       // values per 16-byte load
    constexpr int RUNS = (C + 32 * VEC - 1) / (32 * VEC);     // loads per lane
    const int64_t row = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (row >= x_shape[0]) return;
    const int64_t base = row * C;
    float v[RUNS][VEC];
    float sum = 0.f;
    #pragma unroll
    for (int r = 0; r < RUNS; ++r) {
        const int col = (r * 32 + lane) * VEC;
        if (col < C) {
            uint4 raw = *reinterpret_cast<const uint4*>(x + base + col);
            T* xs = reinterpret_cast<T*>(&raw);
#if ADD
            const uint4 praw = *reinterpret_cast<const uint4*>(p + base + col);
            const T* ps = reinterpret_cast<const T*>(&praw);
            #pragma unroll
            for (int e = 0; e < VEC; ++e)
                xs[e] = static_cast<T>(__fadd_rn(static_cast<float>(xs[e]), static_cast<float>(ps[e])));
            *reinterpret_cast<uint4*>(s + base + col) = raw;
#endif
            #pragma unroll
            for (int e = 0; e < VEC; ++e) {
                v[r][e] = static_cast<float>(xs[e]);
                sum += v[r][e];
            }
        } else {
            #pragma unroll
            for (int e = 0; e < VEC; ++e) v[r][e] = 0.f;
        }
    }
#if RMS
    const float mean = 0.f;
#else
    #pragma unroll
    for (int off = 16; off; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const float mean = sum / C;
#endif
    float sq = 0.f;
    #pragma unroll
    for (int r = 0; r < RUNS; ++r) {
        if ((r * 32 + lane) * VEC < C) {
            #pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const float d = v[r][e] - mean;
                sq += d * d;
            }
        }
    }
    #pragma unroll
    for (int off = 16; off; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    const float rstd = rsqrtf(sq / C + __int_as_float(EPS_BITS));
    #pragma unroll
    for (int r = 0; r < RUNS; ++r) {
        const int col = (r * 32 + lane) * VEC;
        if (col < C) {
            const uint4 wraw = *reinterpret_cast<const uint4*>(w + col);
            const T* ws = reinterpret_cast<const T*>(&wraw);
            uint4 res;
            T* ys = reinterpret_cast<T*>(&res);
#if RMS
            #pragma unroll
            for (int e = 0; e < VEC; ++e)
                ys[e] = static_cast<T>(static_cast<float>(ws[e]) * static_cast<float>(static_cast<T>(v[r][e] * rstd)));
#else
            const uint4 braw = *reinterpret_cast<const uint4*>(b + col);
            const T* bs = reinterpret_cast<const T*>(&braw);
            #pragma unroll
            for (int e = 0; e < VEC; ++e)
                ys[e] = static_cast<T>((v[r][e] - mean) * rstd * static_cast<float>(ws[e]) + static_cast<float>(bs[e]));
#endif
            *reinterpret_cast<uint4*>(y + base + col) = res;
        }
    }
"""


class Norms:
    """The blocks' norms with MLX ops: what runs on Metal and the CPU, and the kernels' reference.
    `layer`/`rms` normalise x [N, C]; `add_layer`/`add_rms` return (x + p, its norm)."""

    def layer(self, x: mx.array, w: mx.array, b: mx.array) -> mx.array:
        return mx.fast.layer_norm(x, w, b, EPS)

    def rms(self, x: mx.array, w: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, w, EPS)

    def add_layer(self, x: mx.array, p: mx.array, w: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
        s = x + p
        return s, self.layer(s, w, b)

    def add_rms(self, x: mx.array, p: mx.array, w: mx.array) -> tuple[mx.array, mx.array]:
        s = x + p
        return s, self.rms(s, w)


MLX_NORMS = Norms()


class CudaNorms(Norms):
    """The same four operations, each one kernel: one warp per row of `width` values."""

    def __init__(self):
        header = f"#define EPS_BITS {struct.unpack('<i', struct.pack('<f', EPS))[0]}\n"
        self._kernels = {}
        for rms in (0, 1):
            for add in (0, 1):
                source = f"#define RMS {rms}\n#define ADD {add}\n" + _SOURCE
                inputs = ["x"] + (["p"] if add else []) + ["w"] + ([] if rms else ["b"])
                self._kernels[rms, add] = mx.fast.cuda_kernel(
                    name=kernel_name(f"vit_norm_{'rms' if rms else 'layer'}{'_add' if add else ''}", source, header),
                    input_names=inputs, output_names=(["s"] if add else []) + ["y"], source=source, header=header)

    def _run(self, rms: int, inputs: list[mx.array]) -> list[mx.array]:
        x = inputs[0]
        n, c = x.shape
        add = int(len(inputs) == (3 if rms else 4))
        return self._kernels[rms, add](
            inputs=inputs, template=[("T", x.dtype), ("C", c)],
            grid=(n * 32, 1, 1), threadgroup=(32 * ROWS_PER_BLOCK, 1, 1),
            output_shapes=[(n, c)] * (1 + add), output_dtypes=[x.dtype] * (1 + add))

    def layer(self, x, w, b):
        return self._run(0, [x, w, b])[0]

    def rms(self, x, w):
        return self._run(1, [x, w])[0]

    def add_layer(self, x, p, w, b):
        return tuple(self._run(0, [x, p, w, b]))

    def add_rms(self, x, p, w):
        return tuple(self._run(1, [x, p, w]))


def _agrees(got: mx.array, want: mx.array) -> bool:
    """Within the model dtype's rounding: the kernels round once where MLX's rounds up to thrice,
    and sum in another order."""
    got, want = got.astype(mx.float32), want.astype(mx.float32)
    tol = mx.abs(want) * 2.0 ** -6 + 2.0 ** -7 * mx.abs(want).max()
    return got.shape == want.shape and bool(mx.all(mx.abs(got - want) <= tol))


def load(width: int, dtype: mx.Dtype) -> Norms:
    """The kernels if MLX runs on CUDA, the rows are whole 16-byte loads and the kernels match the
    MLX-ops path on a probe; else the MLX-ops path."""
    if os.environ.get("GROUNDING_CUDA_NORMS") == "0" or not on_cuda() or (width * dtype.size) % 16:
        return MLX_NORMS
    try:
        cuda = CudaNorms()
        n = 301
        key = lambda i: mx.random.key(i)
        x = (mx.random.normal((n, width), key=key(0)) * 3 + 1).astype(dtype)
        p = (mx.random.normal((n, width), key=key(1)) * 2).astype(dtype)
        w = (mx.random.normal((width,), key=key(2)) + 1).astype(dtype)
        b = mx.random.normal((width,), key=key(3)).astype(dtype)
        s, y = cuda.add_layer(x, p, w, b)
        s_rms, y_rms = cuda.add_rms(x, p, w)
        ref_s = x + p
        checks = {"layer": (cuda.layer(x, w, b), MLX_NORMS.layer(x, w, b)),
                  "rms": (cuda.rms(x, w), MLX_NORMS.rms(x, w)),
                  "add_layer": (y, MLX_NORMS.layer(ref_s, w, b)),
                  "add_rms": (y_rms, MLX_NORMS.rms(ref_s, w))}
        bad = [name for name, (got, want) in checks.items() if not _agrees(got, want)]
        if not (bool(mx.array_equal(s, ref_s)) and bool(mx.array_equal(s_rms, ref_s))):
            bad.append("residual sum")
        if bad:
            log.warning("CUDA norm kernels disagree with the MLX-ops path (%s); not used", ", ".join(bad))
            return MLX_NORMS
        return cuda
    except Exception as exc:       # NVRTC missing or failing: MLX's own norms still work
        log.warning("CUDA norm kernels unavailable (%s: %s); using MLX ops", type(exc).__name__, exc)
        return MLX_NORMS
