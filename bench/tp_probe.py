"""Is a 2B-shaped ViT faster split over two GPUs (tensor parallel, MLX's NCCL backend)?

`python3 -m bench.tp_probe [--ranks 2] [--size 1920x1080]` starts one process per GPU (each sees
only its own GPU) and, in each, with random bf16 weights of the 2B shape's ViT (32 blocks, 1280
wide, 16 heads of 80, MLP 5120):
- `alone`: the whole tower on this GPU alone (what a single-GPU worker runs);
- `megatron`: each rank has H/ranks heads and 5120/ranks MLP columns, and the two row-parallel
  outputs (attention projection, fc2) are summed over the ranks, 64 all_sums (regroups sums);
- `heads`: each rank its heads, then an all_gather; projection and MLP on every rank, all rows;
- `rows` (what the worker runs, workers/mlx/split.py): `heads`, then each rank's share of the rows
  through the projection and MLP, and a second all_gather joining the rows;
- `heads_local`: `heads` with the gather replaced by a local stand-in of its shape (so the
  difference is what the exchange costs inside the forward);
- `overlapN`: `heads` with each block's attention in N query chunks whose gathers run on a second
  stream beside the next chunk's attention and the previous chunk's projection and MLP (tried to
  hide the exchange; slower, bench/RESULTS.md);
- `collectives`: the collectives alone, at the split's shapes, one at a time (launch and host wait
  included) and 32 in a row in one graph (device time per collective).
It prints medians and each split tower's largest difference from the whole one.
`--parts` picks what runs (default all); NCCL's settings come from the environment, so a sweep
runs the probe once per setting (bench/gpu_session.sh, step nccl).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common.zmqutil import free_port

DIM, HEADS, HD, MLP, BLOCKS = 1280, 16, 80, 5120, 32


PARTS = ("collectives", "alone", "megatron", "heads", "heads_local", "rows", "overlap2", "overlap4")


def launch(ranks: int, size: str, reps: int, blocks: int, parts: str) -> int:
    port = free_port()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(ranks)]
    hostfile = "/tmp/tp_probe_hosts.json"      # the ring backend (CPU check) reads this
    with open(hostfile, "w") as f:
        json.dump([[f"127.0.0.1:{free_port()}"] for _ in range(ranks)], f)
    procs = []
    for r in range(ranks):
        env = dict(os.environ, MLX_RANK=str(r), MLX_WORLD_SIZE=str(ranks), NCCL_HOST_IP="127.0.0.1",
                   NCCL_PORT=str(port), CUDA_VISIBLE_DEVICES=gpus[r])
        if ranks > 1:
            env["MLX_HOSTFILE"] = hostfile
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.tp_probe", "--rank-run", "--size", size,
                                       "--reps", str(reps), "--blocks", str(blocks), "--parts", parts], env=env))
    return max(p.wait() for p in procs)


def rank_run(size: str, reps: int, blocks_n: int, parts: set[str]) -> None:
    import mlx.core as mx
    from workers.mlx import cuda_rotary
    from bench.timing import median_ms
    from workers.mlx.run_ahead import RunAhead
    from workers.mlx.vision import _post_attention, _qkv
    from workers.mlx.cuda_rotary import rotate_qk
    group = mx.distributed.init(strict=os.environ["MLX_WORLD_SIZE"] != "1",
                                backend="nccl" if mx.default_device() == mx.gpu else "ring")
    rank, ranks = group.rank(), group.size()
    DT = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32    # CPU: a quick check only
    w, h = (int(v) for v in size.split("x"))
    n = (round(h / 28) * 2) * (round(w / 28) * 2)
    mx.random.seed(0)           # the same weights on every rank
    sc = 0.02
    blocks = []
    for _ in range(blocks_n):
        blocks.append(dict(ln1=(mx.ones(DIM), mx.zeros(DIM)), ln2=(mx.ones(DIM), mx.zeros(DIM)),
                           qkv_w=mx.random.normal((3 * DIM, DIM)) * sc, qkv_b=mx.random.normal((3 * DIM,)) * sc,
                           proj_w=mx.random.normal((DIM, DIM)) * sc, proj_b=mx.random.normal((DIM,)) * sc,
                           fc1_w=mx.random.normal((MLP, DIM)) * sc, fc1_b=mx.random.normal((MLP,)) * sc,
                           fc2_w=mx.random.normal((DIM, MLP)) * sc, fc2_b=mx.random.normal((DIM,)) * sc))
    blocks = [{k: (tuple(t.astype(DT) for t in v) if isinstance(v, tuple) else v.astype(DT))
               for k, v in b.items()} for b in blocks]
    x0 = (mx.random.normal((n, DIM)) * 0.5).astype(DT)
    freqs = mx.random.uniform(shape=(n, HD // 2)) * 10
    cos, sin = mx.cos(freqs), mx.sin(freqs)
    mx.eval(blocks, x0, cos, sin)

    hl, ml = HEADS // ranks, MLP // ranks
    part = []                    # this rank's slices
    for b in blocks:
        q, k, v = (b["qkv_w"][i * DIM:(i + 1) * DIM] for i in range(3))
        qb, kb, vb = (b["qkv_b"][i * DIM:(i + 1) * DIM] for i in range(3))
        cols = slice(rank * hl * HD, (rank + 1) * hl * HD)
        mcols = slice(rank * ml, (rank + 1) * ml)
        part.append(dict(qkv_w=mx.concatenate([q[cols], k[cols], v[cols]]),
                         qkv_b=mx.concatenate([qb[cols], kb[cols], vb[cols]]),
                         proj_w=mx.contiguous(b["proj_w"][:, cols]), fc1_w=b["fc1_w"][mcols],
                         fc1_b=b["fc1_b"][mcols], fc2_w=mx.contiguous(b["fc2_w"][:, mcols])))
    mx.eval(part)
    rot_full = cuda_rotary.load(HEADS, HD, DT)
    rot_part = cuda_rotary.load(hl, HD, DT)

    @mx.compile
    def mlp_part(x, lw, lb, f1w, f1b, f2w):
        y = mx.fast.layer_norm(x, lw, lb, 1e-6)
        hh = mx.addmm(f1b, y, f1w.T)
        hh = hh * mx.sigmoid(1.702 * hh)
        return hh @ f2w.T

    def rotated(qkv, heads, rot):
        """q, k (rotated) and v [n, heads, HD] from the qkv projection."""
        if rot is not None:
            qk = rot(qkv, cos, sin)
            q, k = qk[:, 0], qk[:, 1]
        else:
            q, k = rotate_qk(qkv.reshape(n, 3, heads, HD), cos, sin)
        return q, k, qkv.reshape(n, 3, heads, HD)[:, 2]

    def attention(qkv, heads, rot):
        q, k, v = rotated(qkv, heads, rot)
        qs, ks, vs = (t.reshape(1, n, heads, HD).transpose(0, 2, 1, 3) for t in (q, k, v))
        o = mx.fast.scaled_dot_product_attention(qs, ks, vs, scale=HD ** -0.5)
        return o.transpose(0, 2, 1, 3).reshape(n, heads * HD)

    def tower(block):
        """32 blocks, two per chunk as the worker runs them; `block(x, whole weights, this rank's part)`."""
        pace = RunAhead(2)
        x = x0
        for i, (b, p) in enumerate(zip(blocks, part)):
            x = block(x, b, p)
            if i % 2 == 1:
                pace(x)
        return x

    def block_alone(x, b, p):
        o = attention(_qkv(x, *b["ln1"], b["qkv_w"], b["qkv_b"]), HEADS, rot_full)
        return _post_attention(x, o, b["proj_w"], b["proj_b"], *b["ln2"], b["fc1_w"], b["fc1_b"], b["fc2_w"], b["fc2_b"])

    def block_megatron(x, b, p):
        o = attention(_qkv(x, *b["ln1"], p["qkv_w"], p["qkv_b"]), hl, rot_part)
        x = x + mx.distributed.all_sum(o @ p["proj_w"].T, group=group) + b["proj_b"]
        return x + mx.distributed.all_sum(mlp_part(x, *b["ln2"], p["fc1_w"], p["fc1_b"], p["fc2_w"]),
                                          group=group) + b["fc2_b"]

    def gathered(o):
        """[n, hl*HD] per rank -> [n, DIM], heads in rank order, as Split.gather_along(o, 1)."""
        g = mx.distributed.all_gather(o, group=group)                                 # [ranks*n', hl*HD]
        return g.reshape(ranks, -1, hl * HD).transpose(1, 0, 2).reshape(-1, DIM)

    def local_stand_in(o):
        """The same shapes and copies as `gathered`, no exchange (wrong values; timing only)."""
        g = mx.concatenate([o] * ranks, axis=0)
        return g.reshape(ranks, -1, hl * HD).transpose(1, 0, 2).reshape(-1, DIM)

    def heads_block(join):
        def block(x, b, p):
            o = attention(_qkv(x, *b["ln1"], p["qkv_w"], p["qkv_b"]), hl, rot_part)      # [n, hl*HD]
            return _post_attention(x, join(o), b["proj_w"], b["proj_b"], *b["ln2"], b["fc1_w"], b["fc1_b"],
                                   b["fc2_w"], b["fc2_b"])
        return block

    def rows_block(x, b, p):
        """Heads split for the attention, then each rank its 1/ranks of the rows through the
        projection and MLP, and the rows gathered (every row's arithmetic as on one GPU)."""
        o = gathered(attention(_qkv(x, *b["ln1"], p["qkv_w"], p["qkv_b"]), hl, rot_part))
        lo, hi = rank * n // ranks, (rank + 1) * n // ranks
        mine = _post_attention(x[lo:hi], o[lo:hi], b["proj_w"], b["proj_b"], *b["ln2"], b["fc1_w"], b["fc1_b"],
                               b["fc2_w"], b["fc2_b"])
        return mx.distributed.all_gather(mine, group=group)

    comm = mx.new_stream(mx.default_device())

    def overlap_block(chunks):
        """Attention by query chunks; chunk c's gather runs on `comm` while chunk c+1's attention
        runs (each chunk's gather is made to wait for the next chunk's attention in the graph, so
        MLX encodes that attention first), and the projection and MLP run by the same row chunks."""
        bounds = [n * c // chunks for c in range(chunks + 1)]

        def block(x, b, p):
            q, k, v = rotated(_qkv(x, *b["ln1"], p["qkv_w"], p["qkv_b"]), hl, rot_part)
            ks, vs = (t.reshape(1, n, hl, HD).transpose(0, 2, 1, 3) for t in (k, v))
            outs = []
            for lo, hi in zip(bounds, bounds[1:]):
                qs = q[lo:hi].reshape(1, hi - lo, hl, HD).transpose(0, 2, 1, 3)
                o = mx.fast.scaled_dot_product_attention(qs, ks, vs, scale=HD ** -0.5)
                outs.append(o.transpose(0, 2, 1, 3).reshape(hi - lo, hl * HD))
            rows = []
            for c, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
                g = mx.distributed.all_gather(outs[c], group=group, stream=comm)
                if c + 1 < chunks:
                    g = mx.depends(g, outs[c + 1])
                o = g.reshape(ranks, hi - lo, hl * HD).transpose(1, 0, 2).reshape(hi - lo, DIM)
                rows.append(_post_attention(x[lo:hi], o, b["proj_w"], b["proj_b"], *b["ln2"], b["fc1_w"],
                                            b["fc1_b"], b["fc2_w"], b["fc2_b"]))
            return mx.concatenate(rows, axis=0)
        return block

    towers = {"alone": lambda: tower(block_alone),
              "megatron": lambda: tower(block_megatron),
              "heads": lambda: tower(heads_block(gathered)),
              "heads_local": lambda: tower(heads_block(local_stand_in)),
              "rows": lambda: tower(rows_block),
              "overlap2": lambda: tower(overlap_block(2)),
              "overlap4": lambda: tower(overlap_block(4))}

    res = {"rank": rank, "ranks": ranks, "tokens": n, "device": str(mx.default_device()),
           "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_") and k not in ("NCCL_HOST_IP", "NCCL_PORT")}}
    if "collectives" in parts:
        act = (mx.random.normal((n, DIM))).astype(DT)
        kv = (mx.random.normal((2816 // ranks, 512))).astype(DT)        # one LM layer's k and v share
        mx.eval(act, kv)

        def chained(op, x, times=32):
            for _ in range(times):
                x = op(x)[:x.shape[0]]
            return x
        gather = lambda x: mx.distributed.all_gather(x, group=group)    # noqa: E731
        total = lambda x: mx.distributed.all_sum(x, group=group)        # noqa: E731
        half = mx.contiguous(act[:, :DIM // ranks])
        for name, op, x in (("all_sum", total, act), ("all_gather_heads", gather, half), ("all_gather_kv", gather, kv)):
            res[f"{name}_mb"] = round(x.nbytes * (ranks if op is gather else 1) / 1e6, 2)
            res[f"{name}_one_ms"] = median_ms(lambda: op(x), reps * 3)
            res[f"{name}_in_row_ms"] = median_ms(lambda: chained(op, x), reps) / 32
    full = None
    for name, fn in towers.items():
        if name not in parts:
            continue
        res[f"tower_{name}_ms"] = median_ms(fn, reps)
        if name == "alone":
            full = fn().astype(mx.float32)
        elif full is not None and name != "heads_local":
            got = fn().astype(mx.float32)
            res[f"{name}_max_abs_diff"] = float(mx.abs(got - full).max())
    res["peak_gb"] = mx.get_peak_memory() / 1e9
    print(json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=BLOCKS)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--rank-run", action="store_true")
    a = ap.parse_args()
    if unknown := set(a.parts.split(",")) - set(PARTS):
        ap.error(f"unknown parts {sorted(unknown)}")
    if a.rank_run:
        rank_run(a.size, a.reps, a.blocks, set(a.parts.split(",")))
    else:
        sys.exit(launch(a.ranks, a.size, a.reps, a.blocks, a.parts))


if __name__ == "__main__":
    main()
