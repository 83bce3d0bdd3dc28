"""The worker's compute side: the preprocessing thread and the compute (main) thread.

A job normally goes control -> prep thread (from_job + engine.prepare) -> compute; when both are
idle, control hands it to compute directly and compute prepares it inline (nothing to overlap).
A client's direct copy of a job goes to compute too, which prepares it and then waits for the
broker's JOB before running it (workers/direct_jobs.py).

Both answer through their own inproc PUSH socket to the control thread, which owns the DEALER.
Frames pushed: [tag, *wire frames] where tag is b"j" + the ticket's seq for a job's answer (so the
control thread can drop answers of an old connection), b"" for model-level messages, or DONE/EXIT tags.
All times are `time.monotonic()` seconds; timings in answers are milliseconds.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from common import protocol as p
from common import wire
from workers.direct_answers import DirectAnswers
from workers.direct_jobs import WAIT_S, EarlyGate
from workers.engine import GroundingRequest, GroundingResult, JobError

if TYPE_CHECKING:
    from workers.worker import Worker

log = logging.getLogger(__name__)

DONE_TAG = b"!done"   # compute finished its shutdown; the control thread says goodbye
EXIT_TAG = b"!exit"   # compute asks for shutdown (UNLOAD then=exit)


@dataclass(eq=False)
class Ticket:
    """One job inside the worker. `seq` (unique per process) tags its answer, so a job id sent
    again on a new connection gets a new ticket while the old one may still be computing.
    `cancelled` is set by the control thread (JobCancel, reconnect, shutdown) and read by
    prep/compute; the timing fields are written by prep/compute and read by the control thread
    for heartbeats (attribute writes are atomic under the GIL)."""
    id: str
    params: dict
    blobs: list | None
    gen: int              # connection generation that received it
    recv_t: float
    deadline: float
    seq: int = 0
    cancelled: bool = False
    progress_t: float = 0.0
    prep_start: float = 0.0
    prep_end: float = 0.0
    fwd_start: float = 0.0
    prepared: Any = None
    answer_to: str | None = None   # the client's endpoint for a direct FINAL (workers/direct_answers.py)
    gate: EarlyGate | None = None  # a client's direct copy, until its JOB comes (workers/direct_jobs.py)
    early_ms: float = 0.0          # a confirmed copy: how long before its JOB it came
    answered_direct: bool = False  # its FINAL went straight to the client: it holds compute no more


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class Compute:
    def __init__(self, worker: "Worker", push: zmq.Socket, direct: DirectAnswers):
        self.w = worker
        self.engine = worker.engine
        self.push = push   # compute thread's own socket; prep_loop gets its own
        self.direct = direct   # compute thread's own sockets to clients
        self.loaded = False   # compute's own truth (w.state also moves on the control thread)
        self.idle = False     # blocked waiting for work (read by the control thread)
        self.prep_busy: set[str] = set()   # names of preprocessing threads at work (set ops are atomic)

    # ---- preprocessing thread --------------------------------------------------------------------

    @property
    def prep_idle(self) -> bool:
        return not self.prep_busy

    def prep_loop(self, prep_q: queue.SimpleQueue, push: zmq.Socket) -> None:
        """One of the preprocessing threads (decode and resize release the GIL, so several of them
        keep a batch of large screenshots from queueing behind each other)."""
        name = threading.current_thread().name
        while True:
            self.prep_busy.discard(name)
            t = prep_q.get()
            self.prep_busy.add(name)
            if t is None:
                return
            if self.prepare(t, push):
                self.w._work_q.put(t)

    def prepare(self, t: Ticket, push: zmq.Socket) -> bool:
        """Validate and preprocess one job; False if it was answered (cancelled or an error)."""
        if t.cancelled:
            _answer(push, t, p.WorkerError(id=t.id, code="cancelled", message="cancelled before it started"))
            return False
        t.prep_start = t.progress_t = time.monotonic()
        try:
            request = GroundingRequest.from_job(t.id, t.params, t.blobs or [])
            t.prepared = self.engine.prepare(request)
        except JobError as exc:
            _answer(push, t, p.WorkerError(id=t.id, code=exc.code, message=exc.message))
            return False
        except Exception as exc:
            log.exception("prepare failed", extra={"ctx": {"job_id": t.id}})
            _answer(push, t, p.WorkerError(id=t.id, code="internal",
                                           message=f"preprocessing failed: {type(exc).__name__}: {exc}"))
            return False
        finally:
            t.blobs = None   # the image bytes are no longer needed; free them early
        t.prep_end = t.progress_t = time.monotonic()
        return True

    # ---- compute thread (main thread) -----------------------------------------------------------

    def loop(self, work_q: queue.SimpleQueue) -> None:
        """Commands and prepared jobs in arrival order; returns after ("shutdown",)."""
        max_batch = max(1, int(self.engine.max_batch))
        while True:
            self.idle = True
            item = work_q.get()
            self.idle = False
            pending = None
            if isinstance(item, Ticket):
                batch = [item]
                while len(batch) < max_batch:
                    try:
                        nxt = work_q.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(nxt, Ticket):
                        batch.append(nxt)
                    else:
                        pending = nxt   # a command: handled right after this batch
                        break
                # jobs handed over directly (nothing to overlap with) are prepared here
                batch = [t for t in batch if t.prep_end or self.prepare(t, self.push)]
                batch = [t for t in batch if t.gate is None or self._confirmed(t)]
                if batch:
                    self.run_batch(batch)
                item = pending
            if item is not None and self.command(item):
                return

    def _confirmed(self, t: Ticket) -> bool:
        """A direct copy, prepared: wait for its JOB; released unanswered if none comes."""
        assert t.gate is not None
        if t.gate.wait(WAIT_S) or not t.gate.drop():
            return True
        t.prepared = None
        _release(self.push, t)
        return False

    def command(self, cmd: tuple) -> bool:
        """Load / unload / shutdown; True when the loop must end."""
        if cmd[0] == "load":
            self.load()
        elif cmd[0] == "unload":
            self.unload()
            if cmd[1].then == "exit":
                self.push.send_multipart([EXIT_TAG])
        elif cmd[0] == "shutdown":
            if self.loaded:
                self.unload()
            self.push.send_multipart([DONE_TAG])
            return True
        return False

    def load(self) -> None:
        w = self.w
        if self.loaded:   # a LOAD queued twice
            self._model_msg(p.Loaded(model_id=w.s.model_id, weights_bytes=w.weights_bytes,
                                     load_seconds=w.load_seconds, mem=dict(w.mem)))
            return
        w.state = "loading"
        try:
            report = self.engine.load()
        except Exception as exc:
            log.exception("load failed")
            w.state = "empty"
            self._model_msg(p.WorkerError(id=None, code="load_failed",
                                          message=f"loading {w.s.model_id!r} failed: {type(exc).__name__}: {exc}"))
            return
        w.weights_bytes, w.load_seconds = int(report.weights_bytes), float(report.load_seconds)
        w.mem = self.engine.memory().to_wire()
        w.state, self.loaded = "loaded", True
        log.info("loaded %s in %.2fs (%d bytes)", w.s.model_id, w.load_seconds, w.weights_bytes)
        self._model_msg(p.Loaded(model_id=w.s.model_id, weights_bytes=w.weights_bytes,
                                 load_seconds=w.load_seconds, mem=dict(w.mem)))
        self._model_msg(p.Memory(mem=dict(w.mem), reason="after_load"))

    def unload(self) -> None:
        w = self.w
        if not self.loaded:    # the load it followed failed, or an UNLOAD queued twice
            self._model_msg(p.Unloaded(model_id=w.s.model_id, released_bytes=0, mem=dict(w.mem)))
            return
        before = self.engine.memory()
        try:
            self.engine.unload()
        except Exception:
            log.exception("unload failed")   # state becomes empty anyway; process exit frees the rest
        after = self.engine.memory()
        w.mem = after.to_wire()
        w.state, w.weights_bytes, self.loaded = "empty", 0, False
        self._model_msg(p.Unloaded(model_id=w.s.model_id, released_bytes=max(0, before.active - after.active),
                                   mem=dict(w.mem)))
        self._model_msg(p.Memory(mem=dict(w.mem), reason="after_unload"))

    def run_batch(self, batch: list[Ticket]) -> None:
        now = time.monotonic()
        live = []
        for t in batch:
            if t.cancelled:
                self._job_msg(t, p.WorkerError(id=t.id, code="cancelled", message="cancelled before it ran"))
            elif now > t.deadline:
                self._job_msg(t, p.WorkerError(id=t.id, code="deadline_exceeded", message="deadline passed in the worker queue"))
            elif not self.loaded:
                self._job_msg(t, p.WorkerError(id=t.id, code="model_unavailable", message="model is not loaded"))
            else:
                t.fwd_start = t.progress_t = now
                live.append(t)
        if not live:
            return
        warned: list[float] = []    # when FINISHING went out

        def near_end() -> None:
            if not warned:          # once per batch, should an engine call it twice
                warned.append(time.monotonic())
                self.push.send_multipart([b"", *wire.encode(p.WorkerFinishing(ids=[t.id for t in live]))])

        try:
            self.engine.reset_peak()
            outs = self.engine.run([t.prepared for t in live], near_end if self.w.s.finishing else None)
            if len(outs) != len(live):
                raise RuntimeError(f"engine returned {len(outs)} results for {len(live)} jobs")
        except JobError as exc:
            outs = [exc] * len(live)
        except Exception as exc:
            log.exception("engine.run failed for a batch of %d", len(live))
            outs = [JobError("internal", f"{type(exc).__name__}: {exc}")] * len(live)
        end = time.monotonic()
        mem = None      # the memory report comes after the answers (a split's waits for its helpers)
        for t, out in zip(live, outs):
            t.prepared = None
            if isinstance(out, JobError):
                self._job_msg(t, p.WorkerError(id=t.id, code=out.code, message=out.message))
            elif t.cancelled:
                self._job_msg(t, p.WorkerError(id=t.id, code="cancelled", message="cancelled while running"))
            elif isinstance(out, GroundingResult):
                result, usage, blobs = out.to_wire()
                # the engine's own (head, postprocess, ...) to the µs, as ours below
                timings = {k: round(v, 3) if isinstance(v, float) else v for k, v in out.timings.items()}
                timings.update(queue=_ms((t.prep_start - t.recv_t) + (t.fwd_start - t.prep_end)),
                               preprocess=_ms(t.prep_end - t.prep_start), forward=_ms(end - t.fwd_start),
                               total=_ms(end - t.recv_t), batch=len(live))
                if t.gate is not None:   # its total counts from the direct copy
                    timings["early"] = round(t.early_ms, 3)
                if warned:          # how long before the forward's end FINISHING went out
                    timings["finishing"] = _ms(end - warned[0])
                if t.answer_to:     # first, straight to the client; then the broker's copy
                    t.answered_direct = True   # before the client can have it (and send the next job)
                    self.direct.send(t.answer_to, p.Final(id=t.id, result=result, usage=usage, timings=timings,
                                                          jobs_to=self.w.jobs_to), blobs)
                if not out.peak_mem and mem is None:
                    mem = self._memory()
                self._job_msg(t, p.Result(id=t.id, result=result, usage=usage, finish_reason="stop",
                                          peak_mem_job=int(out.peak_mem or (mem.peak if mem else 0)),
                                          timings=timings), blobs)
            else:
                self._job_msg(t, p.WorkerError(id=t.id, code="internal",
                                               message=f"engine returned {type(out).__name__}"))
        mem = mem or self._memory()
        if mem is not None:
            self.w.mem = mem.to_wire()

    def _memory(self):
        """The engine's memory report, or None (logged) if it fails."""
        try:
            return self.engine.memory()
        except Exception:
            log.exception("engine.memory failed")
            return None

    def _job_msg(self, t: Ticket, msg: p.Message, blobs: list | tuple = ()) -> None:
        _answer(self.push, t, msg, blobs)

    def _model_msg(self, msg: p.Message) -> None:
        self.push.send_multipart([b"", *wire.encode(msg)])


def _answer(push: zmq.Socket, t: Ticket, msg: p.Message, blobs: list | tuple = ()) -> None:
    if t.gate is not None and t.gate.drop():   # a direct copy its JOB did not confirm: no answer
        _release(push, t)
    else:
        push.send_multipart([b"j%d" % t.seq, *wire.encode(msg, blobs)], copy=False)


def _release(push: zmq.Socket, t: Ticket) -> None:
    """Hand back an unconfirmed direct copy's slot: its tag alone."""
    push.send_multipart([b"j%d" % t.seq])
