"""Imported before any test module: workers.mlx first, so that MLX's CPU matmuls run on OpenBLAS in
the tests as they do in a Linux CPU install (workers/mlx/cpu_blas.py; workers.mlx itself imports no
MLX)."""
import workers.mlx  # noqa: F401
