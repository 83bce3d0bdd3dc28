"""A vision split's failures on real GPUs (NCCL): what happens when a helper or its worker dies.

    python3 -m bench.split_faults --model-path /tmp/ga2b --dtype bfloat16 --devices 0,1 --gpus-per-replica 2

Starts the whole stack as bench.e2e does (one split replica), asks one question about a 1440p
screenshot to know its answer, then:
1. kill -9 of the helper while idle: the worker must exit (its watch), the supervisor start it
   again, and the same question must get the same answer;
2. kill -9 of the worker while 4 clients keep questions in flight (the helper is then waiting in
   a collective that will never complete): the old helper must end (its parent watch), every
   request sent must get one answer (success or error), and the model must serve again.
Per fault: seconds until the worker / helper are gone and until a request succeeds again;
requests sent, answered, succeeded. Markdown on stdout.
"""
from __future__ import annotations

import argparse
import http.client
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from bench.e2e import add_stack_args, bench_stack, one, request_body, start_stack
from bench.screens import png_bytes
from tests.rawbroker import pid_alive


def helper_of(worker: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().split(")")[-1].split()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == worker and b"workers.mlx.split" in cmd:
                return int(entry.name)
    raise RuntimeError(f"worker {worker} has no helper process")


def worker_pid(stack) -> int:
    status = {m["id"]: m for m in stack.models()}["bench"]
    (replica,) = status["replicas"]
    return int(replica["worker"]["pid"])


def gone_after(pid: int, t0: float, limit: float = 60.0) -> float | None:
    while pid_alive(pid):
        if time.perf_counter() - t0 > limit:
            return None
        time.sleep(0.02)
    return time.perf_counter() - t0


def ask(port: int, body: bytes) -> tuple[str, dict | None]:
    """("ok", reply), ("error", None) for an HTTP error answer, ("lost", None) for none in 120 s."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        return "ok", one(conn, body)[1]
    except RuntimeError:
        return "error", None
    except OSError:
        return "lost", None
    finally:
        conn.close()


def answer_of(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


def until_served(port: int, body: bytes, t0: float, limit: float = 300.0) -> tuple[float | None, dict | None]:
    while time.perf_counter() - t0 < limit:
        outcome, reply = ask(port, body)
        if outcome == "ok":
            return time.perf_counter() - t0, reply
        time.sleep(0.2)
    return None, None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stack_args(ap)
    args = ap.parse_args(argv)
    body = request_body("bench", png_bytes(2560, 1440, 7), "click the search box")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stack = bench_stack(tmp, args)
        with start_stack(stack, args):
            port = int(stack.http_base.rsplit(":", 1)[1])
            want = answer_of(ask(port, body)[1])

            worker = worker_pid(stack)
            helper = helper_of(worker)
            t0 = time.perf_counter()
            os.kill(helper, signal.SIGKILL)
            worker_gone = gone_after(worker, t0)
            served, reply = until_served(port, body, t0)
            rows.append(("kill -9 of the helper, idle", worker_gone, 0.0, served, {"ok": 1},
                         reply is not None and answer_of(reply) == want))

            worker = worker_pid(stack)
            helper = helper_of(worker)
            results: list[str] = []
            stop = threading.Event()

            def client() -> None:
                while not stop.is_set():
                    results.append(ask(port, body)[0])

            clients = [threading.Thread(target=client) for _ in range(4)]
            for c in clients:
                c.start()
            time.sleep(2.0)
            t0 = time.perf_counter()
            os.kill(worker, signal.SIGKILL)
            helper_gone = gone_after(helper, t0)
            served, reply = until_served(port, body, t0)
            stop.set()
            for c in clients:
                c.join()
            rows.append(("kill -9 of the worker, 4 clients", 0.0, helper_gone, served,
                         {k: results.count(k) for k in ("ok", "error", "lost")},
                         reply is not None and answer_of(reply) == want))
            notes = [line for line in stack.log().splitlines() if "vision split" in line or "exited" in line]
    print("\n".join(notes[-20:]))
    print("| fault | worker gone after s | helper gone after s | served again after s | requests: succeeded / "
          "error answers / no answer | the same answer after |")
    print("|---|---|---|---|---|---|")
    fmt = lambda v: "never" if v is None else f"{v:.2f}"     # noqa: E731
    for name, wg, hg, served, counts, same in rows:
        tally = " / ".join(str(counts.get(k, 0)) for k in ("ok", "error", "lost"))
        print(f"| {name} | {fmt(wg)} | {fmt(hg)} | {fmt(served)} | {tally} | {same} |")


if __name__ == "__main__":
    main()
