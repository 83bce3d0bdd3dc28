"""Does MLX's cuDNN attention need a new plan per sequence length, by the layout of q, k and v?
(GPU; MLX's CUDA backend.)

    python -m bench.varlen_attention [--case vit|lm] [--lengths 10764,6528,...]

MLX 0.32.4 builds one cuDNN graph per exact attention shape (~40 ms, some shapes ~480 ms:
bench/RESULTS.md, "the first request at a new screen size, op by op"). Its source also has a
variable-sequence-length graph (padding mask, seq_len_q/kv given at run time) that it takes only
when q, k and v are each dense in memory; the ViT hands cuDNN strided views of the qkv projection.
For each layout and length, in order: the first call (plan included), the median of 5 later calls,
and the largest difference from the strided views' output at that length.

Layouts: `views` (what workers/mlx/vision.py and language.py pass now: slices of one projection),
`dense_tm` (each of q, k, v copied dense, token-major, then transposed as before), `dense_hm`
(dense head-major [1, H, L, D]).
"""
from __future__ import annotations

import argparse

import mlx.core as mx

import workers.mlx  # noqa: F401  (the worker's MLX settings)
from bench.timing import device_times, median_ms

CASES = {  # heads, kv heads, head dim, causal
    "vit": (16, 16, 80, False),
    "lm": (12, 2, 128, True),
}


def inputs(layout: str, n: int, heads: int, kv: int, hd: int):
    """q, k, v [1, H, n, D] in the given layout, from one seeded projection (same values in all)."""
    proj = (mx.random.normal((n, (heads + 2 * kv) * hd), key=mx.random.key(n)) * 0.5).astype(mx.bfloat16)
    mx.eval(proj)
    q, k, v = mx.split(proj, [heads * hd, (heads + kv) * hd], axis=-1)
    q, k, v = (t.reshape(1, n, -1, hd) for t in (q, k, v))
    if layout == "dense_tm":
        q, k, v = (mx.contiguous(t) for t in (q, k, v))
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    if layout == "dense_hm":
        q, k, v = (mx.contiguous(t) for t in (q, k, v))
    mx.eval(q, k, v)
    return q, k, v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="vit", choices=sorted(CASES))
    ap.add_argument("--lengths", default="")
    ap.add_argument("--layouts", default="views,dense_tm,dense_hm")
    a = ap.parse_args()
    heads, kv, hd, causal = CASES[a.case]
    default = "10764,6528,5040,8400,11880,11984,12000" if a.case == "vit" else "2751,1712,1344,2181,3040"
    lengths = [int(x) for x in (a.lengths or default).split(",")]
    mask = "causal" if causal else None
    print(f"MLX {mx.__version__} {mx.default_device()}; case {a.case}: {heads} heads, {kv} kv heads, "
          f"D={hd}, causal={causal}")
    print("| layout | length | 1st call ms | later calls ms | max diff vs views |")
    print("|---|---|---|---|---|")
    reference = {}
    for layout in a.layouts.split(","):
        for n in lengths:
            q, k, v = inputs(layout, n, heads, kv, hd)
            run = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=hd ** -0.5, mask=mask)
            first = device_times(run, 1, warmup=0)[0] * 1e3            # the plan is built here
            later = median_ms(run, 5, warmup=0)
            out = run().astype(mx.float32)
            if layout == "views":
                reference[n] = out
            diff = mx.abs(out - reference[n]).max().item() if n in reference else float("nan")
            print(f"| {layout} | {n} | {first:.1f} | {later:.2f} | {diff:.3g} |", flush=True)


if __name__ == "__main__":
    main()
