"""The broker core: a pure state machine. `Broker.handle(event) -> [commands]`.

No sockets, no clock reads, no randomness: the shell (broker/server.py) feeds events stamped
with its monotonic clock and executes the commands. Job rules live here; what worker-link
messages mean in broker/backend.py; model load/unload rules in broker/lifecycle.py; memory
arithmetic in broker/scheduler.py; which replica gets a job in broker/placement.py; status replies
in broker/status.py.
Every accepted job gets exactly one answer (FINAL or ERROR), sent by `finish`; a client that
vanished (EHOSTUNREACH) gets none.
"""
from __future__ import annotations

import logging
from collections import Counter

from common import protocol as p
from common.config import BrokerConfig, ModelSpec, units_of
from broker import events as e
from broker import scheduler as s
from broker import status
from broker.jobs import DISPATCHED, Job, JobTable, PoisonList, job_digest
from broker.backend import Backend
from broker.lifecycle import Lifecycle
from broker.placement import Placement
from broker.registry import Registry, Worker

MAX_JOB_ID = 256


class Broker:
    def __init__(self, config: BrokerConfig, models: dict[str, ModelSpec], incarnation: str, *,
                 wall_offset: float = 0.0, started_at: float | None = None):
        """`wall_offset`: unix time minus the shell's monotonic clock, for reported times."""
        self.config = config
        self.specs = dict(models)             # the model ids clients ask for
        self.incarnation = incarnation
        self.wall_offset = wall_offset
        self.started_at = started_at
        self.jobs = JobTable()
        self.registry = Registry()
        self.poison = PoisonList(config.poison_ttl_s)
        self.counters: Counter[str] = Counter()
        # One state per unit (a model, or each replica of a model with `devices`), by unit id;
        # jobs queue per model id and go to any loaded unit of that model.
        self.models = {u.id: s.ModelState(u.id, u.spec, i, group=u.model_id, device=u.device,
                                      helpers=u.helpers)
                       for i, u in enumerate(units_of(self.specs))}
        self.groups: dict[str, list[s.ModelState]] = {}
        for m in self.models.values():
            self.groups.setdefault(m.group, []).append(m)
        self.lifecycle = Lifecycle(self)
        self.placement = Placement()
        self.shutting_down = False
        self._drained_logged = False
        self._out: list[e.Command] = []
        self._next_heartbeat = 0.0
        self._heartbeat_seq = 0
        self.backend = Backend(self)
        self._handlers = {e.ClientMessage: self._on_client, e.ClientBadMessage: self._on_client_bad,
                          e.WorkerMessage: self.backend.on_message, e.WorkerBadMessage: self.backend.on_bad,
                          e.SendFailed: self._on_send_failed, e.Tick: self._on_tick,
                          e.Shutdown: self._on_shutdown}

    # ---- public --------------------------------------------------------------------------------

    def handle(self, event: e.Event) -> list[e.Command]:
        if self.started_at is None:
            self.started_at = event.now
        self._handlers[type(event)](event)
        self._pump(event.now)
        out, self._out = self._out, []
        return out

    @property
    def drained(self) -> bool:
        """Shutting down and no accepted job is left without its answer."""
        return self.shutting_down and len(self.jobs) == 0

    def devices(self) -> list[int]:
        """The devices whose memory the units use (0 alone unless models have `devices`)."""
        return sorted({m.device_key for m in self.models.values()})

    def budget(self, device: int | None = None) -> int | None:
        """One device's memory budget; without `device`, all devices' together (None: unknown)."""
        if device is None:
            known = [b for b in map(self.budget, self.devices()) if b is not None]
            return sum(known) if known else None
        total = self.registry.device_totals.get(device) or self.registry.device_total
        return s.budget_bytes(self.config.memory_budget, total, self.registry.host_total)

    def committed(self, device: int | None = None) -> int:
        return s.committed(m for m in self.models.values() if device is None or m.device_key == device)

    # ---- used by backend and lifecycle ----------------------------------------------------------------------

    def emit(self, cmd: e.Command) -> None:
        self._out.append(cmd)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def fail(self, job: Job, code: str, message: str, retryable: bool = False) -> None:
        self.finish(job, p.Error(job.id, code, message, retryable,
                                  self.config.retry_after_ms if retryable else None))

    def lose_worker(self, w: Worker, reason: str, now: float, crashed: bool = True) -> None:
        """The one place a worker leaves: its memory counts as released, its live jobs are retried
        (nothing streamed yet) or failed; a job that was running when two workers died is poison.
        `crashed=False` (an orderly DISCONNECT) requeues without counting toward poison."""
        if self.registry.remove(w.identity) is None:
            return
        self.count("workers_lost_total")
        self.emit(e.Log(logging.WARNING, f"worker lost: {reason}",
                        {"model": w.model_id, "worker": w.uid, "pid": w.pid, "jobs": len(w.live)}))
        self.lifecycle.on_worker_gone(w, now)
        retry = []
        for job_id in w.live:
            job = self.jobs.get(job_id)
            if job is None or job.worker != w.identity:
                continue
            # a job its last heartbeat showed waiting behind others did not kill the worker
            job.deaths += crashed and job_id not in w.waiting
            if job.deaths >= 2:
                self.count("poison_requests_total")
                self.poison.add(job_digest(job.model, job.params, job.blobs), now)
                self.fail(job, "worker_crash_poison", "the request was running when two workers died")
            elif job.streamed:
                self.fail(job, "worker_lost", f"the worker was lost after the answer started ({reason})")
            else:                               # a retried job dying again is poison, above
                retry.append(job)
        for job in reversed(retry):
            job.attempt += 1
            self.jobs.enqueue(job, head=True)
            self.count("retries_total")

    # ---- answers ---------------------------------------------------------------------------------

    def finish(self, job: Job, msg: p.Message, blobs=()) -> None:
        """Send the job's one terminal answer and forget it."""
        self.jobs.remove(job)
        if job.state == DISPATCHED and job.worker is not None:
            w = self.registry.get(job.worker)
            if w is not None:
                w.live.pop(job.id, None)
        self.emit(e.ToClient(job.client, msg, blobs))
        if isinstance(msg, p.Error):
            self.count(f"errors_total.{msg.code}")
            if msg.code not in ("cancelled",):
                self.emit(e.Log(logging.INFO, f"job failed: {msg.code}: {msg.message}",
                                {"job_id": job.id, "model": job.model}))
        else:
            self.count("jobs_completed_total")

    def _abandon(self, job: Job, now: float) -> None:
        """Stop a dispatched job whose client needs no more from it; its slot stays taken until
        the worker answers (or a heartbeat stops listing it)."""
        if job.state == DISPATCHED and job.worker is not None:
            w = self.registry.get(job.worker)
            if w is not None and job.id in w.live:
                del w.live[job.id]
                w.cancelled[job.id] = now
                self.emit(e.ToWorker(w.identity, p.JobCancel(job.id)))

    def _client_error(self, client: bytes, ref: str | None, code: str, message: str,
                      retryable: bool = False) -> None:
        self.count(f"errors_total.{code}")
        self.emit(e.ToClient(client, p.Error(ref, code, message, retryable,
                                             self.config.retry_after_ms if retryable else None)))

    # ---- client side -----------------------------------------------------------------------------

    def _on_client(self, ev: e.ClientMessage) -> None:
        msg = ev.msg
        if isinstance(msg, p.Submit):
            self._submit(ev.identity, msg, ev.blobs, ev.now)
        elif isinstance(msg, p.Cancel):
            job = self.jobs.get(msg.id)
            if job is not None and job.client == ev.identity:
                self.count("cancels_total")
                self._abandon(job, ev.now)
                self.fail(job, "cancelled", f"cancelled by the client ({msg.reason})")
        elif isinstance(msg, p.Query):
            self._query(ev.identity, msg, ev.now)
        elif isinstance(msg, p.Ping):
            self.emit(e.ToClient(ev.identity, p.Pong(msg.seq, self.incarnation)))

    def _submit(self, client: bytes, msg: p.Submit, blobs: list, now: float) -> None:
        self.count("jobs_submitted_total")
        cfg = self.config
        existing = self.jobs.get(msg.id)
        if existing is not None:
            if existing.client == client:      # a resent SUBMIT (no ACCEPTED seen): ack again
                self.count("duplicate_submits_total")
                self.emit(e.ToClient(client, p.Accepted(msg.id, self.jobs.position(existing), self.incarnation)))
            else:
                self._client_error(client, msg.id, "bad_request", "job id already in use by another client")
            return
        spec = self.specs.get(msg.model)
        if not msg.id or len(msg.id) > MAX_JOB_ID:
            return self._client_error(client, msg.id or None, "bad_request", f"job id must be 1..{MAX_JOB_ID} characters")
        if spec is None or not spec.enabled:
            why = "is disabled" if spec is not None else "does not exist"
            return self._client_error(client, msg.id, "unknown_model", f"model {msg.model!r} {why}")
        if msg.ttl_ms <= 0:
            return self._client_error(client, msg.id, "bad_request", "ttl_ms must be > 0")
        if msg.answer_to is not None and not (p.direct_endpoint_ok(msg.answer_to) and msg.answer_host
                                              and len(msg.answer_host) <= p.MAX_DIRECT_ENDPOINT):
            return self._client_error(client, msg.id, "bad_request",
                                      "answer_to must be a loopback tcp:// or an ipc:// endpoint, with answer_host")
        if msg.blob_meta and len(msg.blob_meta) != len(blobs):
            return self._client_error(client, msg.id, "bad_request",
                                      f"blob_meta describes {len(msg.blob_meta)} blobs, {len(blobs)} were sent")
        if self.shutting_down:
            self.count("dropped_total.overloaded")
            return self._client_error(client, msg.id, "overloaded", "the broker is shutting down", retryable=True)
        if self.jobs.queue_depth(msg.model) >= cfg.queue_size or self.jobs.queued_total >= cfg.global_queue_size:
            self.count("dropped_total.overloaded")
            which = "model" if self.jobs.queue_depth(msg.model) >= cfg.queue_size else "global"
            return self._client_error(client, msg.id, "overloaded", f"the {which} queue is full", retryable=True)
        if self.poison and job_digest(msg.model, msg.params, blobs) in self.poison:
            return self._client_error(client, msg.id, "worker_crash_poison",
                                      "an identical request recently crashed two workers")
        job = Job(id=msg.id, client=client, model=msg.model, params=msg.params, blobs=list(blobs),
                  blob_meta=msg.blob_meta, stream=msg.stream, accepted_at=now, deadline=now + msg.ttl_ms / 1000,
                  finishing=msg.finishing, answer_to=msg.answer_to, answer_host=msg.answer_host,
                  direct_to=msg.direct_to)
        pos = self.jobs.add(job)
        self.count("jobs_accepted_total")
        self.emit(e.ToClient(client, p.Accepted(msg.id, pos, self.incarnation)))

    def _query(self, client: bytes, q: p.Query, now: float) -> None:
        if q.service == p.Q_STATS:
            self.emit(e.ToClient(client, p.QueryReply(q.id, status.stats(self, now))))
            return
        if q.service not in p.QUERY_SERVICES:
            return self._client_error(client, q.id, "bad_request", f"unknown service {q.service!r}")
        mid = q.arg.get("model")
        if mid is not None and not isinstance(mid, str):
            return self._client_error(client, q.id, "bad_request", "arg.model must be a string")
        if q.service == p.Q_MODELS and mid is None:
            reply = [status.group_status(self, g) for g in self.groups]
            self.emit(e.ToClient(client, p.QueryReply(q.id, {"models": reply})))
            return
        if mid is None:
            return self._client_error(client, q.id, "bad_request", f"{q.service} needs arg.model")
        spec = self.specs.get(mid)
        if spec is None or (q.service == p.Q_LOAD and not spec.enabled):
            return self._client_error(client, q.id, "unknown_model", f"model {mid!r} is not configured or disabled")
        if q.service == p.Q_MODELS:
            self.emit(e.ToClient(client, p.QueryReply(q.id, {"models": [status.group_status(self, mid)]})))
        elif q.service == p.Q_LOAD:
            if self.shutting_down:
                return self._client_error(client, q.id, "overloaded", "the broker is shutting down", retryable=True)
            self.lifecycle.query_load(client, q.id, mid, now)
        else:
            self.lifecycle.query_unload(client, q.id, mid, now)

    def _on_client_bad(self, ev: e.ClientBadMessage) -> None:
        self.count("decode_errors_total.client")
        self._client_error(ev.identity, ev.error.job_id, "bad_request", str(ev.error))

    # ---- both sides --------------------------------------------------------------------------------

    def _on_send_failed(self, ev: e.SendFailed) -> None:
        self.count(f"send_failed_total.{ev.side}")
        if ev.side == e.CLIENT:
            self.lifecycle.forget_client(ev.identity)
            for job in self.jobs.of_client(ev.identity):
                self.count("dropped_total.ehostunreach")
                self._abandon(job, ev.now)
                self.jobs.remove(job)      # nobody left to answer
            return
        w = self.registry.get(ev.identity)
        if w is not None:
            self.lose_worker(w, "unreachable (EHOSTUNREACH)", ev.now)
        self.registry.supervisors.pop(ev.identity, None)

    def _on_tick(self, ev: e.Tick) -> None:
        now, cfg = ev.now, self.config
        for job in self.jobs:
            if job.deadline <= now:
                self._abandon(job, now)
                self.count("dropped_total.expired")
                self.fail(job, "deadline_exceeded", f"deadline passed while {job.state}")
        liveness_s = cfg.heartbeat_interval_ms * cfg.heartbeat_liveness / 1000
        for w in self.registry.silent(now, liveness_s):
            self.lose_worker(w, f"no heartbeat for {liveness_s:g} s", now)
        self.registry.forget_silent_supervisors(now, max(10.0, 3 * liveness_s))
        self.backend.tick(now)
        self.lifecycle.tick(now)
        self.poison.purge(now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + cfg.heartbeat_interval_ms / 1000
            self._heartbeat_seq += 1
            hb = p.BrokerHeartbeat(self._heartbeat_seq, self.incarnation)
            for ident in [*self.registry.workers, *self.registry.supervisors]:
                self.emit(e.ToWorker(ident, hb))

    def _on_shutdown(self, ev: e.Shutdown) -> None:
        if not self.shutting_down:
            self.shutting_down = True
            self.emit(e.Log(logging.INFO, "shutting down: refusing new jobs, finishing accepted ones",
                            {"jobs": len(self.jobs)}))
        if ev.force:
            for job in self.jobs:
                self._abandon(job, ev.now)
                self.fail(job, "broker_unavailable", "the broker stopped before the job finished", retryable=True)
            self.lifecycle.fail_all_waiters("broker_unavailable", "the broker is stopping")

    # ---- dispatch ------------------------------------------------------------------------------------

    def _pump(self, now: float) -> None:
        """After every event: model decisions, then credit-based dispatch of queued jobs."""
        self.lifecycle.reconcile(now)
        if self.jobs.queued_total:
            for group, units in self.groups.items():
                if self.jobs.queue_depth(group):
                    self._dispatch(group, units, now)
        if self.drained and not self._drained_logged:
            self._drained_logged = True
            self.emit(e.Log(logging.INFO, "drained: every accepted job has its answer"))

    def _dispatch(self, group: str, units: list[s.ModelState], now: float) -> None:
        """Queued jobs of a model, in order, each to a loaded unit with a free slot: the model's
        one worker, or the replica broker.placement chooses."""
        while self.jobs.queue_depth(group):
            ready = [(m, w) for m in units if m.state == s.LOADED
                     and (w := self.registry.for_model(m.id)) is not None and w.free_slots > 0]
            if not ready:
                return
            m, w = self.placement.choose(self.jobs.queue(group)[0], ready) if len(units) > 1 else ready[0]
            job = self.jobs.pop_next(group)
            job.state, job.worker, job.dispatched_at = DISPATCHED, w.identity, now
            w.live[job.id] = None
            m.last_used = now
            self.emit(e.ToWorker(w.identity, p.Job(job.id, job.params, job.remaining_ms(now), job.attempt,
                                                   job.blob_meta, job.answer_to, job.answer_host), job.blobs))
