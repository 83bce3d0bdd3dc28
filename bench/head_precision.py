"""The pointer head's float32 on this device: what precision its matmuls get, and its time.

    python -m bench.head_precision            (and again with MLX_ENABLE_TF32=0 in the environment)

MLX runs float32 matmuls as TF32 on CUDA unless MLX_ENABLE_TF32=0. Prints the relative error of a
float32 matmul against float64 (~1e-6: full float32; ~3e-4: TF32) and the head's median time over
a 1080p and a 1440p screenshot's visual tokens (2B shape, random weights, bf16 inputs as the engine
gives them).
"""
from __future__ import annotations

import os

import mlx.core as mx
from mlx.utils import tree_map

from bench.timing import median_ms
from workers.mlx.head import PointerHead, float32_matmul_error

DIM = 1536                          # GUI-Actor-2B's hidden size


def main() -> None:
    print(f"MLX {mx.__version__}, {mx.default_device()}, MLX_ENABLE_TF32={os.environ.get('MLX_ENABLE_TF32')}")
    print(f"float32 matmul, max relative error against float64: {float32_matmul_error():.2e}")
    head = PointerHead(DIM)
    head.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.02, head.parameters()))
    mx.eval(head.parameters())
    for name, n in (("1920x1080", 2691), ("2560x1440", 4784)):
        enc = (mx.random.normal((n, DIM)) * 0.5).astype(mx.bfloat16)
        dec = mx.random.normal((1, DIM)).astype(mx.bfloat16)
        mx.eval(enc, dec)
        print(f"{name} ({n} visual tokens): head {median_ms(lambda: head(enc, dec), 10):.2f} ms", flush=True)


if __name__ == "__main__":
    main()
