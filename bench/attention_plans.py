"""MLX's CUDA attention-plan cache over a long-lived process: attention at many distinct sequence
lengths, as a server meets them (screen sizes, instruction lengths, batches).

    python -m bench.attention_plans [--lengths 700]      (set MLX_* variables in the environment to compare)

Runs one ViT-shaped attention (16 heads, head dim 80, bf16) per length 64, 72, 80, ... and reports
whether and where one failed, then whether the device still runs attention. With MLX's defaults
(before workers.mlx sets its own) the 513th distinct length failed on an H100 with "Cache thrashing
is happening" and so did every uncached one after it.
"""
from __future__ import annotations

import argparse
import os
import time

import mlx.core as mx


def attend(n: int) -> None:
    q = mx.random.normal((1, 16, n, 80)).astype(mx.bfloat16)
    mx.eval(mx.fast.scaled_dot_product_attention(q, q, q, scale=0.1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, default=700)
    ap.add_argument("--mlx-defaults", action="store_true", help="do not import workers.mlx's settings")
    a = ap.parse_args()
    if not a.mlx_defaults:
        import workers.mlx  # noqa: F401  (the worker's MLX settings)
    print(f"MLX {mx.__version__}; " + ", ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MLX_")))
    t = time.perf_counter()
    for i, n in enumerate(range(64, 64 + 8 * a.lengths, 8)):
        try:
            attend(n)
        except Exception as exc:
            print(f"length #{i + 1} ({n} tokens) failed after {time.perf_counter() - t:.1f} s: {exc}")
            break
    else:
        print(f"{a.lengths} distinct lengths ran, {time.perf_counter() - t:.1f} s")
    try:
        attend(128)                                     # seen first, long since evicted
        print("attention at an early length runs afterwards")
    except Exception as exc:
        print(f"attention at an early length fails afterwards: {exc}")


if __name__ == "__main__":
    main()
