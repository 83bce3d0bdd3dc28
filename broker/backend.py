"""The worker link: what READY, HEARTBEAT, RESULT, ERROR, MEMORY, LOADED, UNLOADED, DISCONNECT
and the supervisor's HOST mean for the broker's state, plus the per-job progress watchdog.

Part of the pure core (no sockets, no clock): the owner (`broker.core.Broker`) provides the
job table, registry, outbox and the one-answer rule (`finish`/`fail`); model state changes go
through `broker.lifecycle`. Times are the core's monotonic seconds.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from common import protocol as p
from common.errors import ERROR_CODES
from broker import events as e
from broker import scheduler as s
from broker.jobs import DISPATCHED, Job
from broker.registry import Worker

if TYPE_CHECKING:
    from broker.core import Broker

STALL_KILL_AFTER_S = 5.0       # watchdog: JobCancel, then ask the supervisor to kill after this
                               # (or after job_stall_s, when that is shorter)
UNKNOWN_PEER_REPEAT_S = 1.0    # at most one DISCONNECT per second to an unregistered peer
RETRYABLE_WORKER_CODES = frozenset({"overloaded", "model_unavailable", "broker_unavailable"})


class Backend:
    def __init__(self, broker: "Broker"):
        self.b = broker
        self._told_to_leave: dict[bytes, float] = {}   # unregistered peer -> last DISCONNECT sent

    def on_message(self, ev: e.WorkerMessage) -> None:
        msg, ident, now = ev.msg, ev.identity, ev.now
        if isinstance(msg, p.Host):
            return self._on_host(ident, msg, now)
        if isinstance(msg, p.Ready):
            return self._on_ready(ident, msg, now)
        w = self.b.registry.get(ident)
        if w is None:
            return self._from_unknown_peer(ident, msg, now)
        w.last_seen = now
        m = self.b.models[w.model_id]
        if isinstance(msg, p.Heartbeat):
            self._on_heartbeat(w, msg, now)
        elif isinstance(msg, p.Result):
            job = self._assigned(w, msg.id, final=True, now=now)
            if job is not None:
                m.learn_work(msg.peak_mem_job)
                m.last_used = now
                timings = dict(msg.timings)
                timings.setdefault("queue", round(((job.dispatched_at or now) - job.accepted_at) * 1000, 3))
                self.b.finish(job, p.Final(job.id, msg.result, msg.usage, msg.finish_reason, timings), ev.blobs)
        elif isinstance(msg, p.WorkerPartial):
            job = self._assigned(w, msg.id, final=False, now=now)
            if job is not None and job.stream:
                job.streamed = True
                self.b.emit(e.ToClient(job.client, p.Partial(job.id, msg.seq, msg.delta), ev.blobs))
        elif isinstance(msg, p.WorkerFinishing):
            self._on_finishing(w, msg)
        elif isinstance(msg, p.WorkerError):
            self._on_worker_error(w, msg, now)
        elif isinstance(msg, p.Memory):
            m.mem = dict(msg.mem)
            if msg.reason == "after_unload" and m.state == s.UNLOADING:
                self.b.lifecycle.on_unloaded(w, now)
        elif isinstance(msg, p.Loaded):
            if msg.model_id == w.model_id:
                self.b.lifecycle.on_loaded(w, msg, now)
        elif isinstance(msg, p.Unloaded):
            if msg.mem:
                m.mem = dict(msg.mem)
            self.b.lifecycle.on_unloaded(w, now)
        elif isinstance(msg, p.WorkerDisconnect):
            self.b.lose_worker(w, f"disconnected ({msg.reason})", now, crashed=False)

    def _on_ready(self, ident: bytes, msg: p.Ready, now: float) -> None:
        unit = self.b.models.get(msg.model_id)
        if unit is None or not unit.spec.enabled:
            self.b.emit(e.Log(logging.WARNING, "READY for a model that is not configured or enabled",
                              {"model": msg.model_id, "worker": msg.worker_uid}))
            return self._tell_to_leave(ident, f"model {msg.model_id!r} is not served by this broker", now)
        if not msg.proto_min <= p.PROTO_MINOR <= msg.proto_max:
            return self._tell_to_leave(ident, f"protocol {msg.proto_min}..{msg.proto_max} unsupported", now)
        for old in (self.b.registry.get(ident), self.b.registry.for_model(msg.model_id)):
            if old is not None:
                self.b.lose_worker(old, "replaced by a new READY", now)
        w = Worker.from_ready(ident, msg, now)
        self.b.registry.add(w, unit.device_key)
        self._told_to_leave.pop(ident, None)
        self.b.lifecycle.on_ready(w, msg, now)
        self.b.emit(e.Log(logging.INFO, "worker ready", {"model": w.model_id, "worker": w.uid, "pid": w.pid,
                                                          "state": msg.state, "slots": w.max_slots}))

    def _from_unknown_peer(self, ident: bytes, msg: p.Message, now: float) -> None:
        sup = self.b.registry.supervisors.get(ident)
        if sup is not None:
            sup.last_seen = now
            return
        if isinstance(msg, (p.Result, p.WorkerPartial)) or (isinstance(msg, p.WorkerError) and msg.id):
            self.b.count("zombie_results_dropped_total")
            self.b.emit(e.Log(logging.WARNING, "dropped a late answer from an unregistered worker",
                              {"job_id": getattr(msg, "id", None)}))
        if not isinstance(msg, p.WorkerDisconnect):
            self._tell_to_leave(ident, "unknown peer: reconnect and send READY", now)

    def _tell_to_leave(self, ident: bytes, reason: str, now: float) -> None:
        if now - self._told_to_leave.get(ident, -1e9) >= UNKNOWN_PEER_REPEAT_S:
            self._told_to_leave[ident] = now
            self.b.emit(e.ToWorker(ident, p.BrokerDisconnect(reason)))

    def _on_finishing(self, w: Worker, msg: p.WorkerFinishing) -> None:
        """Advisory: passed on for the jobs `w` holds whose clients asked; anything else (a job
        answered, cancelled or moved meanwhile, an id that is not a string) is dropped quietly."""
        for job_id in msg.ids:
            job = self.b.jobs.get(job_id) if isinstance(job_id, str) else None
            if job is not None and job.finishing and job.state == DISPATCHED and job.worker == w.identity:
                self.b.emit(e.ToClient(job.client, p.Finishing(job.id)))

    def _assigned(self, w: Worker, job_id: str, final: bool, now: float) -> Job | None:
        """The live job `job_id` if `w` is its assignee; otherwise the answer is late (a job we
        cancelled on it: dropped quietly) or a zombie's (another worker owns it: dropped, and the
        sender is disconnected so it re-registers)."""
        if job_id in w.cancelled:
            if final:
                del w.cancelled[job_id]
            self.b.count("late_results_dropped_total")
            return None
        job = self.b.jobs.get(job_id)
        if job is not None and job.state == DISPATCHED and job.worker == w.identity:
            return job
        if job is None:
            self.b.count("late_results_dropped_total")
            return None
        self.b.count("zombie_results_dropped_total")
        self.b.emit(e.ToWorker(w.identity, p.BrokerDisconnect("answer for a job assigned elsewhere")))
        self.b.lose_worker(w, "sent an answer for a job it does not hold", now)
        return None

    def _on_worker_error(self, w: Worker, msg: p.WorkerError, now: float) -> None:
        if msg.id is not None:
            job = self._assigned(w, msg.id, final=True, now=now)
            if job is not None:
                code = msg.code if msg.code in ERROR_CODES else "internal"
                message = msg.message
                if job.stalled_at is not None and code == "cancelled":
                    code = "deadline_exceeded"
                    message = f"no progress for {self.b.config.job_stall_s:g} s; stopped by the watchdog"
                self.b.fail(job, code, message, retryable=code in RETRYABLE_WORKER_CODES)
        else:
            m = self.b.models[w.model_id]
            if m.state == s.LOADING:
                code = msg.code if msg.code in ("load_failed", "insufficient_memory") else "load_failed"
                self.b.lifecycle.on_load_failed(m, code, msg.message, now)
            else:
                self.b.emit(e.Log(logging.WARNING, f"worker error: {msg.code}: {msg.message}",
                                  {"model": w.model_id, "worker": w.uid}))
        if msg.fatal and self.b.registry.get(w.identity) is w:
            self.b.lose_worker(w, f"fatal error ({msg.code})", now)

    def _on_heartbeat(self, w: Worker, msg: p.Heartbeat, now: float) -> None:
        w.state = msg.state
        if msg.mem:
            w.mem = dict(msg.mem)
            self.b.models[w.model_id].mem = dict(msg.mem)
        running = {x["id"]: x for x in msg.inflight if isinstance(x, dict) and isinstance(x.get("id"), str)}
        # A worker that declares `slot_reports` offers max_slots - held; 0 while it lists fewer
        # jobs than max_slots means it takes no more work (draining for shutdown, or slots held
        # by jobs of an old connection). A full worker also says 0: not a refusal, our own count
        # covers it. Peers without the capability may send 0 meaning "not reported".
        w.running = list(running)
        w.waiting = {j for j, x in running.items() if x.get("state") == "waiting"}
        was_closed = w.closed
        w.closed = (w.capabilities.get("slot_reports") is True and msg.free_slots <= 0
                    and len(running) < w.max_slots)
        if w.closed != was_closed:
            self.b.emit(e.Log(logging.INFO, "worker takes no new jobs" if w.closed else "worker takes jobs again",
                              {"model": w.model_id, "worker": w.uid}))
        grace = self.b.config.heartbeat_interval_ms / 1000
        for job_id, since in list(w.cancelled.items()):
            if job_id not in running and now - since > grace:
                del w.cancelled[job_id]     # it stopped without answering: the slot is free again
        stall_ms = self.b.config.job_stall_s * 1000
        for job_id, info in running.items():
            job = self.b.jobs.get(job_id)
            progress = info.get("last_progress_ms_ago")
            if (job is not None and job.worker == w.identity and job.stalled_at is None
                    and job_id not in w.waiting and isinstance(progress, (int, float)) and progress > stall_ms):
                job.stalled_at = now
                self.b.count("watchdog_cancels_total")
                self.b.emit(e.ToWorker(w.identity, p.JobCancel(job_id)))
                self.b.emit(e.Log(logging.WARNING, "job stalled: cancelling",
                                  {"job_id": job_id, "model": w.model_id, "worker": w.uid}))

    def _on_host(self, ident: bytes, msg: p.Host, now: float) -> None:
        self.b.registry.supervisor_report(ident, msg, now)
        gone = {pid for pid in msg.exited if isinstance(pid, int)}
        gone |= {x["pid"] for x in msg.workers if isinstance(x, dict) and x.get("state") == "exited"
                 and isinstance(x.get("pid"), int)}
        for pid in gone:
            w = self.b.registry.by_pid(pid, msg.host)
            if w is not None:
                self.b.lose_worker(w, "process exited (supervisor report)", now)

    def on_bad(self, ev: e.WorkerBadMessage) -> None:
        self.b.count("decode_errors_total.worker")
        w = self.b.registry.get(ev.identity)
        self.b.emit(e.Log(logging.WARNING, f"bad message from a worker: {ev.error}",
                          {"worker": w.uid if w else ev.identity.hex()}))
        job = self.b.jobs.get(ev.error.job_id) if ev.error.job_id else None
        if w is not None and job is not None and job.worker == w.identity:
            # most likely its answer to this job: the client must not wait for the deadline
            self.b.fail(job, "internal", f"the worker sent a malformed answer ({ev.error.reason})")

    def tick(self, now: float) -> None:
        """Watchdog escalation: a stalled job still unanswered after its cancel -> kill the worker."""
        for ident in [i for i, t in self._told_to_leave.items() if now - t > 10 * UNKNOWN_PEER_REPEAT_S]:
            del self._told_to_leave[ident]
        for job in self.b.jobs:
            if (job.stalled_at is not None and not job.kill_sent and job.state == DISPATCHED
                    and now - job.stalled_at >= min(STALL_KILL_AFTER_S, self.b.config.job_stall_s)):
                w = self.b.registry.get(job.worker) if job.worker else None
                if w is not None:
                    job.kill_sent = True
                    self.b.count("watchdog_kills_total")
                    self.b.lifecycle.doom(w, f"job {job.id} stalled and ignored its cancel", now)
