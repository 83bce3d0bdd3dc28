"""Python client for the broker's client link: `AsyncClient` (asyncio) and `Client` (blocking).

One zmq.asyncio DEALER per client and one reader task that demultiplexes replies into per-job
asyncio.Queues; timeouts live on those queues and futures, never around `recv` (a cancelled
recv can lose a message, zeromq/pyzmq#1925). A ticker task resends a SUBMIT that got no ACCEPTED
within 2 s (the broker dedupes on client identity + job id), PINGs when idle for 1 s, and fails
in-flight jobs when the broker restarts (`broker_restarted`) or stays silent for 3 s
(`broker_unavailable`, retryable). Nothing happens at import or construction: sockets are made
in `start()`, on whichever event loop is running (the Sanic frontend calls it from
`before_server_start`).

Direct answers (unless `direct_answers=False`): the client also binds a loopback PULL socket and
asks workers on this host to send each (non-streamed) job's FINAL there straight, ahead of the
broker's copy (common/protocol.py's Final); the first of the two is kept, the other dropped. A
client on another host than the workers gets the broker's copy alone.

Direct jobs (unless `direct_jobs=False`, and only with direct answers): once a model's worker has
answered straight, the client sends each next (non-streamed) SUBMIT for that model to the worker
too, ahead of the broker's JOB, so it can decode the screenshot while the broker routes the job
(common/protocol.py's DIRECT_TO_WORKER, common/client_direct_jobs.py).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from typing import Any, Iterator, Sequence

import zmq
import zmq.asyncio

from common import protocol as p
from common import wire
from common.client_direct_jobs import DirectJobs
from common.client_jobs import JobEntry, JobHandle, JobResult, sniff_mime
from common.errors import ServerError
from common.zmqutil import make_socket

log = logging.getLogger(__name__)

RESEND_AFTER_S = 2.0    # no ACCEPTED by then: the SUBMIT is presumed lost, sent once more
PING_IDLE_S = 1.0       # PING when nothing was heard from the broker for this long
SILENCE_S = 3.0         # broker silent this long: unhealthy; jobs waiting as long fail
TICK_S = 0.1
CONNECT_WAIT_S = 1.0    # how long a send waits for the connection to come up
SEND_RETRY_S = 0.05     # retry period of a send while not connected
DEADLINE_SLACK_S = 5.0  # the broker answers deadline_exceeded itself; this is the last resort
LATE_KEEP_S = 60.0      # a late answer (the broker's echo of our CANCEL, a direct answer's second
                        # copy) is expected within this
DIRECT_BIND = "tcp://127.0.0.1:*"   # the direct answers' PULL socket: loopback, any free port


class AsyncClient:
    def __init__(self, endpoint: str, *, ctx: zmq.asyncio.Context | None = None, default_ttl_s: float = 120.0,
                 finishing: bool = True, direct_answers: bool = True, direct_jobs: bool = True):
        self.endpoint = endpoint
        self.default_ttl_s = default_ttl_s
        self.finishing = finishing   # ask for FINISHING before each answer (protocol.Finishing says why)
        self.direct_answers = direct_answers
        self.direct_jobs = direct_jobs
        self._direct_jobs: DirectJobs | None = None
        self.answer_to: str | None = None    # the direct answers' endpoint, once started
        self._host: str | None = None
        self._direct: zmq.asyncio.Socket | None = None
        self._answered: dict[str, float] = {}   # job id -> when, for jobs whose second answer may come
        self._ctx = ctx
        self._own_ctx = ctx is None
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._jobs: dict[str, JobEntry] = {}
        self._queries: dict[str, asyncio.Future] = {}
        self._pings: dict[int, tuple[asyncio.Future, float]] = {}
        self._cancelled: dict[str, float] = {}   # job id -> when; the broker's echo is absorbed
        self._seq = 0
        self._incarnation: str | None = None
        self._heard_t: float | None = None    # last message from the broker
        self._started_t = 0.0
        self._ping_t = 0.0
        self.counters = {"decode_errors": 0, "resends": 0, "unknown_job": 0, "direct_answers": 0, "direct_jobs": 0,
                         "direct_jobs_unsent": 0}

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._sock is not None:
            return
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        sock = make_socket(self._ctx, zmq.DEALER, identity=b"c:" + uuid.uuid4().bytes)
        sock.connect(self.endpoint)
        self._sock = sock
        self._started_t = time.monotonic()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._reader(), name="vlm-client-reader"),
                       loop.create_task(self._ticker(), name="vlm-client-ticker")]
        if self.direct_answers:
            direct = self._direct = make_socket(self._ctx, zmq.PULL)
            direct.bind(DIRECT_BIND)
            self.answer_to = direct.getsockopt_string(zmq.LAST_ENDPOINT)
            self._host = socket.gethostname()
            if self.direct_jobs:
                self._direct_jobs = DirectJobs(self._ctx, self.counters)
            self._tasks.append(loop.create_task(self._read(direct, wire.DIRECT_TO_CLIENT, "a worker",
                                                           self._direct_final), name="vlm-client-direct"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for job in list(self._jobs.values()):
            self._finish(job, ServerError("broker_unavailable", "client closed", retryable=True, job_id=job.id))
        for fut in [*self._queries.values(), *(f for f, _ in self._pings.values())]:
            if not fut.done():
                fut.set_exception(ServerError("broker_unavailable", "client closed", retryable=True))
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._direct is not None:
            self._direct.close(linger=0)
            self._direct = self.answer_to = None
        if self._direct_jobs is not None:
            self._direct_jobs.close()
            self._direct_jobs = None
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def __aenter__(self) -> "AsyncClient":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def healthy(self) -> bool:
        """A message from the broker within the last 3 s."""
        return self._heard_t is not None and time.monotonic() - self._heard_t < SILENCE_S

    @property
    def incarnation(self) -> str | None:
        return self._incarnation

    # ---- jobs -----------------------------------------------------------------------------------

    async def submit(self, model: str, params: dict, blobs: Sequence[bytes] = (), *, job_id: str | None = None,
                     ttl_s: float | None = None, stream: bool = False) -> JobHandle:
        """Send a SUBMIT; raises ServerError(broker_unavailable) if the broker cannot be reached."""
        if self._sock is None:
            raise RuntimeError("AsyncClient.start() was not called")
        jid = job_id or uuid.uuid4().hex
        if jid in self._jobs:
            raise ValueError(f"job id {jid!r} is already in flight")
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        blobs = list(blobs)
        meta = [{"mime": sniff_mime(b), "len": memoryview(b).nbytes} for b in blobs]
        # streamed jobs' answers stay on the broker's way (a direct FINAL could pass their
        # PARTIALs), and so do those of an id answered lately (its other copy may still come)
        direct = self.answer_to is not None and not stream and jid not in self._answered
        copy_to = self._direct_jobs.endpoint(model) if direct and self._direct_jobs is not None else None
        msg = p.Submit(id=jid, model=model, params=params, blob_meta=meta, ttl_ms=max(1, int(ttl * 1000)),
                       stream=stream, finishing=self.finishing, answer_to=self.answer_to if direct else None,
                       answer_host=self._host if direct else None, direct_to=copy_to)
        frames = wire.encode(msg, blobs)
        now = time.monotonic()
        job = JobEntry(jid, asyncio.Queue(), frames, now, now + ttl + DEADLINE_SLACK_S, direct=direct, model=model)
        self._jobs[jid] = job
        if copy_to is not None:   # the worker's copy first: the broker's JOB is to find it there
            self._direct_jobs.send(copy_to, frames)
        try:
            await self._send(frames, CONNECT_WAIT_S)
        except BaseException:   # unreachable broker, or the caller was cancelled mid-wait: the
            self._jobs.pop(jid, None)   # ticker must not resend a SUBMIT nobody waits for
            raise
        return JobHandle(self, job)

    async def ground(self, model: str, image: bytes, instruction: str, *, ttl_s: float | None = None,
                     **params: Any) -> JobResult:
        handle = await self.submit(model, {"instruction": instruction, **params}, [image], ttl_s=ttl_s)
        return await handle.result()

    async def prefill(self, model: str, image: bytes, *, ttl_s: float | None = None, **params: Any) -> JobResult:
        """Keep a screenshot's state in the model's worker for later `ground` calls with the same
        image bytes and the same `system`, `max_pixels`, `min_pixels` and `cache_scope` params,
        which then run from it. The result has no points; `usage["cached_tokens"]` (kept before)
        or `usage["kept_tokens"]` (kept now) is what those calls will report as cached, and
        `result["not_kept"]` says why nothing is kept (the model's screenshot cache is off, say)."""
        handle = await self.submit(model, {"prefill": True, **params}, [image], ttl_s=ttl_s)
        return await handle.result()

    async def _cancel(self, job: JobEntry, reason: str) -> None:
        if self._jobs.get(job.id) is not job:
            return
        self._finish(job, ServerError("cancelled", f"cancelled by the client ({reason})", job_id=job.id))
        _remember(self._cancelled, job.id)
        try:
            await self._send(wire.encode(p.Cancel(id=job.id, reason=reason)), 0)
        except ServerError:
            pass   # broker unreachable: it will fail the job itself (deadline / lost client)

    def _finish(self, job: JobEntry, event: JobResult | ServerError) -> None:
        """Deliver the job's one terminal event (later ones are dropped)."""
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]
            job.frames = None
            job.queue.put_nowait(event)
            if job.direct:
                _remember(self._answered, job.id)

    # ---- queries --------------------------------------------------------------------------------

    async def query(self, service: str, arg: dict | None = None, timeout_s: float = 5.0) -> dict:
        if self._sock is None:
            raise RuntimeError("AsyncClient.start() was not called")
        qid = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self._queries[qid] = fut
        try:
            await self._send(wire.encode(p.Query(id=qid, service=service, arg=arg or {})), min(CONNECT_WAIT_S, timeout_s))
            return await asyncio.wait_for(fut, timeout_s)   # a future, not a recv: safe to time out
        except asyncio.TimeoutError:
            raise ServerError("broker_unavailable", f"no answer to {service} within {timeout_s}s",
                              retryable=True, retry_after_ms=1000) from None
        finally:
            self._queries.pop(qid, None)

    async def models(self, model: str | None = None) -> list[dict]:
        return (await self.query(p.Q_MODELS, {"model": model} if model else {}))["models"]

    async def load(self, model: str, timeout_s: float = 330) -> dict:
        return await self.query(p.Q_LOAD, {"model": model}, timeout_s)

    async def unload(self, model: str, timeout_s: float = 60) -> dict:
        return await self.query(p.Q_UNLOAD, {"model": model}, timeout_s)

    async def stats(self) -> dict:
        return await self.query(p.Q_STATS)

    async def ping(self, timeout_s: float = 3.0) -> float:
        """Round trip to the broker in seconds."""
        self._seq += 1
        seq = self._seq
        fut = asyncio.get_running_loop().create_future()
        self._pings[seq] = (fut, time.perf_counter())
        try:
            await self._send(wire.encode(p.Ping(seq=seq)), min(CONNECT_WAIT_S, timeout_s))
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise ServerError("broker_unavailable", f"no PONG within {timeout_s}s", retryable=True) from None
        finally:
            self._pings.pop(seq, None)

    # ---- socket ---------------------------------------------------------------------------------

    async def _send(self, frames: list, wait_s: float) -> None:
        """Send now, or retry for up to `wait_s` while the connection comes up (IMMEDIATE: no
        queueing to nowhere). Only non-blocking sends, retried on a short sleep: awaiting
        `poll(POLLOUT)` would register a pending send with pyzmq, after which every other
        NOBLOCK send (the ticker's PING) queues behind it and hangs until the broker returns."""
        sock = self._sock
        if sock is None:
            raise ServerError("broker_unavailable", "client is closed", retryable=True)
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            try:
                await sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                pass
            if time.monotonic() >= deadline or self._sock is not sock:
                break
            await asyncio.sleep(SEND_RETRY_S)
        raise ServerError("broker_unavailable", f"broker at {self.endpoint} is not reachable",
                          retryable=True, retry_after_ms=1000)

    async def _reader(self) -> None:
        assert self._sock is not None
        await self._read(self._sock, wire.TO_CLIENT, "the broker", self._dispatch, heard=True)

    async def _read(self, sock: zmq.asyncio.Socket, table: dict, source: str, handle: Any,
                    heard: bool = False) -> None:
        """Receive from `sock` until it is closed, each message decoded with `table` and given to
        `handle`; `heard`: every message, even a bad one, shows the broker alive."""
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                if sock.closed:
                    return
                log.warning("receive from %s failed: %s", source, exc)
                await asyncio.sleep(0.01)
                continue
            if heard:
                self._heard_t = time.monotonic()
            try:
                msg, blobs = wire.decode(frames, table)
            except wire.ProtocolError as exc:
                self.counters["decode_errors"] += 1
                log.warning("dropped a bad message from %s (%s)", source, exc)
                continue
            try:
                handle(msg, blobs)
            except Exception:   # a bug here must not kill the reader (every job would hang)
                log.exception("client dispatch failed for %r", msg)

    def _dispatch(self, msg: p.Message, blobs: list) -> None:
        if isinstance(msg, p.Accepted):
            self._seen_incarnation(msg.broker_incarnation)
            job = self._jobs.get(msg.id)
            if job is not None:
                job.accepted_inc, job.frames = msg.broker_incarnation, None
                job.queue.put_nowait(msg)
        elif isinstance(msg, p.Finishing):
            pass    # its work is done: this thread has just run, so the answer finds it awake
        elif isinstance(msg, p.Partial):
            job = self._jobs.get(msg.id)
            if job is not None:
                job.queue.put_nowait(msg)
        elif isinstance(msg, p.Final):
            job = self._jobs.get(msg.id)
            if job is None:
                self._unknown(msg.id)
                return
            self._finish(job, _job_result(msg, blobs))
        elif isinstance(msg, p.Error):
            err = ServerError(msg.code, msg.message, retryable=msg.retryable, retry_after_ms=msg.retry_after_ms,
                              job_id=msg.id)
            fut = self._queries.get(msg.id) if msg.id else None
            if fut is not None and not fut.done():
                fut.set_exception(err)
            elif msg.id in self._jobs:
                self._finish(self._jobs[msg.id], err)
            elif msg.id:
                self._unknown(msg.id)
            else:
                log.warning("broker error: %s: %s", msg.code, msg.message)
        elif isinstance(msg, p.Pong):
            self._seen_incarnation(msg.broker_incarnation)
            fut, t0 = self._pings.get(msg.seq, (None, 0.0))
            if fut is not None and not fut.done():
                fut.set_result(time.perf_counter() - t0)
        elif isinstance(msg, p.QueryReply):
            fut = self._queries.get(msg.id)
            if fut is not None and not fut.done():
                fut.set_result(msg.data)

    def _direct_final(self, msg: p.Final, blobs: list) -> None:
        """A FINAL sent straight by a worker; the broker's copy comes later (or came first)."""
        job = self._jobs.get(msg.id)
        if job is None or not job.direct:
            self._unknown(msg.id)
        else:
            self.counters["direct_answers"] += 1
            if self._direct_jobs is not None:
                self._direct_jobs.learn(job.model, msg.jobs_to)
            self._finish(job, _job_result(msg, blobs))

    def _unknown(self, job_id: str) -> None:
        """An answer for a job we no longer track: expected once after our own CANCEL, and the
        second copy of a job answered directly."""
        if job_id in self._answered:
            return
        if self._cancelled.pop(job_id, None) is None:
            self.counters["unknown_job"] += 1
            log.warning("answer for unknown job %s dropped", job_id)

    def _seen_incarnation(self, inc: str) -> None:
        if self._incarnation is not None and inc != self._incarnation:
            log.warning("broker restarted (incarnation %s -> %s)", self._incarnation, inc)
            for job in list(self._jobs.values()):
                if job.accepted_inc is not None and job.accepted_inc != inc:
                    self._finish(job, ServerError("broker_restarted", "the broker restarted; the job was lost",
                                                  retryable=True, retry_after_ms=1000, job_id=job.id))
        self._incarnation = inc

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            _forget_before(self._cancelled, now - LATE_KEEP_S)
            _forget_before(self._answered, now - LATE_KEEP_S)
            heard = self._heard_t if self._heard_t is not None else self._started_t
            for job in list(self._jobs.values()):
                if now >= job.deadline:
                    self._finish(job, ServerError("deadline_exceeded", "no answer before the deadline", job_id=job.id))
                elif now - heard >= SILENCE_S and now - job.sent_t >= SILENCE_S:
                    self._finish(job, ServerError("broker_unavailable", f"broker silent for {now - heard:.1f}s",
                                                  retryable=True, retry_after_ms=1000, job_id=job.id))
                elif job.accepted_inc is None and not job.resent and now - job.sent_t >= RESEND_AFTER_S:
                    job.resent = True
                    self.counters["resends"] += 1
                    await self._try_send(job.frames)
            # until the broker is first heard from, ping often so `healthy` turns true quickly
            idle = PING_IDLE_S if self._heard_t is not None else 0.2
            if now - max(self._heard_t or 0.0, self._ping_t) >= idle:
                self._ping_t = now
                self._seq += 1
                await self._try_send(wire.encode(p.Ping(seq=self._seq)))

    async def _try_send(self, frames: list | None) -> None:
        if frames is None or self._sock is None:
            return
        try:
            await self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            pass   # not connected: the silence rule will tell


def _remember(ids: dict[str, float], job_id: str) -> None:
    """Note when `job_id` ended, keeping `ids` in that order (oldest first) for _forget_before."""
    ids.pop(job_id, None)
    ids[job_id] = time.monotonic()


def _forget_before(ids: dict[str, float], cutoff: float) -> None:
    """Drop the ids noted before `cutoff` (the oldest come first: _remember)."""
    while ids and next(iter(ids.values())) < cutoff:
        del ids[next(iter(ids))]


def _job_result(msg: p.Final, blobs: list) -> JobResult:
    return JobResult(msg.id, msg.result, msg.usage, msg.timings, msg.finish_reason,
                     [f.bytes if hasattr(f, "bytes") else bytes(f) for f in blobs])


class SyncJobHandle:
    """Blocking view of a JobHandle (see Client)."""

    def __init__(self, client: "Client", handle: JobHandle):
        self._c = client
        self._h = handle
        self.job_id = handle.job_id

    def result(self) -> JobResult:
        return self._c._call(self._h.result())

    def cancel(self, reason: str = "user") -> None:
        self._c._call(self._h.cancel(reason))

    def __iter__(self) -> Iterator[Any]:
        agen = self._h.__aiter__()
        while True:
            try:
                yield self._c._call(agen.__anext__())
            except StopAsyncIteration:
                return


class Client:
    """Blocking client: an AsyncClient on a private event loop in a daemon thread."""

    def __init__(self, endpoint: str, *, default_ttl_s: float = 120.0, finishing: bool = True,
                 direct_answers: bool = True, direct_jobs: bool = True):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vlm-client-loop", daemon=True)
        self._thread.start()
        self._async = AsyncClient(endpoint, default_ttl_s=default_ttl_s, finishing=finishing,
                                  direct_answers=direct_answers, direct_jobs=direct_jobs)
        self._call(self._async.start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def healthy(self) -> bool:
        return self._async.healthy

    @property
    def incarnation(self) -> str | None:
        return self._async.incarnation

    def submit(self, model: str, params: dict, blobs: Sequence[bytes] = (), **kw: Any) -> SyncJobHandle:
        return SyncJobHandle(self, self._call(self._async.submit(model, params, blobs, **kw)))

    def ground(self, model: str, image: bytes, instruction: str, **kw: Any) -> JobResult:
        return self._call(self._async.ground(model, image, instruction, **kw))

    def prefill(self, model: str, image: bytes, **kw: Any) -> JobResult:
        return self._call(self._async.prefill(model, image, **kw))

    def query(self, service: str, arg: dict | None = None, timeout_s: float = 5.0) -> dict:
        return self._call(self._async.query(service, arg, timeout_s))

    def models(self, model: str | None = None) -> list[dict]:
        return self._call(self._async.models(model))

    def load(self, model: str, timeout_s: float = 330) -> dict:
        return self._call(self._async.load(model, timeout_s))

    def unload(self, model: str, timeout_s: float = 60) -> dict:
        return self._call(self._async.unload(model, timeout_s))

    def stats(self) -> dict:
        return self._call(self._async.stats())

    def ping(self, timeout_s: float = 3.0) -> float:
        return self._call(self._async.ping(timeout_s))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
