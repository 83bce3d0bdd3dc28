"""The worker's MLX settings: in place whenever the engine package is imported, an operator's own
values kept. (What they guard against shows only on CUDA: bench.attention_plans.)"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def settings(env: dict[str, str]) -> dict[str, str]:
    code = ("import workers.mlx.engine, os; "
            "print(os.environ['MLX_ENABLE_CACHE_THRASHING_CHECK'], os.environ['MLX_CUDA_SDPA_CACHE_SIZE'])")
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **env},
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    return {"check": out[0], "cache": out[1]}


def test_the_engine_turns_the_thrashing_fuse_off_and_keeps_more_attention_plans():
    assert settings({}) == {"check": "0", "cache": "1024"}


def test_an_operators_values_win():
    assert settings({"MLX_ENABLE_CACHE_THRASHING_CHECK": "1", "MLX_CUDA_SDPA_CACHE_SIZE": "64"}) == \
        {"check": "1", "cache": "64"}
