"""The MLX engine. Imported before any of its modules touch the device, so the settings below are
in place when MLX's CUDA backend builds its caches.

MLX's CUDA backend keeps cuDNN attention plans in an LRU keyed by exact shapes (256 by default)
and, unless MLX_ENABLE_CACHE_THRASHING_CHECK=0, throws once a process has missed it more than
twice its capacity in its lifetime ("Cache thrashing is happening"). Measured on an H100 with MLX
0.32.4: after 512 distinct attention shapes, every new shape fails, and shapes evicted earlier with
it (bench/RESULTS.md). A server meets new shapes with every screen size, prompt-length bucket and
batch composition, so a long-lived worker would start failing requests. Here a miss costs a rebuilt plan
(~40 ms) instead, and four times as many plans are kept. An operator's own values win.

On a Linux CPU install, MLX's matmuls are routed to OpenBLAS here too (workers/mlx/cpu_blas.py).
"""
import os

for _name, _value in (("MLX_ENABLE_CACHE_THRASHING_CHECK", "0"), ("MLX_CUDA_SDPA_CACHE_SIZE", "1024")):
    os.environ.setdefault(_name, _value)

from workers.mlx.cpu_blas import use_openblas  # noqa: E402  (after the settings)

use_openblas()
