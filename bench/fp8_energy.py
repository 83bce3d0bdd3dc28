"""Would FP8 arithmetic lower the energy of a grounding forward? Joules per GEMM, bf16 against FP8 (e4m3),
at the 2B forward's own GEMM shapes, on one NVIDIA GPU, measured with PyTorch (cuBLASLt).

    python3 bench/fp8_energy.py [--size 1920x1080] [--seconds 1.0]

Why: at 1080p our forward runs at the card's 700 W cap, so its time follows its energy (59.6 J per
screenshot on an H200, bench.energy); cheaper arithmetic would make each request faster. (It would not
lift eight clients' throughput against one client's, which a single forward at the cap bounds: see the
twenty-third session in bench/RESULTS.md.) MLX has no FP8 GEMM on Hopper (its block-scaled qqmm needs
sm_100), so before writing FP8 kernels of our own this asks the card what FP8 saves per GEMM:
`torch._scaled_mm` (per-tensor scales, bf16 out, fast accumulation) against `torch.mm` in bf16, the
energy counter (NVML, bench/gpu_energy.py) around repeated calls of each shape.

The shapes are one 1080p forward's: the vision tower's projections and MLP (32 blocks), one head's
attention products as plain GEMMs (our fused kernel never writes the scores; these rows show the
products' cost per FLOP, not the kernel's), the merger, and the language model's projections (28 layers).
A last table weighs each shape by how often a forward runs it. Accuracy is not measured here.
Run as a script with PyTorch only (the GPU image has it), like bench/torch_forward.py.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_energy import EnergyMeter  # noqa: E402  (run as a script: bench/ is not a package there)
from torch_forward import SHAPES, TEXT, smart_resize  # noqa: E402  (its module level needs no torch)

import torch  # noqa: E402

VIT, HEADS, HEAD_DIM, MLP, BLOCKS = 1280, 16, 80, 5120, 32     # Qwen2-VL's tower, as bench/torch_forward.py builds it
MERGED_IN = 4 * VIT                                             # the merger's input: 2 x 2 patches
_LM = SHAPES["2b"]
LM, LM_MLP, LAYERS = _LM["hidden_size"], _LM["intermediate_size"], _LM["num_hidden_layers"]
KV = _LM["num_key_value_heads"] * LM // _LM["num_attention_heads"]


def tokens(width: int, height: int) -> tuple[int, int]:
    """Vision tokens and language-model tokens of a screenshot, as bench/torch_forward.py counts them."""
    rh, rw = smart_resize(height, width)
    patches = (rh // 14) * (rw // 14)
    return patches, patches // 4 + TEXT


def shapes(n_vit: int, n_lm: int) -> list[tuple[str, str, int, int, int, int]]:
    """(part, name, M, K, N, calls per forward), each size rounded up to a multiple of 16 (as FP8's
    cuBLASLt GEMMs need; the bf16 rows get the same, so the two compare like for like)."""
    n_vit, n_lm = -(-n_vit // 16) * 16, -(-n_lm // 16) * 16
    return [
        ("vit linears", "qkv", n_vit, VIT, 3 * VIT, BLOCKS),
        ("vit linears", "proj", n_vit, VIT, VIT, BLOCKS),
        ("vit linears", "fc1", n_vit, VIT, MLP, BLOCKS),
        ("vit linears", "fc2", n_vit, MLP, VIT, BLOCKS),
        ("vit attention", "q.k (one head)", n_vit, HEAD_DIM, n_vit, BLOCKS * HEADS),
        ("vit attention", "p.v (one head)", n_vit, n_vit, HEAD_DIM, BLOCKS * HEADS),
        ("merger", "merger fc1", n_vit // 4, MERGED_IN, MERGED_IN, 1),
        ("merger", "merger fc2", n_vit // 4, MERGED_IN, LM, 1),
        ("lm linears", "q+k+v", n_lm, LM, LM + 2 * KV, LAYERS),
        ("lm linears", "o", n_lm, LM, LM, LAYERS),
        ("lm linears", "gate+up", n_lm, LM, 2 * LM_MLP, LAYERS),
        ("lm linears", "down", n_lm, LM_MLP, LM, LAYERS),
        ("reference", "8192 cube", 8192, 8192, 8192, 0),
    ]


def runner(m: int, k: int, n: int, fp8: bool):
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    if not fp8:
        bt = b.t()
        return lambda: torch.mm(a, bt)
    # _scaled_mm wants A row-major and B column-major, both e4m3, with float32 scales.
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda", dtype=torch.float32)
    return lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                    use_fast_accum=True)


def measure(fn, seconds: float) -> tuple[float, float, float, float]:
    """(ms per call, J per call, median W, median SM MHz) over about `seconds` of back-to-back calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    reps = max(5, math.ceil(seconds / max(time.perf_counter() - t, 1e-5)))
    with EnergyMeter() as meter:
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
    return elapsed / reps * 1e3, meter.joules / reps, meter.watts, meter.sm_mhz


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--seconds", type=float, default=1.0, help="measured time per shape and type")
    args = ap.parse_args(argv)
    width, height = map(int, args.size.split("x"))
    n_vit, n_lm = tokens(width, height)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.size}: {n_vit} vision tokens, "
          f"{n_lm} language-model tokens")
    print("| part | GEMM | M x K x N | type | ms per call | TFLOP/s | J per call | J per TFLOP | median W | SM MHz |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    per_part: dict[str, list[float]] = {}
    for part, name, m, k, n, calls in shapes(n_vit, n_lm):
        joules = []
        for fp8 in (False, True):
            ms, j, w, mhz = measure(runner(m, k, n, fp8), args.seconds)
            tflop = 2 * m * k * n / 1e12
            joules.append(j)
            print(f"| {part} | {name} | {m} x {k} x {n} | {'fp8' if fp8 else 'bf16'} | {ms:.3f} | "
                  f"{tflop / ms * 1e3:.0f} | {j:.4f} | {j / tflop:.3f} | {w:.0f} | {mhz:.0f} |", flush=True)
        torch.cuda.empty_cache()
        if calls:
            sums = per_part.setdefault(part, [0.0, 0.0])
            sums[0] += joules[0] * calls
            sums[1] += joules[1] * calls
    print("\nPer forward, each GEMM times the calls a forward makes (plain GEMMs, so the attention rows")
    print("include writing and reading the scores, which our fused kernel does not):\n")
    print("| part | bf16 J | fp8 J | fp8 / bf16 |")
    print("|---|---|---|---|")
    for part, (bf, f8) in per_part.items():
        print(f"| {part} | {bf:.1f} | {f8:.1f} | {f8 / bf:.2f} |")
    bf, f8 = (sum(v[i] for v in per_part.values()) for i in (0, 1))
    print(f"| all | {bf:.1f} | {f8:.1f} | {f8 / bf:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
