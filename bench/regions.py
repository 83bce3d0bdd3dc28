"""The points' region search on a 1080p map: C (workers/regions.c) against its NumPy fallback,
back to back and after the thread slept as through a forward.

    python -m bench.regions [--grid 39x69] [--reps 60] [--sleep-ms 90]

Why: in the stack the search runs right after a ~90 ms forward, during which the compute thread
slept; with its caches cold the NumPy version's ~40 calls take several times longer than back to
back. Per map kind (flat, uniform random, peaked as a trained model's, a snake through every other
row, a checkerboard), p50 ms of `extract_regions(first=3)` (the engine passes the request's top-k)
and of the same with every region, each way, with and without the sleep before each call. Checks
that both ways give the same regions first. The cold cells take reps x sleep each (~5 s by default).
"""
from __future__ import annotations

import argparse

import numpy as np

from bench.timing import host_median_ms
from workers.families import gui_actor as ga


def maps(n_h: int, n_w: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:n_h, 0:n_w]
    peaked = (np.exp(-((x - 0.45 * n_w) ** 2 + (y - 0.5 * n_h) ** 2) / 6.0)
              + 0.7 * np.exp(-((x - 0.8 * n_w) ** 2 + (y - 0.2 * n_h) ** 2) / 3.0) + 0.02 * rng.random((n_h, n_w)))
    snake = np.zeros((n_h, n_w))
    snake[::2] = 1
    snake[1::4, -1] = 1
    snake[3::4, 0] = 1
    return {"flat": np.ones((n_h, n_w)), "random": rng.random((n_h, n_w)), "peaked": peaked,
            "snake": snake + 1e-3 * rng.random((n_h, n_w)), "checkerboard": (y + x) % 2 + 0.01}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default="39x69", help="token rows x columns (1080p: 39x69)")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--sleep-ms", type=float, default=90.0)
    a = ap.parse_args()
    n_h, n_w = map(int, a.grid.split("x"))
    if ga._regions is None:
        raise SystemExit("workers._regions is not built (setup.py); nothing to compare")
    c_way = ga._regions
    print(f"grid {n_h}x{n_w}, p50 of {a.reps} calls, ms; 'cold': after {a.sleep_ms:g} ms asleep\n")
    print("| map | regions | first | C warm | NumPy warm | C cold | NumPy cold |")
    print("|---|---|---|---|---|---|---|")
    for name, m in maps(n_h, n_w).items():
        s = m.astype(np.float32).reshape(-1)
        every = ga.extract_regions(s, n_h, n_w)
        assert every == ga.regions_numpy(s, n_h, n_w), f"{name}: C and NumPy differ"
        for first in (3, None):
            cells = []
            for sleep in (0.0, a.sleep_ms / 1e3):
                for way in (c_way, None):
                    ga._regions = way
                    cells.append(host_median_ms(lambda: ga.extract_regions(s, n_h, n_w, first=first), a.reps, sleep))
            ga._regions = c_way
            print(f"| {name} | {len(every)} | {first or 'all'} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
