"""Jobs the broker has accepted and not yet answered: the table, per-model queues, poison list.

A job lives here from ACCEPTED until its one terminal answer (FINAL or ERROR); then it is gone.
Times are the core's monotonic seconds.
"""
from __future__ import annotations

import hashlib
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

QUEUED = "queued"
DISPATCHED = "dispatched"


@dataclass(eq=False)
class Job:
    id: str
    client: bytes                  # routing identity of the submitting client
    model: str
    params: dict
    blobs: list                    # raw frames, forwarded untouched in JOB
    blob_meta: list
    stream: bool
    accepted_at: float
    deadline: float                # monotonic seconds
    attempt: int = 1               # 2 after one requeue (worker lost before anything streamed)
    state: str = QUEUED
    worker: bytes | None = None    # assignee while DISPATCHED
    dispatched_at: float | None = None
    streamed: bool = False         # a PARTIAL reached the client: no retry from here on
    deaths: int = 0                # workers that died while running it (2 -> poison)
    stalled_at: float | None = None  # the watchdog sent JobCancel at this time
    kill_sent: bool = False          # ... and then asked the supervisor to kill the worker
    screen_key: int | None = None    # broker.placement's key of its screenshot, once computed
    finishing: bool = False          # the client asked for FINISHING before the answer
    answer_to: str | None = None     # the client's endpoint for direct answers (protocol.Final)
    answer_host: str | None = None
    direct_to: str | None = None     # the worker endpoint the client sent its direct copy to

    def remaining_ms(self, now: float) -> int:
        return max(1, int((self.deadline - now) * 1000))


class JobTable:
    """Jobs by id (ids are client-chosen; one live job per id across all clients) and a FIFO
    queue per model of the jobs not yet dispatched."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._queues: dict[str, deque[Job]] = {}
        self.queued_total = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def queue(self, model: str) -> deque[Job]:
        return self._queues.setdefault(model, deque())

    def queue_depth(self, model: str) -> int:
        q = self._queues.get(model)
        return len(q) if q else 0

    def add(self, job: Job) -> int:
        """Insert a new job at the tail of its model's queue; returns its queue position."""
        self._jobs[job.id] = job
        self.enqueue(job)
        return len(self._queues[job.model]) - 1

    def enqueue(self, job: Job, head: bool = False) -> None:
        job.state, job.worker, job.dispatched_at = QUEUED, None, None
        job.stalled_at, job.kill_sent = None, False   # a retried job is watched afresh
        q = self.queue(job.model)
        q.appendleft(job) if head else q.append(job)
        self.queued_total += 1

    def pop_next(self, model: str) -> Job | None:
        q = self._queues.get(model)
        if not q:
            return None
        self.queued_total -= 1
        return q.popleft()

    def position(self, job: Job) -> int:
        if job.state != QUEUED:
            return 0
        return self._queues[job.model].index(job)

    def remove(self, job: Job) -> None:
        """Forget a job (it got its answer); takes it out of its queue if queued."""
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]
        if job.state == QUEUED:
            try:
                self._queues[job.model].remove(job)
                self.queued_total -= 1
            except (KeyError, ValueError):
                pass

    def queued(self, model: str) -> list[Job]:
        return list(self._queues.get(model, ()))

    def of_client(self, client: bytes) -> list[Job]:
        return [j for j in self._jobs.values() if j.client == client]


def job_digest(model: str, params: dict, blobs: list[Any]) -> str:
    """Identity of a request's content (model, params, blob bytes) for the poison list."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model.encode())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    for b in blobs:
        h.update(len(getattr(b, "buffer", b)).to_bytes(8, "little"))
        h.update(getattr(b, "buffer", b))
    return h.hexdigest()


@dataclass
class PoisonList:
    """Digests of requests that killed two workers; identical resubmits are refused until expiry."""
    ttl_s: float
    entries: dict[str, float] = field(default_factory=dict)   # digest -> expiry (monotonic s)

    def add(self, digest: str, now: float) -> None:
        self.entries[digest] = now + self.ttl_s

    def purge(self, now: float) -> None:
        for d in [d for d, exp in self.entries.items() if exp <= now]:
            del self.entries[d]

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __contains__(self, digest: str) -> bool:
        return digest in self.entries
