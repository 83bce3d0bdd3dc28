"""Who is connected on the backend: model workers (one per unit: a model, or one of its
replicas) and supervisors.

Pure bookkeeping: no commands are issued here. Liveness is "any message within
`heartbeat_interval_ms * heartbeat_liveness`"; the core decides what losing a worker means.
Times are the core's monotonic seconds; memory figures are bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common import protocol as p


@dataclass(eq=False)
class Worker:
    identity: bytes
    uid: str
    pid: int
    host: str
    model_id: str
    max_slots: int
    state: str                     # as the worker last reported it (empty/loading/loaded/unloading)
    last_seen: float
    registered_at: float
    capabilities: dict = field(default_factory=dict)
    mem: dict = field(default_factory=dict)
    # Jobs it holds, in dispatch order: `live` ones still owe a client an answer; `cancelled`
    # ones (deadline, client cancel) were answered already but still occupy a slot until the
    # worker answers them or a heartbeat no longer lists them.
    live: dict[str, None] = field(default_factory=dict)
    cancelled: dict[str, float] = field(default_factory=dict)   # job id -> when cancelled
    doomed: bool = False           # given up on (load timeout, watchdog): gets no more work
    closed: bool = False           # its last heartbeat said free_slots 0 while not full (draining)
    running: list = field(default_factory=list)   # job ids its last heartbeat listed
    waiting: set = field(default_factory=set)     # ... of which it said "waiting" (not started)

    @property
    def busy(self) -> int:
        return len(self.live) + len(self.cancelled)

    @property
    def free_slots(self) -> int:
        return 0 if self.doomed or self.closed else max(0, self.max_slots - self.busy)

    @property
    def device_mem_total(self) -> int:
        v = self.capabilities.get("device_mem_total")
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

    @classmethod
    def from_ready(cls, identity: bytes, msg: p.Ready, now: float) -> "Worker":
        caps = msg.capabilities if isinstance(msg.capabilities, dict) else {}
        slots = caps.get("max_slots", 1)
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            slots = 1
        return cls(identity=identity, uid=msg.worker_uid, pid=msg.pid, host=msg.host,
                   model_id=msg.model_id, max_slots=min(slots, 1024), state=msg.state,
                   last_seen=now, registered_at=now, capabilities=caps, mem=dict(msg.mem))


@dataclass(eq=False)
class Supervisor:
    identity: bytes
    host: str
    mem_total: int
    mem_available: int
    last_seen: float
    pids: set[int] = field(default_factory=set)   # pids of the workers it reported


class Registry:
    def __init__(self) -> None:
        self.workers: dict[bytes, Worker] = {}
        self.by_model: dict[str, Worker] = {}
        self.supervisors: dict[bytes, Supervisor] = {}
        # Largest memory sizes ever reported (bytes); the "auto" budget derives from these.
        self.device_total = 0                      # any device's
        self.device_totals: dict[int, int] = {}    # by device (ModelState.device_key)
        self.host_total = 0

    def get(self, identity: bytes) -> Worker | None:
        return self.workers.get(identity)

    def for_model(self, model_id: str) -> Worker | None:
        return self.by_model.get(model_id)

    def add(self, worker: Worker, device: int = 0) -> None:
        """Register a worker that runs on `device`; the caller has removed any previous worker of
        the same unit."""
        self.workers[worker.identity] = worker
        self.by_model[worker.model_id] = worker
        self.device_total = max(self.device_total, worker.device_mem_total)
        if worker.device_mem_total:
            self.device_totals[device] = max(self.device_totals.get(device, 0), worker.device_mem_total)

    def remove(self, identity: bytes) -> Worker | None:
        w = self.workers.pop(identity, None)
        if w is not None and self.by_model.get(w.model_id) is w:
            del self.by_model[w.model_id]
        return w

    def silent(self, now: float, timeout_s: float) -> list[Worker]:
        """Workers not heard from for longer than `timeout_s`."""
        return [w for w in self.workers.values() if now - w.last_seen > timeout_s]

    def by_pid(self, pid: int, host: str) -> Worker | None:
        for w in self.workers.values():
            if w.pid == pid and (not host or not w.host or host == w.host):
                return w
        return None

    # ---- supervisors ----

    def supervisor_report(self, identity: bytes, msg: p.Host, now: float) -> Supervisor:
        s = self.supervisors.get(identity)
        if s is None:
            s = self.supervisors[identity] = Supervisor(identity, msg.host, msg.mem_total,
                                                        msg.mem_available, now)
        s.host, s.mem_total, s.mem_available, s.last_seen = msg.host, msg.mem_total, msg.mem_available, now
        s.pids = {w["pid"] for w in msg.workers if isinstance(w, dict) and isinstance(w.get("pid"), int)}
        if isinstance(msg.mem_total, int) and msg.mem_total > 0:
            self.host_total = max(self.host_total, msg.mem_total)
        return s

    def supervisor_for(self, worker: Worker) -> Supervisor | None:
        """The supervisor that reported this worker's pid, else one on its host, else the most
        recently heard one."""
        sups = sorted(self.supervisors.values(), key=lambda s: s.last_seen, reverse=True)
        for s in sups:
            if worker.pid in s.pids and (not worker.host or not s.host or s.host == worker.host):
                return s
        for s in sups:
            if s.host and s.host == worker.host:
                return s
        return sups[0] if sups else None

    def forget_silent_supervisors(self, now: float, timeout_s: float) -> None:
        for ident in [i for i, s in self.supervisors.items() if now - s.last_seen > timeout_s]:
            del self.supervisors[ident]
