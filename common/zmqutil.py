"""Socket construction with the project's options, and small helpers. No business logic.

Why these options (architecture.md section 4): ROUTER_MANDATORY so a send to a vanished peer
raises EHOSTUNREACH instead of dropping silently; HWMs off because admission is ours (a ROUTER
drops silently at HWM); LINGER 0 so closing never hangs; ZMTP heartbeats on tcp; bounded frames.
"""
from __future__ import annotations

import os
import socket as _socket
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
