"""The ViT's full attention: workers/mlx/cuda_flash_attention.py (wgmma, sm_90a) against cuDNN
through `mx.fast.scaled_dot_product_attention`, as the tower calls each (GPU, Hopper only).

  python3 -m bench.flash_attention [--sizes 300,1000,10764] [--variants default,WGS=2] [--reps 10]

For each compile-time variant of the kernel (`default`, or switches of its source such as WGS=2):
ptxas's register report, agreement with the MLX-ops path that the load probe compares against
(`cuda_flash_attention.reference`) on random q, k, v (and on q = 0, where attention is the mean of
v whatever the scores), against the first variant's output, and for two images as slices of one
array;
then milliseconds per call at each size (32 calls in one graph, median of `reps`, the rows taking
turns): the rotary kernel + cuDNN as the tower ran them, each part alone, and each variant.
"""
from __future__ import annotations

import argparse

import mlx.core as mx

from bench.timing import taking_turns_ms
from workers.mlx import cuda_rotary
from workers.mlx.cuda_flash_attention import CudaFlashAttention, reference
from workers.mlx.vision import attend


def inputs(n: int, heads: int, hd: int, seed: int = 0):
    qkv = (mx.random.normal((n, 3 * heads * hd), key=mx.random.key(seed)) * 1.5).astype(mx.bfloat16)
    ang = mx.random.uniform(0, 60, (n, hd // 2), key=mx.random.key(seed + 1))
    return qkv, mx.cos(ang), mx.sin(ang)


def cudnn(qkv: mx.array, cos: mx.array, sin: mx.array, heads: int, scale: float, rotary) -> mx.array:
    """What the tower does without the kernels: the rotary kernel, then cuDNN over token-major views
    (workers/mlx/vision.py `attend`)."""
    n, hd = qkv.shape[0], qkv.shape[1] // (3 * heads)
    qk = rotary(qkv, cos, sin)
    return attend(qk[:, 0], qk[:, 1], qkv.reshape(n, 3, heads, hd)[:, 2], [(0, 1, n)], scale)


def variant(spec: str) -> dict:
    """"WGS=2+PRODUCER=0" -> {"WGS": 2, "PRODUCER": 0} ("default": {})."""
    return {} if spec == "default" else {k: int(v) for k, v in (kv.split("=") for kv in spec.split("+"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="300,1000,10764")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=80)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--variants", default="default", help="compile-time variants of the kernel, e.g. default,WGS=2,PRODUCER=0")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    heads, scale = a.heads, a.head_dim ** -0.5
    rot = cuda_rotary.load(heads, a.head_dim, mx.bfloat16)
    kernels, first = [], {}       # the first variant's outputs, which the others are compared with
    for spec in a.variants.split(","):
        k = CudaFlashAttention(heads, a.head_dim, scale, variant(spec))
        kernels.append((spec, k))
        print(spec, " | ".join(l.strip() for l in k.log.splitlines() if "registers" in l or "spill" in l or "C75" in l),
              flush=True)
        for n in sizes:
            qkv, cos, sin = inputs(n, heads, a.head_dim)
            q0 = mx.concatenate([mx.zeros_like(qkv[:, : heads * a.head_dim]), qkv[:, heads * a.head_dim:]], axis=1)
            for label, x in (("random", qkv), ("q=0", q0)):
                got = k(x, cos, sin).astype(mx.float32)
                want = reference(x, cos, sin, heads, scale).astype(mx.float32)
                d = mx.abs(got - want)
                base = first.setdefault((n, label), got)
                same = "identical" if bool(mx.array_equal(got, base)) else f"max diff {mx.abs(got - base).max().item():.3g}"
                print(f"  {spec} n={n} {label}: max diff {d.max().item():.4g} mean {d.mean().item():.3g} "
                      f"(largest {mx.abs(want).max().item():.3g}) nan={bool(mx.any(mx.isnan(got)).item())}; "
                      f"against {kernels[0][0]}: {same}", flush=True)
    # two images in one tower call: the kernels take each image's rows as a slice of the arrays
    k = kernels[0][1]
    qkv, cos, sin = inputs(1300, heads, a.head_dim, seed=7)
    got = mx.concatenate([k(qkv[:1000], cos[:1000], sin[:1000]), k(qkv[1000:], cos[1000:], sin[1000:])])
    want = mx.concatenate([reference(qkv[:1000], cos[:1000], sin[:1000], heads, scale),
                           reference(qkv[1000:], cos[1000:], sin[1000:], heads, scale)])
    d = mx.abs(got.astype(mx.float32) - want.astype(mx.float32))
    print(f"  two images (1000 + 300 tokens) as slices: max diff {d.max().item():.4g} mean {d.mean().item():.3g}",
          flush=True)
    for n in sizes:
        qkv, cos, sin = inputs(n, heads, a.head_dim)
        flop = 4 * n * n * a.head_dim * heads
        qk, v = rot(qkv, cos, sin), qkv.reshape(n, 3, heads, -1)[:, 2]
        tl = kernels[0][1].tiles(qkv, cos, sin)
        mx.eval(tl, qk)
        rows = [("rotary kernel + cuDNN (the tower now)", lambda: cudnn(qkv, cos, sin, heads, scale, rot)),
                ("cuDNN alone", lambda: attend(qk[:, 0], qk[:, 1], v, [(0, 1, n)], scale)),
                ("tiles kernel alone", lambda: kernels[0][1].tiles(qkv, cos, sin)),
                ("rotary kernel alone", lambda: rot(qkv, cos, sin))]
        for spec, k in kernels:
            rows += [(f"{spec}: tiles + wgmma kernel", lambda k=k: k(qkv, cos, sin)),
                     (f"{spec}: wgmma kernel alone", lambda k=k: k.attend(tl, n))]
        for (label, _), ms in zip(rows, taking_turns_ms([fn for _, fn in rows], a.reps, 32)):
            print(f"n={n} {label}: {ms:.3f} ms ({flop / ms / 1e9:.0f} TFLOP/s of attention)", flush=True)


if __name__ == "__main__":
    main()
