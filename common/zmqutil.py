"""Socket construction with the project's options, and small helpers. No business logic.

Why these options (architecture.md section 4): ROUTER_MANDATORY so a send to a vanished peer
raises EHOSTUNREACH instead of dropping silently; HWMs off because admission is ours (a ROUTER
drops silently at HWM); LINGER 0 so closing never hangs; ZMTP heartbeats on tcp; bounded frames.
"""
from __future__ import annotations

import os
import socket as _socket
from collections import OrderedDict
from typing import Any, Iterator

import zmq

MAX_MSG_BYTES = 64 * 1024 * 1024


def make_socket(ctx: zmq.Context, kind: int, *, identity: bytes | None = None,
                max_msg_bytes: int = MAX_MSG_BYTES) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    s.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    s.setsockopt(zmq.HEARTBEAT_TTL, 3000)
    s.setsockopt(zmq.RECONNECT_IVL, 250)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, 10_000)
    s.setsockopt(zmq.TCP_KEEPALIVE, 1)
    s.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
    if kind == zmq.ROUTER:
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if kind == zmq.DEALER:
        s.setsockopt(zmq.IMMEDIATE, 1)
    if identity is not None:
        s.setsockopt(zmq.IDENTITY, identity)
    return s


def bind(s: zmq.Socket, endpoint: str) -> None:
    """Bind; ipc:// sockets are made owner-only (0600), the same-host security boundary."""
    s.bind(endpoint)
    if endpoint.startswith("ipc://"):
        os.chmod(endpoint[len("ipc://"):], 0o600)


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host` (tests, benchmarks, a vision split's rendezvous)."""
    with _socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """A loopback endpoint with a currently free port (tests, benchmarks)."""
    return f"tcp://{host}:{free_port(host)}"


def close_quietly(*sockets: Any) -> None:
    for s in sockets:
        if s is not None and not s.closed:
            s.close(linger=0)


class PushSockets:
    """PUSH sockets by endpoint, each made and connected on first use with `options` (sockopt ->
    value; LINGER is 0), the least recently used closed beyond `max_endpoints`. Used by one thread
    (zmq sockets are not thread-safe): direct answers (workers/direct_answers.py) and direct jobs
    (common/client_direct_jobs.py)."""

    def __init__(self, ctx: zmq.Context, max_endpoints: int, options: dict[int, int]):
        self._ctx = ctx
        self._max = max_endpoints
        self._options = options
        self._socks: OrderedDict[str, zmq.Socket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._socks)

    def get(self, endpoint: str) -> zmq.Socket:
        """The socket for `endpoint`, now the most recently used; raises zmq.ZMQError where libzmq
        refuses the endpoint (nothing is kept then)."""
        sock = self._socks.pop(endpoint, None)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            for option, value in self._options.items():
                sock.setsockopt(option, value)
            try:
                sock.connect(endpoint)
            except zmq.ZMQError:
                sock.close(linger=0)
                raise
            while len(self._socks) >= self._max:
                self._socks.popitem(last=False)[1].close(linger=0)
        self._socks[endpoint] = sock   # most recently used last
        return sock

    def send(self, endpoint: str, frames: list) -> None:
        """Queue `frames` for `endpoint` without blocking; raises zmq.ZMQError where they could not
        be (EAGAIN at the HWM or, with IMMEDIATE, while not connected; an endpoint refused)."""
        self.get(endpoint).send_multipart(frames, flags=zmq.NOBLOCK, copy=False)

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close(linger=0)
        self._socks.clear()


def drain(sock: zmq.Socket, limit: int | None = None, copy: bool = False) -> Iterator[list]:
    """The messages already waiting on `sock`, without blocking: at most `limit` of them (None:
    all), so that one busy socket cannot starve the others polled with it."""
    n = 0
    while limit is None or n < limit:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            return
        n += 1
        yield frames
