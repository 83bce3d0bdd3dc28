"""The load probes' reference paths, run with `mx.compile` off.

Why: on CUDA, each elementwise chain that `mx.compile` fuses is a kernel MLX builds with NVRTC the
first time it runs on a machine (its kernel cache empty): 2.3-7.9 s apart on an H200 host, most of a
first load's two minutes (bench/RESULTS.md, thirty-ninth session). A probe's reference (mlx-vlm's
language-model forward; the ViT's rotary in MLX ops where the CUDA kernels replace it) runs only
at load, so its fused kernels were built for nothing. With compile off its ops run as MLX's
prebuilt kernels instead. Each op then rounds to its dtype as it does inside a fused kernel; only
the compiler's contraction of multiply-adds differs, far inside every probe's tolerance.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx


_depth = 0     # nested uses: compile comes back on when the outermost ends


@contextmanager
def uncompiled() -> Iterator[None]:
    """`mx.compile`d functions called inside run as plain Python (MLX's switch is process-wide:
    for load probes, which run while nothing else computes)."""
    global _depth
    mx.disable_compile()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and "MLX_DISABLE_COMPILE" not in os.environ:   # the user's own switch stays
            mx.enable_compile()
