"""Job-side records of the Python client: `JobResult`, `JobHandle` and the client's per-job entry.

A JobHandle reads its job's asyncio.Queue, which the client's reader task fills with ACCEPTED /
PARTIAL messages and exactly one terminal event (a JobResult or a ServerError). There is no
timeout here: the client's ticker ends every job by its deadline.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from common.errors import ServerError

if TYPE_CHECKING:
    from common.client import AsyncClient


@dataclass
class JobResult:
    """A FINAL. `blobs[i]` are the raw frames that came with it (e.g. the attention map when
    `result["attention_blob"] == i`, float32 little-endian)."""
    job_id: str
    result: dict
    usage: dict
    timings: dict          # milliseconds
    finish_reason: str
    blobs: list[bytes] = field(default_factory=list)


@dataclass(eq=False)
class JobEntry:
    id: str
    queue: asyncio.Queue
    frames: list | None     # the SUBMIT, kept until ACCEPTED for the one resend
    sent_t: float           # time.monotonic()
    deadline: float         # client-side last resort, monotonic
    accepted_inc: str | None = None
    resent: bool = False
    direct: bool = False    # asked for a direct answer: a second copy will come (protocol.Final)
    model: str = ""


def sniff_mime(blob: Any) -> str:
    head = bytes(memoryview(blob)[:12])
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


class JobHandle:
    """One submitted job. Iterate for events (Accepted, Partial, then the JobResult), or await
    `result()`; both raise ServerError for an ERROR."""

    def __init__(self, client: "AsyncClient", job: JobEntry):
        self._client = client
        self._job = job
        self.job_id = job.id
        self._terminal: JobResult | ServerError | None = None

    async def _next(self) -> Any:
        if self._terminal is not None:
            return self._terminal
        # No wait_for here (it costs a task per event): the ticker ends every job by its deadline.
        ev = await self._job.queue.get()
        if isinstance(ev, (JobResult, ServerError)):
            self._terminal = ev
        return ev

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._events()

    async def _events(self) -> AsyncIterator[Any]:
        while True:
            ev = await self._next()
            if isinstance(ev, ServerError):
                raise ev
            yield ev
            if isinstance(ev, JobResult):
                return

    async def result(self) -> JobResult:
        while True:
            ev = await self._next()
            if isinstance(ev, ServerError):
                raise ev
            if isinstance(ev, JobResult):
                return ev

    async def cancel(self, reason: str = "user") -> None:
        """Tell the broker; the handle ends at once with ServerError("cancelled")."""
        await self._client._cancel(self._job, reason)
