"""Where our ViT forward spends its time, part by part, at one screenshot's size (GPU).

    python -m bench.tower_ops [--shape 3b-qwen2.5|2b] [--size 1920x1080] [--reps N]

Writes a checkpoint with the shape's real vision tower and a one-layer language model (random
bf16), loads it through MlxEngine, and times on one screenshot (median of N):
- the whole tower as the engine runs it (chunks, run-ahead);
- each part over all the blocks it runs in, at the tower's own shapes: norm + qkv, rotary,
  attention (windowed and full blocks apart), projection + MLP, and the ordering and merger;
- for Qwen2.5-VL's windowed blocks, variants of their attention: the strided views `attend`
  takes, contiguous head-major windows, matmul + softmax, and from the qkv projection the rotary
  kernel + `attend` against kernels doing both (workers/mlx/cuda_window_attention.py on tensor
  cores; bench/window_attention_kernel.py on CUDA cores, not kept), and the whole tower with and
  without the first;
- for Qwen2.5-VL, the projection + MLP at the checkpoint's MLP width and widened with zeros to
  multiples of 16, 64 and 256 (workers/mlx/vision_qwen2_5.py, `widened_mlp`).
The parts' sum against the whole shows what falls between them; a part far from its share of
the arithmetic points at what to change.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import mlx.core as mx

from bench.screens import png_bytes
from bench.timing import median_ms
from bench.write_checkpoint import SHAPES
from common.config import ModelSpec
from workers.engine import EngineOptions, GroundingRequest
from workers.images import MERGE
from workers.mlx.engine import MlxEngine
from workers.mlx.run_ahead import RunAhead
from workers.mlx.vision import attend, normalized_patches
from workers.tiny_checkpoint import Dims, write_tiny_checkpoint


def windowed_variants(q, k, v, spans, scale, qkv, cos, sin, rotated):
    """Attention of one windowed block, several ways -> {name: fn}; the last two include the
    rotary, from the qkv projection."""
    n, heads, hd = q.shape

    def head_major(t):
        return [mx.contiguous(t[s:s + c * z].reshape(c, z, heads, hd).transpose(0, 2, 1, 3)) for s, c, z in spans]

    qh, kh, vh = head_major(q), head_major(k), head_major(v)
    mx.eval(qh, kh, vh)

    def contiguous():
        outs = [mx.fast.scaled_dot_product_attention(a, b, c, scale=scale) for a, b, c in zip(qh, kh, vh)]
        return mx.concatenate([o.transpose(0, 2, 1, 3).reshape(-1, heads * hd) for o in outs])

    def matmul_softmax():
        outs = []
        for a, b, c in zip(qh, kh, vh):
            s = (a * scale) @ b.transpose(0, 1, 3, 2)
            p = mx.softmax(s.astype(mx.float32), axis=-1).astype(a.dtype)
            outs.append((p @ c).transpose(0, 2, 1, 3).reshape(-1, heads * hd))
        return mx.concatenate(outs)

    def rotary_then_attend():
        q2, k2 = rotated(qkv)
        return attend(q2, k2, v, spans, scale)

    variants = {"strided views (the tower's attend)": lambda: attend(q, k, v, spans, scale),
                "contiguous head-major windows": contiguous,
                "matmul + float32 softmax": matmul_softmax,
                "rotary kernel + strided views (from qkv)": rotary_then_attend}
    try:
        from bench.window_attention_kernel import SimtWindowAttention
        from workers.mlx.cuda_window_attention import CudaWindowAttention, windows
        wins = windows(spans)
        for name, cls in (("on CUDA cores, not kept", SimtWindowAttention), ("on tensor cores, the server's", CudaWindowAttention)):
            kernel = cls(heads, hd, scale)
            mx.eval(kernel(qkv, cos, sin, *wins))
            variants[f"one kernel, rotary inside (from qkv), {name}"] = lambda k=kernel: k(qkv, cos, sin, *wins)
    except Exception as exc:          # not CUDA, or the kernel failed to build: say why
        print(f"window attention kernel: {type(exc).__name__}: {exc}")
    return variants


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=tuple(SHAPES), default="3b-qwen2.5")
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--checkpoint", default=None, help="where to write it (default /tmp/tower_ops_SHAPE)")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny sizes (a CPU check of this script)")
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    backbone, dims, _ = SHAPES[a.shape]
    on_gpu = mx.default_device() == mx.gpu
    d = Dims(fullatt_blocks=(1,)) if a.tiny else dataclasses.replace(dims(), layers=1, intermediate=256)
    path = a.checkpoint or f"/tmp/tower_ops_{a.shape}{'_tiny' if a.tiny else ''}"
    if not os.path.exists(os.path.join(path, "config.json")):
        write_tiny_checkpoint(path, backbone, seed=0, dims=d, dtype="BF16" if on_gpu else "F32")
    eng = MlxEngine(ModelSpec(path=path, max_pixels=5_720_064), EngineOptions("ops", "/tmp", 1 << 30))
    eng.load()
    job = eng.prepare(GroundingRequest("c", png_bytes(w, h), "click OK"))
    rgb = eng._resized(job.image)
    grids = [tuple(job.image.grid_thw[1:])]
    vis = eng._vision
    patches = normalized_patches(rgb, vis.dtype)
    mx.eval(patches)
    depth = len(vis.blocks)
    reps = a.reps
    whole = median_ms(lambda: vis([patches], grids, RunAhead(2)), reps)
    kernel = getattr(vis, "window_attention", None)
    if kernel is not None:              # the same tower without the window attention kernel
        out = vis([patches], grids).astype(mx.float32)
        vis.window_attention = None
        without = median_ms(lambda: vis([patches], grids, RunAhead(2)), reps)
        diff = mx.abs(vis([patches], grids).astype(mx.float32) - out)
        vis.window_attention = kernel
        print(f"whole tower without the window attention kernel: {without:.2f} ms, with it {whole:.2f} ms; "
              f"merger output max abs diff {diff.max().item():.3g}, mean {diff.mean().item():.3g} "
              f"(largest value {mx.abs(out).max().item():.3g})")

    # the tower's own intermediate shapes, as its forward builds them
    x = patches @ vis.patch_w
    cos, sin = vis._rotary(*grids[0])
    order = vis.group_order(grids)
    unit = MERGE * MERGE
    reorder = (lambda t: t.reshape(-1, unit, t.shape[-1])[mx.array(order)].reshape(-1, t.shape[-1])) \
        if order is not None else (lambda t: t)
    x, cos, sin = reorder(x), reorder(cos), reorder(sin)
    n = x.shape[0]
    qkv = vis.qkv(x, 0)
    mx.eval(x, cos, sin, qkv)

    def rotated(t):
        if vis.rotary is not None:
            qk = vis.rotary(t, cos, sin)
            return qk[:, 0], qk[:, 1]
        from workers.mlx.cuda_rotary import rotate_qk
        return rotate_qk(t.reshape(n, 3, vis.heads, vis.head_dim), cos, sin)

    q, k = rotated(qkv)
    v = qkv.reshape(n, 3, vis.heads, vis.head_dim)[:, 2]
    o = attend(q, k, v, vis.spans(0, grids), vis.scale)
    mx.eval(q, k, v, o)
    full = [i for i in range(depth) if i in getattr(vis, "full_blocks", range(depth))]
    windowed = [i for i in range(depth) if i not in full]
    parts = [
        ("norm + qkv", depth, lambda: [vis.qkv(x, i) for i in range(depth)]),
        ("rotary", depth, lambda: [rotated(qkv) for _ in range(depth)]),
        ("attention, full blocks", len(full),
         lambda: [attend(q, k, v, vis.spans(i, grids), vis.scale) for i in full]),
    ]
    if windowed:
        parts.append(("attention, windowed blocks", len(windowed),
                      lambda: [attend(q, k, v, vis.spans(i, grids), vis.scale) for i in windowed]))
    parts += [
        ("projection + MLP", depth, lambda: [vis.post_attention(x, o, i) for i in range(depth)]),
        ("patch embed, rotary tables, ordering", 1,
         lambda: [reorder(patches @ vis.patch_w), *vis._rotary(*grids[0])]),
        ("merger", 1, lambda: vis.tower.merger(x)),
    ]
    print(f"device {mx.default_device()}  {a.shape} tower at {w}x{h}: {n} patches, {depth} blocks "
          f"({len(full)} full-attention), {vis.heads} heads of {vis.head_dim}", flush=True)
    if windowed:
        print(f"windowed blocks' spans (first token, windows, tokens each): {vis.spans(windowed[0], grids)}")
    print(f"\n| part | blocks | ms |\n|---|---|---|\n| whole tower as the engine runs it | {depth} | {whole:.2f} |")
    total = 0.0
    for name, times, fn in parts:
        ms = median_ms(fn, reps)
        total += ms
        print(f"| {name} | {times} | {ms:.2f} |", flush=True)
    print(f"| sum of the parts | | {total:.2f} |")
    if windowed:
        print(f"\nOne windowed block's attention, {len(windowed)} times in one graph:\n\n| variant | ms | max abs diff |\n|---|---|---|")
        spans = vis.spans(windowed[0], grids)
        variants = windowed_variants(q, k, v, spans, vis.scale, qkv, cos, sin, rotated)
        ref = variants["strided views (the tower's attend)"]().astype(mx.float32)
        for name, fn in variants.items():
            diff = mx.abs(fn().astype(mx.float32) - ref).max().item()
            ms = median_ms(lambda: [fn() for _ in windowed], reps)
            print(f"| {name} | {ms:.2f} | {diff:.3g} |", flush=True)
        mlp_widths(vis, x, o, d.vis_intermediate, reps)


def mlp_widths(vis, x, o, width: int, reps: int) -> None:
    """Qwen2.5-VL's projection + SwiGLU MLP over all blocks at the checkpoint's MLP width and
    widened to multiples of several alignments."""
    from workers.mlx.vision_qwen2_5 import _post_attention_swiglu, widened_mlp

    def at(post, align):
        proj_w, proj_b, norm_w, gate_w, gate_b, up_w, up_b, down_w, down_b = post
        mlp = widened_mlp(gate_w[:width], gate_b[:width], up_w[:width], up_b[:width],
                          mx.contiguous(down_w[:, :width]), align)
        return (proj_w, proj_b, norm_w, *mlp, down_b)

    print(f"\nProjection + MLP, {len(vis.blocks)} blocks, by MLP width:\n\n| width | ms | max abs diff from width {width} |\n|---|---|---|")
    ref = None
    for align in (1, 16, 64, 256):
        posts = [at(post, align) for _, post in vis.blocks]
        mx.eval(posts)
        out = _post_attention_swiglu(x, o, *posts[0]).astype(mx.float32)
        ref = out if ref is None else ref
        ms = median_ms(lambda: [_post_attention_swiglu(x, o, *p) for p in posts], reps)
        print(f"| {posts[0][3].shape[0]} | {ms:.2f} | {mx.abs(out - ref).max().item():.3g} |", flush=True)


if __name__ == "__main__":
    main()
