"""End-to-end grounding benchmark: the whole stack as the Procfile starts it, driven over HTTP.

    python -m bench.e2e --model-path PATH [--sizes 1280x720,1920x1080] [--concurrency 1,8]
                        [--requests 20] [--engine mlx|fake] [--dtype bfloat16] [--max-batch 8]
                        [--torch-baseline prefill_floor.py|bench/torch_forward.py [--shape 7b]]
                        [--formats png,jpeg,webp] [--content plain,busy] [--no-repeat] [--devices 0,1 [--gpus-per-replica 2]]
                        [--cache-dir DIR] [--finishing on|off] [--keep-cpus-awake-ms MS]
                        [--direct-answers on|off] [--direct-jobs on|off]

For each screenshot size, format (bench.screens.SAVE), content (`busy`: dense text and a photo,
PNGs ~15x larger) and client count it reports p50/p95
end-to-end latency, throughput, the worker's own forward time (from the response's timings), serving
overhead (end-to-end minus the worker's forward: HTTP, queueing, image decoding and resizing), the
worker's preprocessing (decode + resize) and queueing times within it and the time outside the worker
(end to end minus the worker's `total`: HTTP, JSON and base64, the broker's hops, the answer's way
back), and the device memory peak of
the level's last batch (the worker resets the peak before each batch: with one client, one request's
peak; with --devices, the largest replica's; with --gpus-per-replica, also the largest helper GPU's),
as a markdown table on stdout; after it, per row, the p50s of the forward's last parts (the
pointer head and the points, the response's `timings.head` and `.postprocess`), in how many requests
the worker sent FINISHING and how long before the forward's end (`timings.finishing`;
common/protocol.py), how many ran from a direct copy of the job and how long before the broker's JOB
it came (`timings.early`; common/protocol.py's DIRECT_TO_WORKER), and how many jobs were answered
from batches of each size (`timings.batch`:
closed-loop clients settle into a repeating mix, such as 7 + 1 or 6 + 2 for eight, and the forward
p50 and the last batch's peak follow its larger batch).

Every request carries a screenshot no other request of the run has sent, so the worker's
screenshot cache (workers/screen_cache.py) never answers them; the `cache hits` column shows it.
Then, unless --no-repeat, the same levels again as questions about one screenshot, each request
with a new instruction (an agent asking several things of one screen): rows marked "same screen".
"""
from __future__ import annotations

import argparse
import collections
import http.client
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from base64 import b64encode
from pathlib import Path

from bench.screens import MIME, encoded
from tests.stackutil import Stack


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def request_body(model: str, image: bytes, instruction: str, fmt: str = "png") -> bytes:
    url = f"data:{MIME[fmt]};base64," + b64encode(image).decode()
    return json.dumps({"model": model, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": instruction}]}]}).encode()


def one(conn: http.client.HTTPConnection, body: bytes, path: str = "/v1/chat/completions") -> tuple[float, dict]:
    """One keep-alive request (stdlib client: the GPU image and CI need nothing extra)."""
    t0 = time.perf_counter()
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    elapsed = time.perf_counter() - t0
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:300]!r}")
    return elapsed, json.loads(data)


def run_level(port: int, bodies: list[bytes], concurrency: int, total: int) -> dict:
    """`total` requests from `concurrency` clients: request i sends bodies[i], after two warm-up
    rounds that send bodies[total:total + 2 * concurrency]."""
    assert len(bodies) >= total + 2 * concurrency
    latencies: list[float] = []
    hits = 0
    forward: list[float] = []
    overhead: list[float] = []
    outside: list[float] = []    # end to end minus the worker's `total` (receipt to answer)
    parts: dict[str, list[float]] = {"queue": [], "preprocess": [], "head": [], "postprocess": [], "finishing": [],
                                     "early": []}
    batches: collections.Counter = collections.Counter()   # batch size -> jobs answered from such batches
    counter = iter(range(total))
    lock = threading.Lock()
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=600) for _ in range(concurrency)]
    for r in range(2):   # warm-up, all clients at once: connections, allocator, each batch shape's first run
        spare = bodies[total + r * concurrency:total + (r + 1) * concurrency]
        warm = [threading.Thread(target=one, args=(c, b)) for c, b in zip(conns, spare)]
        for th in warm:
            th.start()
        for th in warm:
            th.join()

    def client(conn: http.client.HTTPConnection) -> None:
        nonlocal hits
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            elapsed, data = one(conn, bodies[i])
            t = data.get("timings") or {}
            cached = ((data.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            with lock:
                latencies.append(elapsed)
                hits += cached > 0
                if "forward" in t:
                    forward.append(t["forward"] / 1e3)
                    overhead.append(elapsed - t["forward"] / 1e3)
                if "total" in t:
                    outside.append(elapsed - t["total"] / 1e3)
                for k in parts:
                    if k in t:
                        parts[k].append(t[k] / 1e3)
                if "batch" in t:
                    batches[t["batch"]] += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in conns]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    for conn in conns:
        conn.close()
    return {"p50": pct(latencies, 0.5), "p95": pct(latencies, 0.95), "rps": total / wall, "hits": hits,
            "forward_p50": statistics.median(forward) if forward else float("nan"),
            "overhead_p50": statistics.median(overhead) if overhead else float("nan"),
            "outside_p50": statistics.median(outside) if outside else float("nan"),
            "finishing_sent": len(parts["finishing"]), "early_jobs": len(parts["early"]), "batches": dict(sorted(batches.items(), reverse=True)),
            **{f"{k}_p50": statistics.median(v) if v else float("nan") for k, v in parts.items()}}


def add_stack_args(ap: argparse.ArgumentParser) -> None:
    """The options of the model the benchmark stack serves (`bench_stack`)."""
    ap.add_argument("--model-path", default="tiny:qwen2_vl")
    ap.add_argument("--engine", default="mlx", choices=["mlx", "fake"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-pixels", type=int, default=5720064)
    ap.add_argument("--quantize", type=int, choices=[4, 8], default=None, help="the language model's weight bits")
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--devices", default=None, metavar="0,1",
                    help="serve the model from one replica per CUDA device (the model's `devices`)")
    ap.add_argument("--gpus-per-replica", type=int, default=1,
                    help="GPUs each replica's vision tower is split over (workers/mlx/split.py)")
    ap.add_argument("--finishing", default=None, choices=["on", "off"],
                    help="the model's `finishing` (FINISHING before answers; common/protocol.py); default: the config's")
    ap.add_argument("--keep-cpus-awake-ms", type=int, default=None,
                    help="the model's `keep_cpus_awake_ms` (workers/keep_awake.py); default: the config's")
    ap.add_argument("--direct-answers", default=None, choices=["on", "off"],
                    help="the frontend's `direct_answers` (workers answer it straight, ahead of the broker's "
                         "copy; common/protocol.py's Final); default: the config's")
    ap.add_argument("--direct-jobs", default=None, choices=["on", "off"],
                    help="the frontend's `direct_jobs` (it sends jobs to a worker that answered it straight, "
                         "ahead of the broker's JOB; common/protocol.py's DIRECT_TO_WORKER); default: the config's")
    ap.add_argument("--broker-endpoints", default="tcp", choices=["tcp", "ipc"],
                    help="the broker's sockets: loopback TCP (the config's default) or Unix sockets")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "gui-grounding-bench"),
                    help="the stack's cache_dir, kept between runs: a second run on a machine finds MLX's "
                         "GPU kernels compiled (a 2B's load ~75 s -> ~10-20 s); '' for a fresh one per run")


def bench_stack(tmp: str, args: argparse.Namespace) -> Stack:
    """The whole stack (not started) serving one model, `bench`, as `add_stack_args` describes it."""
    model = {"path": args.model_path, "engine": args.engine, "dtype": args.dtype, "preload": True,
             "max_batch": args.max_batch, "max_pixels": args.max_pixels, "quantize": args.quantize}
    if args.devices:
        model["devices"] = [int(d) for d in args.devices.split(",")]
        model["gpus_per_replica"] = args.gpus_per_replica
    if args.finishing is not None:
        model["finishing"] = args.finishing == "on"
    if args.keep_cpus_awake_ms is not None:
        model["keep_cpus_awake_ms"] = args.keep_cpus_awake_ms
    broker = {"queue_size": 256, "load_timeout_s": 600}
    if args.broker_endpoints == "ipc":
        broker.update(client_endpoint=f"ipc://{tmp}/clients", worker_endpoint=f"ipc://{tmp}/workers")
    config = {"server": {"default_model": "bench", "request_timeout_s": 600}, "broker": broker,
              "models": {"bench": model}}
    if args.direct_answers is not None:
        config["server"]["direct_answers"] = args.direct_answers == "on"
    if args.direct_jobs is not None:
        config["server"]["direct_jobs"] = args.direct_jobs == "on"
    if args.cache_dir:
        config["cache_dir"] = args.cache_dir
    return Stack(Path(tmp), config)


def start_stack(stack: Stack, args: argparse.Namespace):
    """Start it and print how long that took; -> the started stack's context."""
    t_start = time.perf_counter()
    started = stack.start(ready_timeout_s=args.ready_timeout, loaded=("bench",))
    status = {m["id"]: m for m in stack.models()}["bench"]
    while any(r["status"] != "loaded" for r in status.get("replicas", ())):   # every replica, not the first
        if time.perf_counter() - t_start > args.ready_timeout:
            raise TimeoutError(f"replicas not loaded: {status['replicas']}")
        time.sleep(0.2)
        status = {m["id"]: m for m in stack.models()}["bench"]
    print(f"stack ready in {time.perf_counter() - t_start:.1f} s; model load {status.get('load_seconds')} s; "
          f"weights {status['memory'].get('weights_bytes', 0) / 1e9:.2f} GB", flush=True)
    return started


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stack_args(ap)
    ap.add_argument("--sizes", default="1280x720,1920x1080,2560x1440")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--formats", default="png", help="screenshot formats, comma-separated: png, jpeg, webp")
    ap.add_argument("--content", default="plain", help="plain, busy or both (bench.screens.screenshot's busy)")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--torch-baseline", default=None, metavar="SCRIPT",
                    help="prefill_floor.py or bench/torch_forward.py: PyTorch's forward per size, run "
                         "before the stack starts, for the issue's ratios")
    ap.add_argument("--shape", default="2b", help="the baseline's model shape (bench/torch_forward.py)")
    ap.add_argument("--no-repeat", action="store_true", help="skip the rows of questions about one screenshot")
    args = ap.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    if not set(args.content.split(",")) <= {"plain", "busy"}:
        ap.error("--content takes plain, busy or plain,busy")
    torch_ms: dict[tuple[int, int], float] = {}
    if args.torch_baseline:
        from bench.gpu_ground import torch_baseline
        for w, h in sizes:
            out = torch_baseline(args.torch_baseline, w, h, 10, args.shape)
            try:
                torch_ms[(w, h)] = float(out)
            except ValueError:
                print(f"PyTorch baseline at {w}x{h}: {out}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        stack = bench_stack(tmp, args)
        with start_stack(stack, args):
            print("| size | format | clients | requests | cache hits | p50 ms | p95 ms | req/s | req/s vs 1 client | "
                  "worker forward p50 ms | overhead p50 ms | of which preprocess p50 ms | of which queue p50 ms | "
                  "of which outside the worker p50 ms | PyTorch forward ms | p50 / PyTorch forward | "
                  "last batch's peak GB |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            seeds = itertools.count()       # no screenshot is sent twice, except in the "same screen" rows
            tails: list[str] = []           # the forward's head and points, and FINISHING, after the table
            for (w, h), fmt, content in itertools.product(sizes, args.formats.split(","), args.content.split(",")):
                busy = content == "busy"
                label = fmt if content == "plain" else f"{fmt}, {content}"
                for same in (False,) if args.no_repeat else (False, True):
                    single_rps = None
                    for c in levels:
                        total = max(args.requests, 2 * c)
                        if same:
                            image = encoded(w, h, next(seeds), fmt, busy)
                            bodies = [request_body("bench", image, f"click Button {i}", fmt) for i in range(total + 2 * c)]
                        else:
                            bodies = [request_body("bench", encoded(w, h, seed, fmt, busy), f"click Button {seed}", fmt)
                                      for seed in itertools.islice(seeds, total + 2 * c)]
                        r = run_level(stack.config["server"]["port"], bodies, c, total)
                        single_rps = r["rps"] if c == 1 else single_rps
                        vs_single = f"{r['rps'] / single_rps:.2f}x" if single_rps and c > 1 else "-"
                        base = torch_ms.get((w, h))
                        base_col = f"{base:.1f} | {r['p50'] * 1e3 / base:.2f}x" if base and not same else "- | -"
                        time.sleep(1.5)     # the worker's memory reaches the status with its next heartbeat
                        status = {m["id"]: m for m in stack.models()}["bench"]
                        replicas = status.get("replicas", [status])
                        peak = max(x["memory"].get("peak_bytes", 0) for x in replicas)
                        helpers = [h["peak_bytes"] for x in replicas for h in x.get("helper_memory", ())]
                        peak_col = f"{peak / 1e9:.2f}" + (f" (helper GPU {max(helpers) / 1e9:.2f})" if helpers else "")
                        print(f"| {w}x{h} | {label} | {c}{', same screen' if same else ''} | {total} | {r['hits']} | "
                              f"{r['p50']*1e3:.1f} | {r['p95']*1e3:.1f} | {r['rps']:.2f} | "
                              f"{vs_single} | {r['forward_p50']*1e3:.1f} | {r['overhead_p50']*1e3:.1f} | "
                              f"{r['preprocess_p50']*1e3:.1f} | {r['queue_p50']*1e3:.1f} | "
                              f"{r['outside_p50']*1e3:.1f} | {base_col} | {peak_col} |",
                              flush=True)
                        tails.append(f"{w}x{h} {label} {c}{' same' if same else ''}: head p50 {r['head_p50']*1e3:.2f} ms, "
                                     f"points p50 {r['postprocess_p50']*1e3:.2f} ms; FINISHING in "
                                     f"{r['finishing_sent']} of {total}, p50 {r['finishing_p50']*1e3:.2f} ms "
                                     f"before the forward's end; run from a direct copy {r['early_jobs']} "
                                     f"(p50 {r['early_p50']*1e3:.2f} ms before the JOB); jobs by their batch's size "
                                     + ", ".join(f"{k}: {v}" for k, v in r["batches"].items()))
            print("\n".join(tails), flush=True)

if __name__ == "__main__":
    sys.exit(main())
