"""Which of the workers' CUDA kernels load on this machine (GPU only): each module's `load`, which
builds the kernel and checks it against the MLX-ops path on a probe, at the ViT's shape (16 heads of
80, bf16), the language model's prefix join (the 2B's and 7B's heads, and float32) and the pointer
head's (8 heads of 192 and of 256, float32: GUI-Actor-2B's and 3B's), timed twice in one process
(the first pays for what the process sets up once: the CUDA context, MLX's kernel cache, cuDNN). A
kernel that declines logs why and prints "declined".

  python3 -m bench.cuda_loads

A quick check after editing any kernel's source: the probes compare every kernel with MLX ops.
"""
from __future__ import annotations

import logging
import time

import mlx.core as mx

from workers.mlx import (cuda_flash_attention, cuda_head_attention, cuda_prefix_join, cuda_rotary, cuda_upload,
                         cuda_window_attention)

HEADS, HEAD_DIM = 16, 80


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    scale = HEAD_DIM ** -0.5
    loads = [
        ("upload", cuda_upload.load),
        ("rotary", lambda: cuda_rotary.load(HEADS, HEAD_DIM, mx.bfloat16)),
        ("window attention", lambda: cuda_window_attention.load(HEADS, HEAD_DIM, scale, mx.bfloat16,
                                                                cuda_window_attention.WINDOW_MAX)),
        ("prefix join, 2B (12 heads, 2 KV, bf16)", lambda: cuda_prefix_join.load(12, 2, 128, mx.bfloat16)),
        ("prefix join, 7B (28 heads, 4 KV, bf16)", lambda: cuda_prefix_join.load(28, 4, 128, mx.bfloat16)),
        ("prefix join, float32", lambda: cuda_prefix_join.load(12, 2, 128, mx.float32)),
        ("flash attention", lambda: cuda_flash_attention.load(HEADS, HEAD_DIM, scale, mx.bfloat16)),
    ]
    if not cuda_flash_attention.supported(HEAD_DIM, mx.bfloat16):     # sm_90 only: elsewhere, no failure
        print("flash attention: not for this GPU (or GROUNDING_FLASH_ATTENTION=0)", flush=True)
        loads.pop()
    for hd in (192, 256):
        if cuda_head_attention.supported(hd):
            loads.append((f"head attention, D={hd}", lambda hd=hd: cuda_head_attention.load(8, hd)))
        else:
            print(f"head attention, D={hd}: not for this GPU (or GROUNDING_HEAD_ATTENTION=0)", flush=True)
    failed = 0
    for name, load in loads:
        ms = []
        for _ in range(2):          # the second load: what a model's load pays after the process's first
            t = time.perf_counter()
            kernel = load()
            ms.append((time.perf_counter() - t) * 1e3)
        print(f"{name}: {'loaded' if kernel is not None else 'declined'} in {ms[0]:.0f} ms, again in {ms[1]:.0f} ms",
              flush=True)
        failed += kernel is None
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
