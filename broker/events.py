"""The broker core's vocabulary: events in (from the I/O shell) and commands out (to execute).

Every event carries `now`, the shell's monotonic clock in seconds; the core never reads a clock.
Identities are the ROUTER routing ids (bytes) of the peer on the named side.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common import protocol as p
from common.wire import ProtocolError

CLIENT = "client"
WORKER = "worker"


# ---- events ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientMessage:
    identity: bytes
    msg: p.Message
    blobs: list = field(default_factory=list)   # raw frames, forwarded untouched
    now: float = 0.0


@dataclass(frozen=True)
class ClientBadMessage:
    identity: bytes
    error: ProtocolError
    now: float = 0.0


@dataclass(frozen=True)
class WorkerMessage:
    """From a model worker or a supervisor (both use the backend ROUTER)."""
    identity: bytes
    msg: p.Message
    blobs: list = field(default_factory=list)
    now: float = 0.0


@dataclass(frozen=True)
class WorkerBadMessage:
    identity: bytes
    error: ProtocolError
    now: float = 0.0


@dataclass(frozen=True)
class SendFailed:
    """A send to `identity` raised EHOSTUNREACH: the peer is gone. `side` is CLIENT or WORKER."""
    identity: bytes
    side: str
    now: float = 0.0


@dataclass(frozen=True)
class Tick:
    """Periodic (about every 100 ms): deadlines, liveness, timeouts, heartbeats."""
    now: float


@dataclass(frozen=True)
class Shutdown:
    """Graceful stop: refuse new work, let accepted jobs finish. `force`: the grace period is
    over; every job still live gets a retryable `broker_unavailable`."""
    now: float
    force: bool = False


Event = ClientMessage | ClientBadMessage | WorkerMessage | WorkerBadMessage | SendFailed | Tick | Shutdown


# ---- commands ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToClient:
    identity: bytes
    msg: p.Message
    blobs: tuple | list = ()


@dataclass(frozen=True)
class ToWorker:
    """To a model worker or a supervisor."""
    identity: bytes
    msg: p.Message
    blobs: tuple | list = ()


@dataclass(frozen=True)
class Log:
    """`level`: a `logging` level number; `ctx`: structured context (job_id, model, worker)."""
    level: int
    text: str
    ctx: dict[str, Any] = field(default_factory=dict)


Command = ToClient | ToWorker | Log
