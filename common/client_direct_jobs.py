"""The client's side of direct jobs (common/protocol.py's DIRECT_TO_WORKER): where each model's
worker on this host takes copies of SUBMITs, and one PUSH socket per such worker.

A worker's endpoint is learned from its direct FINALs (`jobs_to`), so only a worker that has
answered this client straight, on this host, is ever sent a copy; the socket connects then, so it
is up by the next SUBMIT. Sends never block or queue: IMMEDIATE and a small HWM make a copy that
cannot go at once fail, and it is not sent (the broker's JOB carries the job anyway); a copy that
came late would only make the worker decode for nothing.
"""
from __future__ import annotations

import zmq

from common import protocol as p
from common.zmqutil import PushSockets

MAX_ENDPOINTS = 16   # workers (models, replicas) sent copies at once; least recently used closed
SEND_HWM = 4


class DirectJobs:
    def __init__(self, ctx: zmq.Context, counters: dict[str, int]):
        # plain (not asyncio) sockets: sends are NOBLOCK, and must not wait on the event loop
        self._ctx = zmq.Context.shadow(ctx.underlying)
        self._to: dict[str, str] = {}                       # model -> its worker's endpoint
        self._socks = PushSockets(self._ctx, MAX_ENDPOINTS, {zmq.IMMEDIATE: 1, zmq.SNDHWM: SEND_HWM})
        self.counters = counters   # the client's: "direct_jobs" sent, "direct_jobs_unsent"

    def learn(self, model: str, endpoint: str | None) -> None:
        """A direct FINAL for a job of `model` named its worker's endpoint."""
        if not endpoint or not p.direct_endpoint_ok(endpoint) or self._to.get(model) == endpoint:
            return
        try:
            self._socks.get(endpoint)
        except zmq.ZMQError:   # an endpoint libzmq refuses (an ipc:// path too long): no copies
            return
        self._to[model] = endpoint

    def endpoint(self, model: str) -> str | None:
        return self._to.get(model)

    def send(self, endpoint: str, frames: list) -> bool:
        try:
            self._socks.send(endpoint, frames)
        except zmq.ZMQError:   # not connected (yet, or any more), or the worker's queue is full
            self.counters["direct_jobs_unsent"] += 1
            return False
        self.counters["direct_jobs"] += 1
        return True

    def close(self) -> None:
        self._socks.close()
        self._to.clear()
