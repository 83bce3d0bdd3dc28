"""The worker's PNG decode while other processes keep every CPU busy: at idle priority, at nice 19,
at nice 0, or none.

    python -m bench.decode_beside [--content plain,busy] [--reps 40] [--rounds 2]

Why: the C unfilterer's threads wait for each other (workers/png_unfilter.c). A wait that yields
the core (sched_yield) lets Linux's EEVDF scheduler (6.6 on) run whatever else is runnable there
for the rest of a tick, an idle-priority process included; a wait that sleeps on a futex gives the
core away only until it is woken, and the woken thread preempts lower-priority work. A GPU host
often runs other work beside the server (data loaders, a browser an agent drives, batch jobs).

Decodes bench.screens' 1080p PNG screenshots (plain, ~38 KB; busy, ~590 KB) with
workers.images.decode_image, as the worker does, back to back, while one `python -c "while True:
pass"` per CPU runs pinned to it (`taskset`; `chrt -i 0` for idle priority, `nice -n 19`); p50 and
p90 ms.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from bench.screens import encoded
from workers.images import decode_image

HOGS = {"none": None, "idle priority": ["chrt", "-i", "0"], "nice 19": ["nice", "-n", "19"], "nice 0": []}


def hogs(kind: str) -> list[subprocess.Popen]:
    prefix = HOGS[kind]
    if prefix is None:
        return []
    procs = [subprocess.Popen(["taskset", "-c", str(cpu), *prefix, sys.executable, "-c", "while True: pass"])
             for cpu in sorted(os.sched_getaffinity(0))]
    time.sleep(0.3)
    return procs


def decode_ms(datas: list[bytes], reps: int) -> tuple[float, float]:
    ts = []
    for i in range(reps):
        t = time.perf_counter()
        decode_image(datas[i % len(datas)], 1 << 30)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3, statistics.quantiles(ts, n=10)[-1] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--content", default="plain,busy")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    print(f"{len(os.sched_getaffinity(0))} CPUs, kernel {os.uname().release}")
    print("| screenshot | round | other processes, one per CPU | decode p50 ms | p90 ms |\n|---|---|---|---|---|")
    for content in a.content.split(","):
        datas = [encoded(1920, 1080, seed, "png", content == "busy") for seed in range(4)]
        decode_ms(datas, 5)                        # warm-up: the pool, the allocator
        for r in range(a.rounds):
            for kind in HOGS:
                procs = hogs(kind)
                try:
                    p50, p90 = decode_ms(datas, a.reps)
                finally:
                    for p in procs:
                        p.kill()
                        p.wait()
                print(f"| {content} | {r + 1} | {kind} | {p50:.2f} | {p90:.2f} |", flush=True)


if __name__ == "__main__":
    main()
