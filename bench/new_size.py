"""What the first forward at a new screen size pays for, op by op (GPU; random bf16 weights, 2B shape).

    python -m bench.new_size [--sizes 1920x1080,1440x900,1366x768]

The first size warms everything up. For each later size, every op of the forward runs twice at the
new token count, first and second call timed between synchronisations: the difference is what the
new shape costs once (fused-kernel builds, attention plans, matmul heuristics, allocations). The
compiled parts are also run as `mx.compile(..., shapeless=True)`. Then the upload of a decoded
screenshot (uint8, host memory -> a device op) against the same op on a device-born array, on one
thread and in row bands on several (`--upload-only`: that table alone).
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from workers.images import smart_resize
from workers.mlx import cuda_rotary
from workers.mlx.language import _mlp_block, _qkv as lm_qkv, _rope
from workers.mlx.vision import _post_attention, _qkv, attend

C, HEADS, MLP = 1280, 16, 5120                       # ViT
LC, LH, LKV, LD, LI = 1536, 12, 2, 128, 8960         # language model


def timed(fn) -> float:
    mx.synchronize()
    t = time.perf_counter()
    mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - t) * 1e3


def tokens(w: int, h: int) -> tuple[int, int]:
    rh, rw = smart_resize(h, w)
    n = (rh // 14) * (rw // 14)
    return n, n // 4 + 80                               # ViT patches, prompt tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1920x1080,1440x900,1366x768,1280x800")
    ap.add_argument("--upload-only", action="store_true")
    a = ap.parse_args()
    if a.upload_only:
        return upload_table()
    bf = mx.bfloat16
    r = lambda *s: (mx.random.normal(s) * 0.02).astype(bf)
    vw = (mx.ones((C,), bf), mx.zeros((C,), bf), r(3 * C, C), r(3 * C))
    pw = (r(C, C), r(C), mx.ones((C,), bf), mx.zeros((C,), bf), r(MLP, C), r(MLP), r(C, MLP), r(C))
    lw = (mx.ones((LC,), bf), r((LH + 2 * LKV) * LD, LC), r((LH + 2 * LKV) * LD))
    lr = (r(LC, LH * LD), mx.ones((LC,), bf), r(2 * LI, LC), r(LC, LI))
    rot = cuda_rotary.load(HEADS, C // HEADS, bf)
    post_sl = mx.compile(lambda x, o, *w: _post_attention(x, o, *w), shapeless=True)
    pre_sl = mx.compile(lambda x, *w: _qkv(x, *w), shapeless=True)

    def mlp(x, o, o_w, norm_w, gate_w, up_w, down_w):    # _mlp_block unfused: Split is not shapeless
        h = x + o @ o_w.T
        y = mx.fast.rms_norm(h, norm_w, 1e-6)
        return h + (nn.silu(y @ gate_w.T) * (y @ up_w.T)) @ down_w.T
    mlp_sl = mx.compile(mlp, shapeless=True)
    mx.eval(vw, pw, lw, lr)
    print("| size | ViT patches | prompt | op | 1st ms | 2nd ms |\n|---|---|---|---|---|---|")
    for s in a.sizes.split(","):
        w, h = (int(v) for v in s.split("x"))
        n, length = tokens(w, h)
        x, o = r(n, C), r(n, C)
        ang = mx.random.normal((n, C // HEADS // 2))
        cos, sin = mx.cos(ang), mx.sin(ang)
        qkv = r(n, 3 * C)
        hl, ol = r(1, length, LC), r(1, length, LH * LD)
        q, k, v = r(1, LH, length, LD), r(1, LKV, length, LD), r(1, LKV, length, LD)
        lc, ls = r(1, length, LD), r(1, length, LD)
        mx.eval(x, o, cos, sin, qkv, hl, ol, q, k, v, lc, ls)
        qkv4 = qkv.reshape(n, 3, HEADS, C // HEADS)
        ops = {
            "vit matmul x @ W (no compile)": lambda: x @ vw[2].T,
            "vit elementwise x * 2 + 1 (no compile)": lambda: x * 2 + 1,
            "vit _qkv (compiled)": lambda: _qkv(x, *vw),
            "vit _qkv (shapeless)": lambda: pre_sl(x, *vw),
            "vit rotary kernel": (lambda: rot(qkv, cos, sin)) if rot else (lambda: x),
            "vit attention (cuDNN)": lambda: attend(qkv4[:, 0], qkv4[:, 1], qkv4[:, 2], [(0, 1, n)], 0.1),
            "vit _post_attention (compiled)": lambda: _post_attention(x, o, *pw),
            "vit _post_attention (shapeless)": lambda: post_sl(x, o, *pw),
            "lm _qkv (compiled)": lambda: lm_qkv(hl, *lw, 1e-6),
            "lm _rope (compiled)": lambda: _rope(q, k, lc, ls),
            "lm attention causal (cuDNN)": lambda: mx.fast.scaled_dot_product_attention(
                q, k, v, scale=0.1, mask="causal"),
            "lm _mlp_block (compiled)": lambda: _mlp_block(hl, ol, *lr, 1e-6),
            "lm _mlp_block (shapeless)": lambda: mlp_sl(hl, ol, lr[0], lr[1], lr[2][:LI], lr[2][LI:], lr[3]),
            "lm silu alone (nn.silu, no compile)": lambda: nn.silu(hl),
        }
        for name, fn in ops.items():
            t1 = timed(fn)
            t2 = timed(fn)
            print(f"| {s} | {n} | {length} | {name} | {t1:.1f} | {t2:.1f} |", flush=True)

    upload_table()


def upload_table(threads: int = 8) -> None:
    """Host -> device of decoded screenshots: mx.array on one thread, or in row bands on `threads`
    threads (then concatenated on the device), each followed by a device op that reads it all."""
    pool = ThreadPoolExecutor(threads)
    op = lambda t: t.astype(mx.float32).sum()

    def bands(rgb):
        parts = list(pool.map(mx.array, np.array_split(rgb, threads, axis=0)))
        return mx.concatenate(parts, axis=0)

    print("\n| upload of a decoded screenshot | host ms | host + device op ms |\n|---|---|---|")
    for w, h in ((1280, 720), (1920, 1080), (2560, 1440)):
        dev = mx.zeros((h, w, 3), mx.uint8) + 1
        mx.eval(dev)
        rgbs = [np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8) for i in range(8)]
        ways = {"device-born array (no upload)": lambda rgb: dev, "mx.array, one thread": mx.array,
                f"mx.array in {threads} row bands on {threads} threads": bands}
        times = {k: ([], []) for k in ways}
        for rgb in rgbs:
            for k, way in ways.items():
                mx.synchronize()
                t = time.perf_counter()
                up = way(rgb)
                host = time.perf_counter()
                mx.eval(op(up))
                mx.synchronize()
                times[k][0].append((host - t) * 1e3)
                times[k][1].append((time.perf_counter() - t) * 1e3)
        for k, (host, total) in times.items():
            print(f"| {w}x{h}: {k} | {np.median(host[2:]):.2f} | {np.median(total[2:]):.2f} |", flush=True)

if __name__ == "__main__":
    main()
