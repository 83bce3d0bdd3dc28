"""The same collectives as bench.tp_probe's, through PyTorch's NCCL: what this host's GPUs give.

`python3 -m bench.torch_collectives [--ranks 2] [--tokens 10764]` (on the GPU machine, whose image
has PyTorch): one process per GPU; for each collective at the split's shapes (bf16), the median
time of one call with the host waiting for it, and of 32 calls in a row (device time per call).
A baseline for MLX's numbers in the same call: MLX and PyTorch each bring their own NCCL.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from common.zmqutil import free_port

DIM = 1280


def rank_run(rank: int, ranks: int, tokens: int, reps: int, port: int) -> None:
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=ranks, device_id=torch.device("cuda", rank))
    bf = dict(dtype=torch.bfloat16, device="cuda")
    act = torch.randn(tokens, DIM, **bf)
    half = torch.randn(tokens, DIM // ranks, **bf)
    kv = torch.randn(2816 // ranks, 512, **bf)

    def gather(x):
        out = torch.empty(ranks * x.shape[0], *x.shape[1:], **bf)
        dist.all_gather_into_tensor(out, x)
        return out

    def total(x):
        dist.all_reduce(x)
        return x

    def timed(fn, n):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    res = {"rank": rank, "nccl": ".".join(map(str, torch.cuda.nccl.version())), "torch": torch.__version__}
    for name, op, x in (("all_sum", total, act), ("all_gather_heads", gather, half), ("all_gather_kv", gather, kv)):
        res[f"{name}_one_ms"] = timed(lambda: op(x), reps * 3)
        res[f"{name}_in_row_ms"] = timed(lambda: [op(x) for _ in range(32)], reps) / 32
    print(json.dumps(res), flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=10764)     # one 1080p screenshot's patches
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    import torch.multiprocessing as mp
    mp.spawn(rank_run, args=(a.ranks, a.tokens, a.reps, free_port()), nprocs=a.ranks)


if __name__ == "__main__":
    main()
