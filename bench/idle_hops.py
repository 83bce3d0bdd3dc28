"""Does a request's way in and out of the worker cost more when the host's CPUs idle meanwhile?

    python -m bench.idle_hops [--n 40] [--forward-ms 0,100] [--transports tcp,ipc] [--content plain,busy]
                              [--finishing off,on] [--direct-answers off,on] [--hold-cpu-latency]

Why: the time outside the worker (end to end minus the worker's own `total`: HTTP, JSON and
base64, the broker's hops, the answer's way back) is ~1.2 ms on the 2-core CI box for a plain 1080p
PNG but 3.4-4.2 ms on the GPU machines' hosts (bench/RESULTS.md). A request crosses ~14 thread
wake-ups (client, frontend, broker, the worker's socket, control, prep and compute threads, and
back), and while a real forward runs (~100 ms) every other thread sleeps, so their CPUs may fall
into deep sleep states, whose exit costs tens to hundreds of microseconds per wake-up.

Starts the whole stack with the fake engine (it reads the image header only and sleeps
`--forward-ms` per batch, as a stand-in for the GPU forward during which the host idles) and sends
--n 1080p PNG requests (bench.screens' plain one, ~38 KB, or its busy one, ~590 KB) one after another
over HTTP and through the Python ZMQ client. Prints p50 of the time outside the worker, per
screenshot, forward length, broker transport and the model's `finishing` (FINISHING before each
answer, on or off; the fake forward says it is near its end 3 ms before it ends) and direct answers
(the frontend's `direct_answers` and the ZMQ client's, on or off: the worker sends each answer
straight to the client ahead of the broker's copy; common/protocol.py's Final). Also a thread
wake-up probe: the median time from one thread's Event.set() to the waiting thread running, after
0 and 20 ms idle.
`--hold-cpu-latency` writes 0 to /dev/cpu_dma_latency for the run (the kernel's PM QoS request,
what tuned's latency-performance profile does: CPUs stay out of deep sleep states while the file
is open; needs root).
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import struct
import tempfile
import threading
import time
from pathlib import Path

from bench.e2e import request_body
from bench.screens import encoded
from common.client import Client
from tests.stackutil import Stack, fake_model


def hold_cpu_latency() -> str:
    """Keep the PM QoS request open for this process's life; -> what happened, for the log."""
    try:
        fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
        os.write(fd, struct.pack("i", 0))
    except OSError as exc:
        return f"not held ({exc})"
    return "held at 0 us"


def wake_us(idle_s: float, n: int) -> float:
    """Median microseconds from Event.set() in this thread to the waiter running, after idle_s."""
    go, ran = threading.Event(), threading.Event()
    seen: list[float] = []

    def waiter() -> None:
        for _ in range(n):
            go.wait()
            seen.append(time.perf_counter())
            go.clear()
            ran.set()

    threading.Thread(target=waiter, daemon=True).start()
    lags = []
    for i in range(n):
        time.sleep(idle_s)
        t0 = time.perf_counter()
        go.set()
        ran.wait()
        ran.clear()
        lags.append((seen[i] - t0) * 1e6)
    return sorted(lags)[len(lags) // 2]


def outside_ms(send, n: int) -> float:
    """p50 of end to end minus the worker's `total`, over n requests after 3 warm-ups."""
    out = []
    for i in range(n + 3):
        t0 = time.perf_counter()
        total_ms = send()
        if i >= 3:
            out.append((time.perf_counter() - t0) * 1e3 - total_ms)
    return sorted(out)[len(out) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--forward-ms", default="0,100")
    ap.add_argument("--hold-cpu-latency", action="store_true")
    ap.add_argument("--transports", default="tcp,ipc", help="the broker's endpoints: loopback TCP, Unix sockets")
    ap.add_argument("--content", default="plain", help="plain, busy or both (bench.screens.screenshot's busy)")
    ap.add_argument("--finishing", default="off,on",
                    help="the model's `finishing` settings to compare (FINISHING before answers; common/protocol.py)")
    ap.add_argument("--direct-answers", default="off",
                    help="direct answers (server.direct_answers and the ZMQ client's) to compare: off, on or off,on")
    a = ap.parse_args()
    if a.hold_cpu_latency:
        print(f"/dev/cpu_dma_latency: {hold_cpu_latency()} (the stack's processes are this one's children)")
    print(f"thread wake-up, median us: after 0 ms idle {wake_us(0, 200):.0f}, after 20 ms idle {wake_us(0.02, 50):.0f}")
    print("| screenshot | broker endpoints | forward ms (fake) | finishing | direct answers | "
          "outside the worker p50 ms, HTTP | outside the worker p50 ms, ZMQ client |")
    print("|---|---|---|---|---|---|---|")
    for content, transport, forward, finishing, direct in itertools.product(
            a.content.split(","), a.transports.split(","), (int(f) for f in a.forward_ms.split(",")),
            a.finishing.split(","), a.direct_answers.split(",")):
        png = encoded(1920, 1080, 7, "png", content == "busy")
        with tempfile.TemporaryDirectory() as tmp:
            model = fake_model(fake={"load_s": 0.05, "weights_bytes": 100_000_000, "latency_ms": forward})
            model["finishing"] = finishing == "on"
            broker = {} if transport == "tcp" else \
                {"client_endpoint": f"ipc://{tmp}/clients", "worker_endpoint": f"ipc://{tmp}/workers"}
            stack = Stack(Path(tmp), {"models": {"fake-x": model}, "broker": broker,
                                      "server": {"direct_answers": direct == "on"}})
            with stack.start(loaded=("fake-x",)):
                conn = http.client.HTTPConnection("127.0.0.1", stack.config["server"]["port"], timeout=60)
                body = request_body("fake-x", png, "click Button 1")

                def http_once() -> float:
                    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = json.loads(resp.read())
                    assert resp.status == 200, data
                    return data["timings"]["total"]

                with Client(stack.config["broker"]["client_endpoint"], direct_answers=direct == "on") as zmq_client:
                    cols = (outside_ms(http_once, a.n),
                            outside_ms(lambda: zmq_client.ground("fake-x", png, "click Button 1").timings["total"], a.n))
                conn.close()
        print(f"| {content} | {transport} | {forward} | {finishing} | {direct} | {cols[0]:.2f} | {cols[1]:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
