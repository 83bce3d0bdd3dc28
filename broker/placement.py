"""Which replica of a model a job goes to (models with `devices`; pure bookkeeping, no I/O).

Least busy first: a replica's queue is its own GPU's wait. But a worker keeps the state of the
screenshots it has seen (workers/screen_cache.py), and a question about one of those takes ~13 ms
there against ~120 ms on any other replica (1080p, 2B shape, bench/RESULTS.md). So:
- a screenshot that went to a replica before goes there again, unless that replica holds more than
  SLACK jobs beyond the least busy one: one job ahead costs at most about one forward, which the
  kept state saves, and on the GPU it saves a whole forward;
- a new screenshot goes to the least busy replica, ties broken by rendezvous hashing (each screenshot
  ranks the replicas in its own fixed order, unchanged by replicas coming or going), so that a
  screen posted ahead (POST /v1/screenshots) and its question meet even if the broker forgot it;
  but where the client sent the job straight to one of the least busy replicas too (a direct job,
  common/protocol.py), that one, which may have its screenshot decoded already.
A screenshot's key is a CRC-32 of its size and its first and last 64 KiB: a routing hint, not an
identity (a collision only sends two screens to one replica), bounded in cost on the broker's loop
whatever the image's size.
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from typing import TYPE_CHECKING

from broker.jobs import Job

if TYPE_CHECKING:
    from broker.registry import Worker
    from broker.scheduler import ModelState

SCREEN_KEY_SPAN = 1 << 16
HOMES = 4096    # screenshots whose replica is remembered; the least recently used are forgotten
SLACK = 1       # jobs a screenshot's replica may hold beyond the least busy one and still get it


def screen_key(job: Job) -> int:
    """The routing key of the job's screenshot (its first blob), computed once per job."""
    if job.screen_key is None:
        blob = job.blobs[0] if job.blobs else b""
        data = memoryview(getattr(blob, "buffer", blob)).cast("B")
        key = zlib.crc32(len(data).to_bytes(8, "little"))
        key = zlib.crc32(data[:SCREEN_KEY_SPAN], key)
        job.screen_key = zlib.crc32(data[-SCREEN_KEY_SPAN:], key) if len(data) > SCREEN_KEY_SPAN else key
    return job.screen_key


def replica_rank(key: int, unit_id: str) -> int:
    """How much the screenshot `key` prefers the replica `unit_id` (higher: more)."""
    return zlib.crc32(unit_id.encode(), key)


def _has_copy(job: Job, w: "Worker") -> bool:
    """The client sent `job` straight to `w` as well (its endpoint for direct jobs)."""
    return job.direct_to is not None and w.capabilities.get("jobs_to") == job.direct_to


class Placement:
    def __init__(self, homes: int = HOMES):
        self.limit = homes
        self.homes: OrderedDict[tuple[str, int], str] = OrderedDict()   # (model, screen key) -> unit id

    def choose(self, job: Job, ready: list[tuple["ModelState", "Worker"]]) -> tuple["ModelState", "Worker"]:
        """One of `ready` (a model's loaded replicas with a free slot, as (state, worker)) for `job`,
        remembered as its screenshot's replica."""
        key = screen_key(job)
        least = min(w.busy for _, w in ready)
        home = self.homes.get((job.model, key))
        chosen = next(((m, w) for m, w in ready if m.id == home and w.busy <= least + SLACK), None)
        if chosen is None:
            chosen = min(ready, key=lambda mw: (mw[1].busy, not _has_copy(job, mw[1]), -replica_rank(key, mw[0].id)))
        self.homes[(job.model, key)] = chosen[0].id
        self.homes.move_to_end((job.model, key))
        if len(self.homes) > self.limit:
            self.homes.popitem(last=False)
        return chosen
