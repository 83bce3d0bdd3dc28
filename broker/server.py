"""The broker's I/O shell: two ROUTER sockets, one poll loop, a 100 ms timer; no business logic.

Frames in -> `common.wire.decode` -> events for `broker.core.Broker`; its commands -> frames out
(blobs sent with copy=False, untouched). A send to a vanished peer raises EHOSTUNREACH
(ROUTER_MANDATORY) and becomes a `SendFailed` event. Nothing a peer sends can end the loop.
SIGINT/SIGTERM: refuse new jobs, let accepted ones finish for up to `grace_s`, exit 0.
"""
from __future__ import annotations

import logging
import signal
import time
import uuid
from collections import deque

import zmq

from common import wire
from common.config import AppConfig
from common.zmqutil import bind, close_quietly, drain, make_socket
from broker import events as e
from broker.core import Broker

log = logging.getLogger("broker")

TICK_S = 0.1             # deadlines, liveness and timers are checked this often
RECV_BATCH = 256         # messages taken from one socket before looking at the other and the timer
DEFAULT_GRACE_S = 10.0
EXIT_LINGER_MS = 1000    # on exit, time for the last answers to leave (LINGER 0 would drop them)
# ... and the connections stay up this long after them: a client DEALER with IMMEDIATE=1 drops
# the unread messages of a connection that closes, so closing right after the last answer
# can lose it when the client is slow to read (seen under CPU load)
EXIT_QUIET_S = 1.0


class BrokerServer:
    def __init__(self, cfg: AppConfig, *, grace_s: float = DEFAULT_GRACE_S, incarnation: str | None = None):
        self.cfg = cfg
        self.grace_s = grace_s
        self.incarnation = incarnation or uuid.uuid4().hex
        self._stop_requests = 0
        self.core: Broker | None = None
        self.send_errors = 0
        self.internal_errors = 0

    def request_stop(self, *_args) -> None:
        """Signal handler: first call drains gracefully, a second one stops at once."""
        self._stop_requests += 1

    def run(self) -> int:
        bc = self.cfg.broker
        ctx = zmq.Context()
        front = back = None
        try:
            front = make_socket(ctx, zmq.ROUTER)
            back = make_socket(ctx, zmq.ROUTER)
            bind(front, bc.client_endpoint)
            bind(back, bc.worker_endpoint)
            now = time.monotonic()
            self.core = Broker(bc, self.cfg.models, self.incarnation,
                               wall_offset=time.time() - now, started_at=now)
            log.info("broker up", extra={"ctx": {"clients": bc.client_endpoint, "workers": bc.worker_endpoint,
                                                 "incarnation": self.incarnation, "models": len(self.cfg.models)}})
            self._loop(front, back)
            for sock in (front, back):
                sock.setsockopt(zmq.LINGER, EXIT_LINGER_MS)
                sock.close()
            return 0
        finally:
            close_quietly(front, back)
            ctx.term()

    def _loop(self, front: zmq.Socket, back: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        sides = {front: (e.CLIENT, wire.FROM_CLIENT), back: (e.WORKER, wire.FROM_WORKER)}
        self._socks = {e.CLIENT: front, e.WORKER: back}
        next_tick = time.monotonic()
        stop_deadline = exit_at = None
        while True:
            timeout_ms = max(0, int((next_tick - time.monotonic()) * 1000) + 1)
            for sock, _ in poller.poll(timeout_ms):
                side, table = sides[sock]
                for frames in drain(sock, RECV_BATCH):
                    self._feed(self._decode(side, table, frames))
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                self._feed(e.Tick(now))
            if self._stop_requests and stop_deadline is None:
                stop_deadline = now + self.grace_s
                log.info("stop requested", extra={"ctx": {"grace_s": self.grace_s}})
                self._feed(e.Shutdown(now))
            if exit_at is not None:
                if now >= exit_at or self._stop_requests >= 2:
                    return
            elif stop_deadline is not None:
                if self.core.drained or now >= stop_deadline or self._stop_requests > 1:
                    # every job has its answer (or gets broker_unavailable now); pending
                    # mmi.load/unload waiters get theirs too; then a quiet period to let them out
                    self._feed(e.Shutdown(now, force=True))
                    exit_at = now + (EXIT_QUIET_S if self._stop_requests < 2 else 0.0)

    def _decode(self, side: str, table: dict, frames: list) -> e.Event:
        now = time.monotonic()
        identity = frames[0].bytes
        try:
            msg, blobs = wire.decode(frames[1:], table)
        except wire.ProtocolError as err:
            return (e.ClientBadMessage if side == e.CLIENT else e.WorkerBadMessage)(identity, err, now)
        return (e.ClientMessage if side == e.CLIENT else e.WorkerMessage)(identity, msg, blobs, now)

    def _feed(self, event: e.Event) -> None:
        """Run one event through the core and execute its commands; send failures feed back."""
        pending = deque([event])
        while pending:
            ev = pending.popleft()
            try:
                commands = self.core.handle(ev)
            except Exception:  # a bug must not take the broker down with every job in it
                self.internal_errors += 1
                log.exception("core failed on %s", type(ev).__name__)
                continue
            for cmd in commands:
                failed = self._execute(cmd)
                if failed is not None:
                    pending.append(failed)

    def _execute(self, cmd: e.Command) -> e.SendFailed | None:
        if isinstance(cmd, e.Log):
            log.log(cmd.level, cmd.text, extra={"ctx": cmd.ctx})
            return None
        side = e.CLIENT if isinstance(cmd, e.ToClient) else e.WORKER
        try:
            self._socks[side].send_multipart([cmd.identity, *wire.encode(cmd.msg, cmd.blobs)], copy=False)
        except zmq.ZMQError as err:
            self.send_errors += 1
            if err.errno == zmq.EHOSTUNREACH:
                return e.SendFailed(cmd.identity, side, time.monotonic())
            log.warning("send failed: %s", err, extra={"ctx": {"side": side, "msg": type(cmd.msg).__name__}})
        return None


def run(cfg: AppConfig, grace_s: float = DEFAULT_GRACE_S) -> int:
    server = BrokerServer(cfg, grace_s=grace_s)
    signal.signal(signal.SIGINT, server.request_stop)
    signal.signal(signal.SIGTERM, server.request_stop)
    return server.run()
