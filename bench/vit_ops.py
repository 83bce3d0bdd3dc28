"""Where a Qwen2-VL ViT block's time goes at one screenshot's size (GPU; random bf16 weights).

    python -m bench.vit_ops [W H] [--reps N]

Each line times one operation 32 times in one graph (a 32-block tower's worth), median of N, and
prints its achieved TFLOP/s or GB/s, so the ops far from the card's peak stand out. Compared in the
same call: our compiled pre/post-attention parts as the engine runs them, their pieces alone, and
variants (bias fused or not, weights pre-transposed, rotary in bf16).
"""
from __future__ import annotations

import argparse

import mlx.core as mx

from bench.timing import median_ms
from workers.mlx import cuda_rotary
from workers.mlx.cuda_rotary import rotate_half as _rotate_half, rotate_qk as _rotate_qk
from workers.mlx.vision import _post_attention, _qkv

DEPTH, C, HEADS, MLP = 32, 1280, 16, 5120


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("size", nargs="*", type=int, default=[1920, 1080])
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    w, h = a.size
    gh, gw = round(h / 28) * 2, round(w / 28) * 2
    n, hd = gh * gw, C // HEADS
    bf = mx.bfloat16
    r = lambda *s: (mx.random.normal(s) * 0.02).astype(bf)
    x, ln_w, ln_b = r(n, C), mx.ones((C,), bf), mx.zeros((C,), bf)
    qkv_w, qkv_b, proj_w, proj_b = r(3 * C, C), r(3 * C), r(C, C), r(C)
    fc1_w, fc1_b, fc2_w, fc2_b = r(MLP, C), r(MLP), r(C, MLP), r(C)
    qkv_wt, fc1_wt, fc2_wt = (mx.contiguous(t.T) for t in (qkv_w, fc1_w, fc2_w))
    ang = mx.random.normal((n, hd // 2))
    cos, sin = mx.cos(ang), mx.sin(ang)
    cos2, sin2 = mx.concatenate([cos, cos], -1), mx.concatenate([sin, sin], -1)
    pre = lambda: _rotate_qk(_qkv(x, ln_w, ln_b, qkv_w, qkv_b).reshape(n, 3, HEADS, hd), cos, sin)
    q, k = pre()
    v = _qkv(x, ln_w, ln_b, qkv_w, qkv_b).reshape(n, 3, HEADS, hd)[:, 2]
    q4 = mx.contiguous(q.transpose(1, 0, 2)[None])
    o = r(n, C)
    hmid = r(n, MLP)
    mx.eval(x, q, k, v, q4, o, hmid, qkv_wt, fc1_wt, fc2_wt)
    gelu = mx.compile(lambda t: t * mx.sigmoid(1.702 * t))
    ln = lambda t: mx.fast.layer_norm(t, ln_w, ln_b, 1e-6)

    @mx.compile
    def rope32(q, k, cos, sin):
        c, s = cos[:, None], sin[:, None]
        qf, kf = q.astype(mx.float32), k.astype(mx.float32)
        return (qf * c + _rotate_half(qf) * s).astype(bf), (kf * c + _rotate_half(kf) * s).astype(bf)

    @mx.compile
    def rope16(q, k, cos, sin):
        c, s = cos[:, None].astype(bf), sin[:, None].astype(bf)
        return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s

    def sdpa_strided():
        qs, ks, vs = (t.transpose(1, 0, 2)[None] for t in (q, k, v))
        return mx.fast.scaled_dot_product_attention(qs, ks, vs, scale=hd ** -0.5)[0].transpose(1, 0, 2).reshape(n, C)

    mm = lambda m, kk, nn: 2 * m * kk * nn
    attn_flop = 4 * n * n * C
    act = n * C * 2
    cases = [
        ("qkv addmm (bias fused)", lambda: mx.addmm(qkv_b, x, qkv_w.T), mm(n, C, 3 * C), 0),
        ("qkv matmul, no bias", lambda: x @ qkv_w.T, mm(n, C, 3 * C), 0),
        ("qkv matmul, pre-transposed weight", lambda: x @ qkv_wt, mm(n, C, 3 * C), 0),
        ("proj addmm", lambda: mx.addmm(proj_b, o, proj_w.T), mm(n, C, C), 0),
        ("fc1 addmm", lambda: mx.addmm(fc1_b, x, fc1_w.T), mm(n, C, MLP), 0),
        ("fc1 matmul + bias, pre-transposed", lambda: x @ fc1_wt + fc1_b, mm(n, C, MLP), 0),
        ("fc2 addmm", lambda: mx.addmm(fc2_b, hmid, fc2_w.T), mm(n, MLP, C), 0),
        ("fc2 matmul, pre-transposed", lambda: hmid @ fc2_wt, mm(n, MLP, C), 0),
        ("layer norm", lambda: ln(x), 0, 2 * act),
        ("quick-GELU (compiled)", lambda: gelu(hmid), 0, 4 * act * 2),
        ("rotary q,k fp32 (compiled)", lambda: rope32(q, k, cos2, sin2), 0, 4 * act + 2 * n * hd * 4),
        ("rotary q,k bf16 (compiled)", lambda: rope16(q, k, cos2, sin2), 0, 4 * act + 2 * n * hd * 4),
        ("sdpa, contiguous [1,H,N,D]", lambda: mx.fast.scaled_dot_product_attention(q4, q4, q4, scale=hd ** -0.5), attn_flop, 0),
        ("sdpa from [N,H,D] views + output reshape", sdpa_strided, attn_flop, 0),
        ("pre-attention, MLX ops (LN + qkv, rotary compiled)", pre, mm(n, C, 3 * C), 0),
        ("post-attention (compiled: proj, LN, MLP)", lambda: _post_attention(x, o, proj_w, proj_b, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b),
         mm(n, C, C) + 2 * mm(n, C, MLP), 0),
    ]
    rot = cuda_rotary.load(HEADS, hd, bf)
    if rot is not None:
        qkv = _qkv(x, ln_w, ln_b, qkv_w, qkv_b)
        ch, sh = cos, sin
        hf = rot(qkv, ch, sh)
        mx.eval(qkv, hf)
        ref = cuda_rotary.reference(qkv, ch, sh, HEADS)
        mism = (hf != ref).sum().item()
        qh, kh, vh = (mx.contiguous(t.transpose(1, 0, 2)[None]) for t in (q, k, v))
        mx.eval(qh, kh, vh)
        print(f"CUDA rotary kernel vs MLX ops: {mism} of {hf.size} values differ, max |diff| "
              f"{mx.abs(hf.astype(mx.float32) - ref.astype(mx.float32)).max().item():.3g}")
        cases += [
            ("CUDA rotary kernel alone", lambda: rot(qkv, ch, sh), 0, 6 * act + 2 * n * hd * 4),
            ("pre-attention with the kernel (LN, qkv, kernel)", lambda: rot(_qkv(x, ln_w, ln_b, qkv_w, qkv_b), ch, sh),
             mm(n, C, 3 * C), 0),
            ("sdpa from the kernel's q, k + output reshape", lambda: mx.fast.scaled_dot_product_attention(
                *(t.transpose(1, 0, 2)[None] for t in (hf[:, 0], hf[:, 1], v)), scale=hd ** -0.5)[0]
             .transpose(1, 0, 2).reshape(n, C), attn_flop, 0),
            ("sdpa, head-major q, k, v (separate arrays) + output reshape", lambda: mx.fast.scaled_dot_product_attention(
                qh, kh, vh, scale=hd ** -0.5)[0].transpose(1, 0, 2).reshape(n, C), attn_flop, 0),
        ]
    else:
        print("CUDA rotary kernel: not available on this device")
    print(f"device {mx.default_device()}  {w}x{h}: {n} patches, {DEPTH} repeats per timing", flush=True)
    print("\n| op (x32) | ms | TFLOP/s | GB/s |\n|---|---|---|---|")
    for name, fn, flop, nbytes in cases:
        ms = median_ms(lambda: [fn() for _ in range(DEPTH)], a.reps)
        tf = f"{DEPTH * flop / ms / 1e9:.0f}" if flop else "-"
        gb = f"{DEPTH * nbytes / ms / 1e6:.0f}" if nbytes else "-"
        print(f"| {name} | {ms:.2f} | {tf} | {gb} |", flush=True)


if __name__ == "__main__":
    main()
