"""An agent's loop against the whole stack (as the Procfile starts it): take a screenshot, think,
ask; with and without sending the screenshot first (POST /v1/screenshots).

    python -m bench.agent_loop --model-path PATH [--size 1920x1080] [--agents 1,4] [--steps 16]
                               [--think-ms 0,50,150,500] [--dtype bfloat16] [--engine mlx|fake]

Each of `agents` agents (threads, each with its own keep-alive connections) takes `steps` steps. A
step: a screenshot no step has sent before, then `think` ms of the agent deciding what to ask (its
planner, here a sleep), then one question about the screenshot, whose answer it waits for.
- "ask only": the screenshot goes with the question, as in a plain chat request.
- "send first": the step also sends the screenshot to POST /v1/screenshots as it starts, on a
  connection of its own, without waiting for that answer; the question is the same request.
Reported per mode, think time and agent count: the question's latency (from asking to the answer,
what the agent waits for once it has decided) p50/p95, how many questions the screenshot cache
answered, the step's length (screenshot to answer) p50, the POST /v1/screenshots latency p50 and
how many of those answers said kept (the warm-up steps' included).
"""
from __future__ import annotations

import argparse
import http.client
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
from base64 import b64encode

from bench.e2e import add_stack_args, bench_stack, one, pct, request_body, start_stack
from bench.screens import MIME, encoded

MODES = ("ask only", "send first")


def screenshot_body(image: bytes, fmt: str = "png") -> bytes:
    return json.dumps({"model": "bench", "image_url": {"url": f"data:{MIME[fmt]};base64," + b64encode(image).decode()}}).encode()


class Agent:
    """One agent: a connection for questions, and a thread with a connection of its own that
    sends screenshots ahead (so a question never waits behind that answer on one connection)."""

    def __init__(self, port: int):
        self.ask = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        self.ahead = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        self.sends: queue.Queue[bytes | None] = queue.Queue()
        self.sent: list[float] = []
        self.kept = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._send_ahead, daemon=True)
        self.thread.start()

    def _send_ahead(self) -> None:
        while (body := self.sends.get()) is not None:
            try:
                elapsed, shot = one(self.ahead, body, "/v1/screenshots")
                self.sent.append(elapsed)
                self.kept += bool(shot.get("kept"))
            except Exception as exc:    # reported after the level: a benchmark must not hide it
                self.errors.append(repr(exc))

    def step(self, image: bytes, instruction: str, think_s: float, send_first: bool) -> tuple[float, float, bool]:
        """-> (question latency s, step length s, whether the cache answered the question)."""
        t0 = time.perf_counter()
        if send_first:
            self.sends.put(screenshot_body(image))
        time.sleep(think_s)
        elapsed, data = one(self.ask, request_body("bench", image, instruction))
        cached = ((data.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return elapsed, time.perf_counter() - t0, cached > 0

    def close(self) -> None:
        self.sends.put(None)
        self.thread.join()
        self.ask.close()
        self.ahead.close()


def run_level(port: int, size: tuple[int, int], seeds, agents: int, steps: int, think_s: float,
              send_first: bool) -> dict:
    crew = [Agent(port) for _ in range(agents)]
    asked: list[float] = []
    lengths: list[float] = []
    hits = 0
    lock = threading.Lock()

    def work(agent: Agent, images: list[bytes], timed: bool) -> None:
        nonlocal hits
        for i, image in enumerate(images):
            latency, length, hit = agent.step(image, f"click Button {i}", think_s, send_first)
            if timed:
                with lock:
                    asked.append(latency)
                    lengths.append(length)
                    hits += hit

    for timed, n in ((False, 1), (True, steps)):     # one untimed step each first: connections, shapes
        images = [[encoded(*size, next(seeds), "png") for _ in range(n)] for _ in crew]
        threads = [threading.Thread(target=work, args=(a, imgs, timed)) for a, imgs in zip(crew, images)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    for a in crew:
        a.close()
    errors = [e for a in crew for e in a.errors]
    if errors:
        raise RuntimeError(f"{len(errors)} screenshots sent ahead failed, e.g. {errors[0]}")
    sent = [s for a in crew for s in a.sent]
    return {"p50": pct(asked, 0.5), "p95": pct(asked, 0.95), "hits": hits, "n": len(asked),
            "kept": sum(a.kept for a in crew), "sent": len(sent),
            "step_p50": pct(lengths, 0.5), "sent_p50": statistics.median(sent) if sent else float("nan")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stack_args(ap)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--agents", default="1,4")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--think-ms", default="0,50,150,500")
    args = ap.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    seeds = iter(range(10**9))      # a new screenshot every step
    with tempfile.TemporaryDirectory() as tmp:
        stack = bench_stack(tmp, args)
        with start_stack(stack, args):
            port = stack.config["server"]["port"]
            print("| size | agents | think ms | mode | questions | cache answered | question p50 ms | "
                  "question p95 ms | step p50 ms | POST /v1/screenshots p50 ms | screenshots kept |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for agents in (int(a) for a in args.agents.split(",")):
                for think_ms in (float(t) for t in args.think_ms.split(",")):
                    for mode in MODES:
                        r = run_level(port, size, seeds, agents, args.steps, think_ms / 1e3, mode == "send first")
                        sent = f"{r['sent_p50'] * 1e3:.1f} | {r['kept']}/{r['sent']}" if mode == "send first" else "- | -"
                        print(f"| {size[0]}x{size[1]} | {agents} | {think_ms:g} | {mode} | {r['n']} | {r['hits']} | "
                              f"{r['p50'] * 1e3:.1f} | {r['p95'] * 1e3:.1f} | {r['step_p50'] * 1e3:.1f} | {sent} |",
                              flush=True)


if __name__ == "__main__":
    sys.exit(main())
