"""HTTP layer overhead: one 1920x1080 PNG through the frontend vs the same job via the Python client.

Starts the real stack (broker + supervisor + frontend, fake engine: no model work), then measures
- sequential latency, N requests each: direct `common.client.Client.ground` vs HTTP POST
  /v1/chat/completions (keep-alive connection, body pre-encoded so only the server's work counts),
  and the official openai client for reference;
- throughput with 16 concurrent HTTP clients (and 16 concurrent direct jobs for comparison).
Prints a markdown table. Usage: python -m bench.http_overhead [--n 200] [--concurrency 16]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx2 as httpx  # noqa: E402  (the openai package's HTTP client)
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from tests.stackutil import Stack, fake_model  # noqa: E402

INSTRUCTION = "click the search field"


def screenshot(w: int = 1920, h: int = 1080) -> bytes:
    """A screenshot-like PNG (~0.5 MB): flat panels, widgets, text-like speckle and one photo-like
    noisy region, which is what keeps real screenshots from compressing to nothing."""
    rng = np.random.default_rng(0)
    img = Image.new("RGB", (w, h), (236, 239, 244))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, w, 48], fill=(40, 44, 52))
    d.rectangle([0, 48, 260, h], fill=(250, 250, 252))
    for i in range(40):
        x, y = int(rng.integers(280, w - 200)), int(rng.integers(60, h - 60))
        d.rounded_rectangle([x, y, x + int(rng.integers(60, 200)), y + 32], 6,
                            fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    arr = np.asarray(img).copy()
    glyphs = rng.random((h // 4, w // 2)) > 0.93   # sparse dark "text" speckle
    arr[300:300 + 200, 300:300 + 800][np.kron(glyphs[:50, :200], np.ones((4, 4), bool))] = 30
    ramp = np.linspace(0, 160, 420, dtype=np.float32)[None, :, None]
    arr[600:900, 1300:1720] = np.clip(ramp + rng.normal(60, 25, (300, 420, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summary(lat_s: list[float]) -> tuple[float, float, float]:
    ms = [x * 1000 for x in lat_s]
    return statistics.median(ms), pct(ms, 90), pct(ms, 99)


def seq_direct(endpoint: str, model: str, image: bytes, n: int) -> list[float]:
    from common.client import Client
    out = []
    with Client(endpoint) as c:
        for _ in range(5):
            c.ground(model, image, INSTRUCTION)
        for _ in range(n):
            t0 = time.perf_counter()
            c.ground(model, image, INSTRUCTION)
            out.append(time.perf_counter() - t0)
    return out


def seq_http(base: str, body: bytes, n: int) -> list[float]:
    out = []
    with httpx.Client(base_url=base, timeout=30) as c:
        for i in range(n + 5):
            t0 = time.perf_counter()
            r = c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            dt = time.perf_counter() - t0
            r.raise_for_status()
            if i >= 5:
                out.append(dt)
    return out


def seq_openai(base: str, data_url: str, model: str, n: int) -> list[float]:
    import openai
    out = []
    msgs = [{"role": "user", "content": [{"type": "text", "text": INSTRUCTION},
                                         {"type": "image_url", "image_url": {"url": data_url}}]}]
    with openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0) as c:
        for i in range(n + 5):
            t0 = time.perf_counter()
            c.chat.completions.create(model=model, messages=msgs)
            if i >= 5:
                out.append(time.perf_counter() - t0)
    return out


async def conc_http(base: str, body: bytes, conc: int, total: int) -> tuple[float, list[float]]:
    lat: list[float] = []
    todo = iter(range(total))

    async def one(c: httpx.AsyncClient) -> None:
        for _ in todo:
            t0 = time.perf_counter()
            r = await c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            r.raise_for_status()
            lat.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for _ in range(conc)))
        return time.perf_counter() - t0, lat


async def conc_direct(endpoint: str, model: str, image: bytes, conc: int, total: int) -> tuple[float, list[float]]:
    from common.client import AsyncClient
    lat: list[float] = []
    todo = iter(range(total))

    async def one(c) -> None:
        for _ in todo:
            t0 = time.perf_counter()
            await c.ground(model, image, INSTRUCTION)
            lat.append(time.perf_counter() - t0)

    async with AsyncClient(endpoint) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for _ in range(conc)))
        return time.perf_counter() - t0, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="sequential requests per path")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--total", type=int, default=480, help="requests in the concurrent runs")
    ap.add_argument("--workers", type=int, default=1, help="Sanic worker processes")
    args = ap.parse_args()

    image = screenshot()
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    model = "fake"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": [
        {"type": "text", "text": INSTRUCTION}, {"type": "image_url", "image_url": {"url": data_url}}]}]}).encode()
    config = {"server": {"workers": args.workers, "default_model": model},
              "broker": {"queue_size": 1024, "global_queue_size": 4096},
              "models": {model: fake_model(max_batch=8)}}
    with tempfile.TemporaryDirectory() as tmp, Stack(Path(tmp), config) as stack:
        stack.start(ready_timeout_s=60, loaded=(model,))
        direct = seq_direct(stack.client_endpoint, model, image, args.n)
        http = seq_http(stack.http_base, body, args.n)
        oai = seq_openai(stack.http_base, data_url, model, max(20, args.n // 4))
        d_wall, d_lat = asyncio.run(conc_direct(stack.client_endpoint, model, image, args.concurrency, args.total))
        h_wall, h_lat = asyncio.run(conc_http(stack.http_base, body, args.concurrency, args.total))

    rows = [("direct Python client, sequential", direct, None),
            ("HTTP (httpx, keep-alive), sequential", http, None),
            ("HTTP (openai client), sequential", oai, None),
            (f"direct Python client, {args.concurrency} concurrent", d_lat, d_wall),
            (f"HTTP, {args.concurrency} concurrent clients", h_lat, h_wall)]
    print(f"\nImage: 1920x1080 PNG, {len(image) / 1024:.0f} KiB ({len(body) / 1024:.0f} KiB JSON body); "
          f"fake engine; Sanic workers: {args.workers}\n")
    print("| path | n | p50 ms | p90 ms | p99 ms | req/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, lat, wall in rows:
        p50, p90, p99 = summary(lat)
        rps = len(lat) / wall if wall else 1 / statistics.mean(lat)
        print(f"| {name} | {len(lat)} | {p50:.2f} | {p90:.2f} | {p99:.2f} | {rps:.0f} |")
    added = summary(http)[0] - summary(direct)[0]
    print(f"\nHTTP layer added p50: {added:.2f} ms (target <= 3 ms)")


if __name__ == "__main__":
    main()
