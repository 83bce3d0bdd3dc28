"""Loaded before the test modules: importing workers.mlx routes MLX's CPU matmuls to OpenBLAS for
every test, including those that use mlx.core alone, as in a Linux CPU install
(workers/mlx/cpu_blas.py; the routing works whatever was imported before)."""
import workers.mlx  # noqa: F401
