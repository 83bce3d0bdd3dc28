"""The pointer head's self-attention: workers/mlx/cuda_head_attention.py (TF32 wgmma, sm_90a) against
the head's MLX ops (`head.attend_mlx`), and the whole head both ways (GPU, Hopper only).

  python3 -m bench.head_attention [--dim 1536] [--sizes 300,1000,1196,2691,4641,7296] [--reps 10]

For each size (visual tokens; the defaults are a probe's sizes and real screenshots': 1280x720,
1920x1080, 2560x1440, 3200x1800): the kernel's and the MLX ops' largest error against float64
(NumPy, the first 128 queries of every head, on random inputs whose attention is peaked and on
inputs whose attention is nearly flat), and their difference from each other; then milliseconds
per call (16 calls in one graph, median of `reps`, the rows taking turns): the attention alone
both ways, the kernel's tiles alone, and the whole head (`PointerHead.encode_image`, what runs
behind the forward) both ways, with the peak memory of one head call.
"""
from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from bench.timing import taking_turns_ms
from workers.families.gui_actor import HEAD_HEADS
from workers.mlx.cuda_head_attention import CudaHeadAttention
from workers.mlx.head import PointerHead, attend_mlx


def float64_attention(qkv: np.ndarray, heads: int, rows: int) -> np.ndarray:
    """The first `rows` queries' attention output [rows, D] in float64."""
    n, dim = qkv.shape[0], qkv.shape[1] // 3
    hd = dim // heads
    x = qkv.astype(np.float64).reshape(n, 3, heads, hd)
    out = np.empty((rows, dim))
    for h in range(heads):
        s = x[:rows, 0, h] @ x[:, 1, h].T / np.sqrt(hd)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h * hd:(h + 1) * hd] = (p / p.sum(axis=1, keepdims=True)) @ x[:, 2, h]
    return out


def peak_mb(fn) -> float:
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(fn())
    return (mx.get_peak_memory() - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1536, help="the head's width (GUI-Actor-2B: 1536; 3B: 2048)")
    ap.add_argument("--sizes", default="300,1000,1196,2691,4641,7296")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--bkv", type=int, default=None, help="keys a tile (default: the kernel's choice)")
    a = ap.parse_args()
    heads, hd = HEAD_HEADS, a.dim // HEAD_HEADS
    att = CudaHeadAttention(heads, hd, a.bkv)
    print(f"MLX {mx.__version__}, D={hd}, keys a tile {att.bkv}; ptxas:",
          " | ".join(l.strip() for l in att.log.splitlines() if "registers" in l or "spill" in l or "C75" in l), flush=True)
    fused = PointerHead(a.dim)
    fused.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.02, fused.parameters()))
    mx.eval(fused.parameters())
    fused.self_attention.fused = att
    plain = PointerHead(a.dim)
    plain.update(fused.parameters())
    sizes = [int(s) for s in a.sizes.split(",")]
    for n in sizes:
        for label, sd in (("peaked", 2.0), ("flat", 0.3)):
            qkv = mx.random.normal((n, 3 * a.dim), key=mx.random.key(n)) * sd
            got, mlx_ops = att(qkv), attend_mlx(qkv, heads)
            rows = min(n, 128)
            want = float64_attention(np.array(qkv), heads, rows)
            scale = np.abs(want).max()
            e_k = np.abs(np.array(got[:rows]) - want).max() / scale
            e_m = np.abs(np.array(mlx_ops[:rows]) - want).max() / scale
            d = mx.abs(got - mlx_ops).max().item()
            print(f"n={n} {label}: largest error against float64, of the largest output {scale:.3g}: kernel "
                  f"{e_k:.2e}, MLX ops {e_m:.2e}; kernel - MLX ops largest {d:.3g}; "
                  f"nan={bool(mx.any(mx.isnan(got)).item())}", flush=True)
    for n in sizes:
        qkv = mx.random.normal((n, 3 * a.dim), key=mx.random.key(n))
        enc = (mx.random.normal((n, a.dim)) * 0.5).astype(mx.bfloat16)
        tiles = att.tiles(qkv)
        mx.eval(qkv, enc, tiles)
        rows = [("attention, MLX ops", lambda: attend_mlx(qkv, heads)),
                ("attention, kernel (tiles + wgmma)", lambda: att(qkv)),
                ("kernel's tiles alone", lambda: att.tiles(qkv)),
                ("head's image side, MLX ops", lambda: plain.encode_image(enc)),
                ("head's image side, kernel", lambda: fused.encode_image(enc))]
        flop = 4 * n * n * a.dim
        for (label, fn), ms in zip(rows, taking_turns_ms([fn for _, fn in rows], a.reps, 16)):
            extra = f", {flop / ms / 1e9:.0f} TFLOP/s of attention" if label.startswith("attention") else ""
            print(f"n={n} {label}: {ms:.3f} ms{extra}, peak {peak_mb(fn):.0f} MB", flush=True)


if __name__ == "__main__":
    main()
