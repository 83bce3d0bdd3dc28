"""The wire vocabulary: magics, command bytes and typed messages for both links.

Client link (frontend / Python clients <-> broker FRONTEND ROUTER), magic ``VLM1``.
Worker link (model workers and the supervisor <-> broker BACKEND ROUTER), magic ``VLW1``.
Each message class is a frozen dataclass bound to one (link, command byte); `common/wire.py` is the
only module that turns them into frames. Field types are limited to what msgpack carries and what
`wire.decode` validates: str, int, float, bool, dict, list and their `| None` forms.
Images and other bulk bytes never go into a message: they travel as raw blob frames after it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar

MAGIC_CLIENT = b"VLM1"
MAGIC_WORKER = b"VLW1"
PROTO_MINOR = 1  # `v` in every envelope; unknown keys from a newer minor are ignored


class Link(Enum):
    CLIENT = MAGIC_CLIENT
    WORKER = MAGIC_WORKER


# Job ids are client-chosen strings (uuid4 hex by our client); model ids are config keys.
JobId = str
ModelId = str

# Model states as the broker reports them (GET /v1/models).
MODEL_STATES = ("unloaded", "loading", "loaded", "draining", "unloading", "failed")
# Worker states as workers report them in READY/HEARTBEAT.
WORKER_STATES = ("empty", "loading", "loaded", "unloading")

# Query services answered by the broker itself (MDP's "mmi." namespace).
Q_MODELS = "mmi.models"      # arg {"model": id?} -> {"models": [status, ...]}
Q_STATS = "mmi.stats"        # -> counters, gauges and queue depths for /metrics
Q_LOAD = "mmi.load"          # arg {"model": id} -> answered once loaded, or ERROR
Q_UNLOAD = "mmi.unload"      # arg {"model": id} -> answered once unloaded, or ERROR
QUERY_SERVICES = (Q_MODELS, Q_STATS, Q_LOAD, Q_UNLOAD)


@dataclass(frozen=True)
class Message:
    LINK: ClassVar[Link]
    CMD: ClassVar[int]


def _msg(link: Link, cmd: int):
    def wrap(cls):
        cls.LINK, cls.CMD = link, cmd
        return cls
    return wrap


C, W = Link.CLIENT, Link.WORKER

# ---- client -> broker ---------------------------------------------------------------------------


@_msg(C, 0x01)
@dataclass(frozen=True)
class Submit(Message):
    """A job. `params` is the job's own vocabulary (see workers/engine.py `GroundingRequest`);
    blob i (image bytes) is described by `blob_meta[i]` = {"mime", "len"}."""
    id: str
    model: str
    params: dict
    blob_meta: list = field(default_factory=list)
    ttl_ms: int = 120_000
    stream: bool = False
    priority: int = 0
    # send FINISHING shortly before the answer (see Finishing); older brokers ignore the key
    finishing: bool = False
    # a PULL endpoint of this client's where a worker on host `answer_host` also sends the FINAL
    # straight, ahead of the broker's copy (see Final); None: the broker's alone
    answer_to: str | None = None
    answer_host: str | None = None
    # the worker endpoint (a FINAL's `jobs_to`) this client also sent this SUBMIT to, straight
    # (see DIRECT_TO_WORKER); the broker gives the job to that worker where it may
    direct_to: str | None = None


@_msg(C, 0x02)
@dataclass(frozen=True)
class Cancel(Message):
    id: str
    reason: str = "user"  # client_disconnect / timeout / user


@_msg(C, 0x03)
@dataclass(frozen=True)
class Query(Message):
    id: str
    service: str
    arg: dict = field(default_factory=dict)


@_msg(C, 0x04)
@dataclass(frozen=True)
class Ping(Message):
    seq: int


# ---- broker -> client ---------------------------------------------------------------------------


@_msg(C, 0x11)
@dataclass(frozen=True)
class Accepted(Message):
    id: str
    queue_pos: int
    broker_incarnation: str


@_msg(C, 0x12)
@dataclass(frozen=True)
class Partial(Message):
    id: str
    seq: int
    delta: dict


@_msg(C, 0x13)
@dataclass(frozen=True)
class Final(Message):
    """The job's result; blobs that came with the worker's RESULT follow as frames.

    Direct answers: where the SUBMIT gave `answer_to` and the worker runs on `answer_host`, the
    worker also sends the FINAL itself, on this link's framing, to that PULL endpoint of the
    client's. The broker still sends its own FINAL (or an ERROR) for the job; that one is the
    guarantee, and the client keeps whichever comes first and drops the other. The direct copy
    skips three hops of the answer's way out (the worker's control thread, the broker, its send),
    each a thread that slept through the forward (bench/RESULTS.md, twenty-eighth session).

    A direct FINAL also names in `jobs_to` the worker's endpoint for direct jobs: the client may
    send its next SUBMITs for the same model there too (see DIRECT_TO_WORKER)."""
    id: str
    result: dict
    usage: dict = field(default_factory=dict)
    finish_reason: str = "stop"
    timings: dict = field(default_factory=dict)
    jobs_to: str | None = None


@_msg(C, 0x14)
@dataclass(frozen=True)
class Error(Message):
    """`id` is None for errors not tied to a job (a malformed message)."""
    id: str | None
    code: str
    message: str
    retryable: bool = False
    retry_after_ms: int | None = None


@_msg(C, 0x15)
@dataclass(frozen=True)
class Pong(Message):
    seq: int
    broker_incarnation: str


@_msg(C, 0x16)
@dataclass(frozen=True)
class QueryReply(Message):
    id: str
    data: dict


@_msg(C, 0x17)
@dataclass(frozen=True)
class Finishing(Message):
    """The answer to job `id` is expected within a few milliseconds; sent only where the SUBMIT
    asked (`finishing`). Nothing to act on: it makes the threads on the answer's way run just
    before it comes. While a GPU forward runs (~90 ms at 1080p) they all sleep, and on the
    virtual machines GPUs come in, a thread woken after that long takes ~0.1 ms more to run than
    one that ran a moment ago; an answer crosses ~8 such wake-ups (bench/RESULTS.md, thirteenth
    and twenty-fourth sessions). Busy-polling would keep them awake at a core each, and libzmq's
    own I/O threads cannot poll."""
    id: str


# ---- worker / supervisor -> broker --------------------------------------------------------------


@_msg(W, 0x01)
@dataclass(frozen=True)
class Ready(Message):
    """First message of every worker connection (and after a DISCONNECT): full state, so a
    restarted broker rebuilds placement without reloading. `capabilities` = {max_slots, max_batch,
    engine}; `mem` = {active, peak, cache, weights, limit, screenshots} in bytes, and under
    `helpers` a vision split's helper GPUs' {active, peak, cache, weights}, in rank order."""
    worker_uid: str
    pid: int
    host: str
    model_id: str
    state: str
    capabilities: dict
    mem: dict = field(default_factory=dict)
    weights_bytes: int = 0
    load_seconds: float = 0.0
    proto_min: int = PROTO_MINOR
    proto_max: int = PROTO_MINOR


@_msg(W, 0x02)
@dataclass(frozen=True)
class Heartbeat(Message):
    """`inflight` = [{"id", "started_ms_ago", "last_progress_ms_ago"}]."""
    seq: int
    state: str
    free_slots: int
    inflight: list = field(default_factory=list)
    mem: dict = field(default_factory=dict)


@_msg(W, 0x03)
@dataclass(frozen=True)
class WorkerPartial(Message):
    id: str
    seq: int
    delta: dict


@_msg(W, 0x09)
@dataclass(frozen=True)
class WorkerFinishing(Message):
    """These jobs' forward is about to end (the engine's `near_end`, workers/engine.py); the broker
    passes a FINISHING on to the clients that asked for one, and otherwise drops it."""
    ids: list


@_msg(W, 0x04)
@dataclass(frozen=True)
class Result(Message):
    id: str
    result: dict
    usage: dict = field(default_factory=dict)
    finish_reason: str = "stop"
    peak_mem_job: int = 0
    timings: dict = field(default_factory=dict)


@_msg(W, 0x05)
@dataclass(frozen=True)
class WorkerError(Message):
    """A job failure (`id` set) or a worker-level failure (`id` None, e.g. load_failed).
    `fatal` means the worker is about to exit."""
    id: str | None
    code: str
    message: str
    fatal: bool = False


@_msg(W, 0x06)
@dataclass(frozen=True)
class Memory(Message):
    mem: dict
    reason: str  # after_load / after_unload / threshold


@_msg(W, 0x07)
@dataclass(frozen=True)
class Loaded(Message):
    model_id: str
    weights_bytes: int
    load_seconds: float
    mem: dict = field(default_factory=dict)


@_msg(W, 0x08)
@dataclass(frozen=True)
class Unloaded(Message):
    model_id: str
    released_bytes: int
    mem: dict = field(default_factory=dict)


@_msg(W, 0x0F)
@dataclass(frozen=True)
class WorkerDisconnect(Message):
    reason: str


@_msg(W, 0x20)
@dataclass(frozen=True)
class Host(Message):
    """From the supervisor: host memory and its workers. `workers` = [{"model_id", "pid",
    "state" (starting/running/exited/backoff), "exit_code", "restarts"}]; `exited` lists pids that
    exited since the last report, so the broker can fail their jobs at once."""
    host: str
    mem_total: int
    mem_available: int
    workers: list = field(default_factory=list)
    exited: list = field(default_factory=list)


# ---- broker -> worker / supervisor --------------------------------------------------------------


@_msg(W, 0x11)
@dataclass(frozen=True)
class Job(Message):
    """`answer_to` / `answer_host`: the SUBMIT's, passed on (see Final)."""
    id: str
    params: dict
    ttl_ms: int
    attempt: int = 1
    blob_meta: list = field(default_factory=list)
    answer_to: str | None = None
    answer_host: str | None = None


@_msg(W, 0x12)
@dataclass(frozen=True)
class JobCancel(Message):
    id: str


@_msg(W, 0x13)
@dataclass(frozen=True)
class Load(Message):
    model_id: str
    mem_limit: int | None = None


@_msg(W, 0x14)
@dataclass(frozen=True)
class Unload(Message):
    model_id: str
    then: str = "stay"  # stay / exit


@_msg(W, 0x15)
@dataclass(frozen=True)
class BrokerHeartbeat(Message):
    seq: int
    broker_incarnation: str


@_msg(W, 0x1F)
@dataclass(frozen=True)
class BrokerDisconnect(Message):
    """The worker must close its socket and come back with a new identity and a READY."""
    reason: str


@_msg(W, 0x31)
@dataclass(frozen=True)
class Kill(Message):
    """To the supervisor: signal a worker process (the watchdog's last resort)."""
    pid: int
    signal: int = 9
    reason: str = ""


# Where direct answers may go: endpoints on the worker's own host only (the worker also checks
# `answer_host`), so a SUBMIT cannot make a worker connect anywhere else. A loopback address and
# a port and nothing more: libzmq reads "tcp://A;B" as "from source A to B".
DIRECT_ENDPOINT = re.compile(r"tcp://(127\.0\.0\.1|\[::1\]):[0-9]{1,5}|ipc://[^;]+")
MAX_DIRECT_ENDPOINT = 255


def direct_endpoint_ok(endpoint: str) -> bool:
    return len(endpoint) <= MAX_DIRECT_ENDPOINT and DIRECT_ENDPOINT.fullmatch(endpoint) is not None


CLIENT_TO_BROKER = (Submit, Cancel, Query, Ping)
# Direct jobs: a client on a worker's host sends the SUBMIT's very frames to that worker's PULL
# endpoint (a direct FINAL's `jobs_to`) as well as to the broker. The worker may decode the
# screenshot while the broker routes the job (the copy comes 0.65-0.9 ms before the JOB on H200
# hosts; the serving overhead fell 0.2-0.35 ms on one, not on another: bench/RESULTS.md, thirty-first
# session), but runs it only once the broker's JOB for it comes, with the same params and bytes.
# So the broker still owns every job: its queue, its retries, its one answer.
DIRECT_TO_WORKER = (Submit,)
BROKER_TO_CLIENT = (Accepted, Partial, Final, Error, Pong, QueryReply, Finishing)
WORKER_TO_CLIENT = (Final,)   # direct answers (see Final)
WORKER_TO_BROKER = (Ready, Heartbeat, WorkerPartial, WorkerFinishing, Result, WorkerError, Memory, Loaded,
                    Unloaded, WorkerDisconnect, Host)
BROKER_TO_WORKER = (Job, JobCancel, Load, Unload, BrokerHeartbeat, BrokerDisconnect, Kill)


def registry(*classes: type[Message]) -> dict[int, type[Message]]:
    table: dict[int, type[Message]] = {}
    for cls in classes:
        assert cls.CMD not in table, f"duplicate command byte {cls.CMD:#x}"
        table[cls.CMD] = cls
    return table


def as_dict(msg: Message) -> dict[str, Any]:
    return {f.name: getattr(msg, f.name) for f in fields(msg)}
