"""Fault benchmark: time to detect, time to recover, requests answered vs sent, for each fault.

    python -m bench.faults [--load-s 3] [--stall-s 2] [--heartbeat-ms 1000]

Runs broker, supervisor and frontend as separate processes (so the broker can be killed and
restarted without honcho stopping everything), fake-engine model, default heartbeats unless told.
A steady load (4 Python clients in a loop, 50 ms jobs) runs through each fault:
- kill -9 of the worker mid-load; SIGSTOP of the worker (SIGCONT once the broker declared it lost);
- a stuck computation (fake hang_s) among the load: watchdog cancel, kill, retry, kill, poison;
- kill -9 of the broker, restarted at once; a flood of 10x queue capacity with 2 MB images over HTTP.
Detect: injection -> the broker (or the client, for a broker crash) registers the fault.
Recover: injection -> the first request submitted after the injection that succeeds; for the
stuck computation, injection -> the first success after the hung request got its answer (two
watchdog cycles); for the flood, the end of the flood -> a request succeeds. Answered: requests that got any answer
(success or error) out of those sent; "lost" are those that got none (must be 0). Markdown on stdout.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.client import Client
from common.errors import ServerError
from tests.rawbroker import png, rss_bytes, terminate
from tests.stackutil import ROOT, Stack, fake_model

IMG = png(320, 200)
BIG = png(640, 480, pad=2 * 1024 * 1024)
QUEUE = 4


class Procs:
    """broker, supervisor, frontend as separate process groups on one config."""

    def __init__(self, st: Stack, log: Path):
        self.st, self.log = st, open(log, "ab")
        self.p: dict[str, subprocess.Popen] = {}

    def spawn(self, module: str) -> None:
        self.p[module] = subprocess.Popen([sys.executable, "-m", module, "--config", str(self.st.config_path)],
                                          cwd=ROOT, env=self.st.env(), stdout=self.log, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    def stop(self) -> None:
        terminate(list(self.p.values()))
        self.log.close()


def wait_for(pred, timeout_s: float, step: float = 0.01):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            v = pred()
        except (ServerError, OSError, TimeoutError, RuntimeError, StopIteration):
            v = None
        if v:
            return v
        time.sleep(step)
    raise TimeoutError("condition not reached")


class Load:
    """`n` clients submitting `params` jobs in a loop; every outcome recorded with its times."""

    def __init__(self, endpoint: str, model: str, n: int = 4, sleep_ms: int = 50):
        self.endpoint, self.model, self.n, self.sleep_ms = endpoint, model, n, sleep_ms
        self.records: list[tuple[float, float | None, str]] = []   # (submitted, answered, outcome)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        with Client(self.endpoint, default_ttl_s=30) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    c.ground(self.model, IMG, "click", fake={"sleep_ms": self.sleep_ms})
                    outcome = "ok"
                except ServerError as exc:
                    outcome = exc.code
                t1 = time.monotonic()
                with self._lock:
                    self.records.append((t0, t1, outcome))
                if outcome != "ok":
                    time.sleep(0.05)   # what a client honouring retry-after would roughly do

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(40)
        lost = sum(t.is_alive() for t in self._threads)
        with self._lock:
            self.records += [(0.0, None, "no answer")] * lost

    def first_ok_after(self, t: float) -> float | None:
        with self._lock:
            oks = [a for s, a, o in self.records if o == "ok" and s >= t and a is not None]
        return min(oks) if oks else None


def counters(st: Stack) -> dict:
    return st.query("mmi.stats")["counters"]


def counter_above(st: Stack, name: str, base: int):
    return lambda: counters(st).get(name, 0) > base


def row(name: str, detect: float | None, recover: float | None, records: list, note: str = "") -> dict:
    outcomes = Counter(o for _, _, o in records)
    sent = len(records)
    lost = outcomes.pop("no answer", 0)
    return {"fault": name, "detect_s": detect, "recover_s": recover, "sent": sent, "answered": sent - lost,
            "ok": outcomes.get("ok", 0), "errors": dict(sorted((k, v) for k, v in outcomes.items() if k != "ok")),
            "note": note}


def fault_kill9(st: Stack, model: str) -> dict:
    base = counters(st).get("workers_lost_total", 0)
    pid = st.worker_pid(model)
    with Load(st.client_endpoint, model) as load:
        time.sleep(1.0)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_for(counter_above(st, "workers_lost_total", base), 10)
        detect = time.monotonic() - t0
        ok = wait_for(lambda: load.first_ok_after(t0), 30)
        time.sleep(1.0)
    return row("worker kill -9", detect, ok - t0, load.records)


def fault_sigstop(st: Stack, model: str) -> dict:
    base = counters(st).get("workers_lost_total", 0)
    zbase = counters(st).get("zombie_results_dropped_total", 0)
    pid = st.worker_pid(model)
    with Load(st.client_endpoint, model) as load:
        time.sleep(1.0)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_for(counter_above(st, "workers_lost_total", base), 10)
            detect = time.monotonic() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
        ok = wait_for(lambda: load.first_ok_after(t0 + detect), 30)
        time.sleep(1.0)
    zombies = counters(st).get("zombie_results_dropped_total", 0) - zbase
    return row("worker SIGSTOP (SIGCONT after detection)", detect, ok - t0, load.records,
               f"{zombies} late answer(s) dropped as zombies")


def fault_hang(st: Stack, model: str, stall_s: float) -> dict:
    base = counters(st).get("watchdog_cancels_total", 0)
    kbase = counters(st).get("watchdog_kills_total", 0)
    with Load(st.client_endpoint, model) as load, Client(st.client_endpoint, default_ttl_s=60) as c:
        time.sleep(1.0)
        t0 = time.monotonic()
        h = c.submit(model, {"instruction": "spin", "fake": {"hang_s": 120}}, [IMG])
        wait_for(counter_above(st, "watchdog_cancels_total", base), 30)
        detect = time.monotonic() - t0
        try:
            h.result()
            hung = "ok"
        except ServerError as exc:
            hung = exc.code
        t_end = time.monotonic()
        ok = wait_for(lambda: load.first_ok_after(t_end), 30)
        time.sleep(1.0)
    kills = counters(st).get("watchdog_kills_total", 0) - kbase
    return row(f"stuck computation (job_stall_s={stall_s:g})", detect, ok - t0, load.records,
               f"hung request -> {hung} after {t_end - t0:.1f}s, {kills} kill(s)")


def fault_broker_restart(st: Stack, procs: Procs, model: str) -> dict:
    with Load(st.client_endpoint, model) as load:
        time.sleep(1.0)
        t0 = time.monotonic()
        os.killpg(procs.p["broker"].pid, signal.SIGKILL)
        procs.p["broker"].wait(5)
        procs.spawn("broker")
        t_err = wait_for(lambda: min((a for s, a, o in load.records if o in ("broker_restarted", "broker_unavailable")
                                      and a is not None and a >= t0), default=None), 15)
        ok = wait_for(lambda: load.first_ok_after(t0), 30)
        health = wait_for(lambda: st.http("GET", "/v1/health", timeout_s=2)[0] == 200 and time.monotonic(), 30)
        time.sleep(1.0)
    return row("broker kill -9 + restart", t_err - t0, ok - t0, load.records,
               f"/v1/health 200 again after {health - t0:.2f}s")


def post(base: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return resp.status, "ok"
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())["error"]["code"]
    except OSError as exc:
        return 0, f"connection: {exc}"



def fault_flood(st: Stack, procs: Procs, model: str) -> dict:
    capacity = QUEUE + 2
    n = 10 * capacity
    url = "data:image/png;base64," + base64.b64encode(BIG).decode()
    body = json.dumps({"model": model, "fake": {"sleep_ms": 150}, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "click"}, {"type": "image_url", "image_url": {"url": url}}]}]}).encode()
    small = json.dumps({"model": model, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "click"}, {"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(IMG).decode()}}]}]}).encode()
    bpid = procs.p["broker"].pid
    rss = [rss_bytes(bpid)]
    rss0 = rss[0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss.append(rss_bytes(bpid))
            time.sleep(0.02)

    results: list[tuple[float, float, int, str]] = []

    def one(_):
        t0 = time.monotonic()
        status, code = post(st.http_base, body)
        results.append((t0, time.monotonic(), status, code))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))
    t_end = time.monotonic()
    done.set()
    sampler.join(2)
    first_refusal = min((a for s, a, st_, c in results if st_ != 200), default=None)
    wait_for(lambda: post(st.http_base, small)[0] == 200, 30)
    recover = time.monotonic() - t_end
    records = [(s, a, "ok" if st_ == 200 else c) for s, a, st_, c in results]
    refused = sorted(a - s for s, a, st_, c in results if st_ != 200)
    note = (f"{n} x 2 MB at once (capacity {capacity}); refusal latency median "
            f"{refused[len(refused) // 2] * 1000:.0f} ms; broker RSS {rss0 / 2**20:.0f} -> peak "
            f"{max(rss) / 2**20:.0f} MiB" if refused else "")
    return row("flood 10x capacity, 2 MB images (HTTP)", first_refusal - t0 if first_refusal else None,
               recover, records, note)


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    ap.add_argument("--heartbeat-ms", type=int, default=1000, help="broker.heartbeat_interval_ms (default 1000)")
    ap.add_argument("--stall-s", type=float, default=2.0, help="broker.job_stall_s for the hang (default 2)")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    cfg = {"broker": {"heartbeat_interval_ms": args.heartbeat_ms, "job_stall_s": args.stall_s,
                      "queue_size": QUEUE, "global_queue_size": 2 * QUEUE},
           "supervisor": {"restart_backoff_s": 0.1, "restart_backoff_max_s": 1.0, "report_interval_ms": 1000},
           "models": {"m": fake_model(max_batch=1)}}
    st = Stack(tmp, cfg)
    procs = Procs(st, tmp / "procs.log")
    rows = []
    try:
        for module in ("broker", "workers.supervisor", "frontend"):
            procs.spawn(module)
        wait_for(lambda: st.http("GET", "/v1/health", timeout_s=2)[0] == 200
                 and st.models()[0]["status"] == "loaded", 60, 0.1)
        ready = lambda: st.models()[0]["status"] == "loaded" and st.http("GET", "/v1/health")[0] == 200  # noqa: E731
        for run in (lambda: fault_kill9(st, "m"), lambda: fault_sigstop(st, "m"),
                    lambda: fault_hang(st, "m", args.stall_s), lambda: fault_broker_restart(st, procs, "m"),
                    lambda: fault_flood(st, procs, "m")):
            wait_for(ready, 60, 0.1)
            rows.append(run())
            print(f"# {rows[-1]}", file=sys.stderr)
    finally:
        procs.stop()
    print(f"heartbeat {args.heartbeat_ms} ms x {3} (lost after {3 * args.heartbeat_ms / 1000:g} s), "
          f"job_stall_s {args.stall_s:g}, supervisor restart backoff 0.1 s; load: 4 clients, 50 ms jobs\n")
    print("| fault | detect (s) | recover (s) | sent | answered | ok | errors | note |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        errs = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "-"
        print(f"| {r['fault']} | {fmt(r['detect_s'])} | {fmt(r['recover_s'])} | {r['sent']} | {r['answered']} "
              f"| {r['ok']} | {errs} | {r['note']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
