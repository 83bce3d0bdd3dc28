"""The pointer head's float32 on this device: what precision its matmuls get, and its time.

    python -m bench.head_precision            (and again with MLX_ENABLE_TF32=0 in the environment)

MLX runs float32 matmuls as TF32 on CUDA unless MLX_ENABLE_TF32=0. Prints the relative error of a
float32 matmul against float64 (~1e-6: full float32; ~3e-4: TF32) and the head's median time and
peak memory over the visual tokens of screenshots from 720p to the largest one the default
max_pixels keeps (2B shape, random weights, bf16 inputs as the engine gives them). Token counts come
from `smart_resize`. The head's self-attention runs as the engine runs it: the CUDA kernel on a
Hopper GPU (workers/mlx/cuda_head_attention.py; GROUNDING_HEAD_ATTENTION=0 for the MLX ops), else
MLX ops, whose keys are padded where the tokens number 2,048 or more and not a multiple of 4
(workers/mlx/head.py).
"""
from __future__ import annotations

import os

import mlx.core as mx
from mlx.utils import tree_map

from bench.timing import median_ms
from workers.families.gui_actor import HEAD_HEADS
from workers.images import FACTOR, smart_resize
from workers.mlx import cuda_head_attention
from workers.mlx.head import PointerHead, float32_matmul_error

DIM = 1536                          # GUI-Actor-2B's hidden size
SIZES = ((1280, 720), (1366, 768), (1920, 1080), (1920, 1200), (2560, 1440), (3200, 1800))
MAX_PIXELS = 5_720_064              # the default max_pixels


def visual_tokens(width: int, height: int) -> int:
    rh, rw = smart_resize(height, width, FACTOR, 3136, MAX_PIXELS)
    return (rh // FACTOR) * (rw // FACTOR)


def main() -> None:
    print(f"MLX {mx.__version__}, {mx.default_device()}, MLX_ENABLE_TF32={os.environ.get('MLX_ENABLE_TF32')}")
    print(f"float32 matmul, max relative error against float64: {float32_matmul_error():.2e}")
    head = PointerHead(DIM)
    head.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.02, head.parameters()))
    mx.eval(head.parameters())
    head.self_attention.fused = cuda_head_attention.load(HEAD_HEADS, DIM // HEAD_HEADS)
    print("self-attention:", "the CUDA kernel" if head.self_attention.fused is not None else "MLX ops")
    for w, h in SIZES:
        name, n = f"{w}x{h}", visual_tokens(w, h)
        enc = (mx.random.normal((n, DIM)) * 0.5).astype(mx.bfloat16)
        dec = mx.random.normal((1, DIM)).astype(mx.bfloat16)
        mx.eval(enc, dec)
        ms = median_ms(lambda: head(enc, dec), 20)
        mx.reset_peak_memory()
        mx.eval(head(enc, dec))
        print(f"{name} ({n} visual tokens): head {ms:.2f} ms, peak {mx.get_peak_memory() / 2**20:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
