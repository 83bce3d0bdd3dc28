"""Direct answers: the compute thread sends a job's FINAL straight to the client that asked.

Where a JOB carries `answer_to` and `answer_host` names this host (common/protocol.py's Final
says why), the compute thread sends the FINAL itself to the client's PULL socket, right after
the forward, and then hands the RESULT to the control thread for the broker as always. The
broker's copy stays the guarantee; this one only comes first.

One PUSH socket per client endpoint, made and used by the compute thread alone, the least
recently used closed beyond `MAX_ENDPOINTS`. Sends never block: a client that is gone or slow
leaves at most `SEND_HWM` answers queued for it, and the rest are dropped (counted).
"""
from __future__ import annotations

import logging

import zmq

from common import protocol as p
from common import wire
from common.zmqutil import PushSockets

log = logging.getLogger(__name__)

MAX_ENDPOINTS = 16   # clients (frontend processes, Python clients) answered directly at once
SEND_HWM = 64        # answers queued for one client whose connection is not up


class DirectAnswers:
    def __init__(self, ctx: zmq.Context):
        self._socks = PushSockets(ctx, MAX_ENDPOINTS, {zmq.SNDHWM: SEND_HWM, zmq.RECONNECT_IVL: 250})
        self.counters = {"sent": 0, "dropped": 0}

    def send(self, endpoint: str, msg: p.Final, blobs: list | tuple = ()) -> bool:
        """Queue `msg` for `endpoint` without blocking; False (and counted) where it could not be."""
        try:
            self._socks.send(endpoint, wire.encode(msg, blobs))
        except zmq.ZMQError as exc:   # EAGAIN at the HWM, or an endpoint libzmq refuses
            self.counters["dropped"] += 1
            if self.counters["dropped"] in (1, 100, 10_000):
                log.warning("direct answer to %s dropped (%s); the broker's copy still goes", endpoint, exc)
            return False
        self.counters["sent"] += 1
        return True

    def close(self) -> None:
        self._socks.close()
