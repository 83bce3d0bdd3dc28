"""Round trip client -> broker -> worker (fake engine, no work) -> client.

    python bench/roundtrip.py [--jobs 3000] [--big-jobs 300] [--clients 1,8]

Starts `python -m broker` and `python -m workers.supervisor` on free loopback ports with a
fake-engine config (latency 0), waits for the model to load, then runs closed-loop clients
(each sends its next job when the previous answer arrives) with a 1 KB and a 2 MB image blob
(a small PNG padded with a private chunk: the worker still reads a real image header).
Prints a markdown table: p50/p95 latency in ms and jobs/s. Targets (issue 2): p50 <= 1 ms (1 KB),
<= 5 ms (2 MB), >= 2000 jobs/s (1 KB, 8 clients).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from common.client import AsyncClient  # noqa: E402
from common.zmqutil import free_tcp_endpoint  # noqa: E402
from tests.rawbroker import terminate  # noqa: E402


def padded_png(total_bytes: int) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, "PNG")
    data = buf.getvalue()
    pad = max(0, total_bytes - len(data) - 12)
    body = b"\0" * pad
    chunk = struct.pack(">I", pad) + b"prVt" + body + struct.pack(">I", zlib.crc32(b"prVt" + body))
    return data[:-12] + chunk + data[-12:]


def start_stack(tmp: Path) -> tuple[list[subprocess.Popen], str]:
    client_ep, worker_ep = free_tcp_endpoint(), free_tcp_endpoint()
    cfg = {"broker": {"client_endpoint": client_ep, "worker_endpoint": worker_ep, "queue_size": 256},
           "models": {"bench": {"path": "fake", "engine": "fake", "preload": True, "max_batch": 8,
                                "fake": {"load_s": 0, "latency_ms": 0}}},
           "cache_dir": str(tmp / "cache"), "log_level": "warning"}
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(tmp / "stack.log", "wb")
    procs = [subprocess.Popen([sys.executable, "-m", mod, "--config", str(path)], cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
             for mod in ("broker", "workers.supervisor")]
    return procs, client_ep


async def wait_loaded(endpoint: str, timeout_s: float = 30.0) -> None:
    async with AsyncClient(endpoint) as c:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if any(m["status"] == "loaded" for m in await c.models()):
                    return
            except Exception:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("model not loaded")


async def scenario(endpoint: str, blob: bytes, clients: int, jobs: int, warmup: int = 50) -> dict:
    """`clients` closed-loop clients share `jobs` jobs; returns latency stats in ms and jobs/s."""
    cs = [AsyncClient(endpoint) for _ in range(clients)]
    for c in cs:
        await c.start()
    try:
        for c in cs:
            for _ in range(warmup // clients + 1):
                await c.ground("bench", blob, "click ok")
        lat: list[float] = []
        per = jobs // clients

        async def loop(c: AsyncClient) -> None:
            for _ in range(per):
                t0 = time.perf_counter()
                await c.ground("bench", blob, "click ok")
                lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await asyncio.gather(*(loop(c) for c in cs))
        elapsed = time.perf_counter() - t0
    finally:
        for c in cs:
            await c.close()
    lat.sort()
    return {"p50": lat[len(lat) // 2] * 1000, "p95": lat[int(len(lat) * 0.95)] * 1000,
            "rate": len(lat) / elapsed, "n": len(lat)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4000, help="jobs per 1 KB scenario")
    ap.add_argument("--big-jobs", type=int, default=400, help="jobs per 2 MB scenario")
    ap.add_argument("--clients", default="1,8", help="comma-separated client counts")
    args = ap.parse_args()
    counts = [int(x) for x in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        procs, endpoint = start_stack(Path(tmp))
        try:
            asyncio.run(wait_loaded(endpoint))
            rows = []
            for label, size, n in (("1 KB", 1024, args.jobs), ("2 MB", 2 * 1024 * 1024, args.big_jobs)):
                blob = padded_png(size)
                for k in counts:
                    r = asyncio.run(scenario(endpoint, blob, k, n))
                    rows.append((label, k, r))
        finally:
            terminate(procs)
    print("| blob | clients | jobs | p50 ms | p95 ms | jobs/s |\n|---|---:|---:|---:|---:|---:|")
    for label, k, r in rows:
        print(f"| {label} | {k} | {r['n']} | {r['p50']:.2f} | {r['p95']:.2f} | {r['rate']:.0f} |")
    print(f"\n{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; single client process (asyncio), "
          "broker and worker as separate processes.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
