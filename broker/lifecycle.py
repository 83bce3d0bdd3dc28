"""Model lifecycle: when to send LOAD and UNLOAD, and what the worker's answers mean.

States (common.protocol.MODEL_STATES): unloaded -> loading -> loaded -> [draining ->] unloading
-> unloaded; a failed load ends in `failed` (retried on the next demand). Rules, each in one place:
- demand: queued jobs, mmi.load waiters, or preload (at READY, within budget, never evicting);
- one LOAD at a time per model (only from unloaded/failed, with a usable worker);
- room: scheduler.plan_load; demands are served oldest first and a demand waiting for room keeps
  later ones from taking it; eviction = UNLOAD idle victims, drain busy ones (UNLOAD at idle);
- memory is released only by the worker's report or its departure (scheduler docstring);
- timeouts: load -> load_failed + kill; unload -> UNLOAD(then=exit), then kill.
States, loads and evictions are per unit (a model, or each replica of a model with `devices`, each
on its own device's budget). What clients see is per model: mmi.load answers once any unit is
loaded (and loads the others too), mmi.unload once every unit is unloaded, and a failed load fails
the model's queued jobs only when no other unit is loaded or loading.
The owner (`broker.core.Broker`) provides the job table, registry, outbox and job answers.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from common import protocol as p
from broker import scheduler as s
from broker.events import Log, ToClient, ToWorker
from broker.registry import Worker
from broker.scheduler import ModelState
from broker.status import group_status

if TYPE_CHECKING:
    from broker.core import Broker

DOOMED_GRACE_S = 10.0   # a worker we asked the supervisor to kill is dropped after this anyway
PRELOAD_WAIT_S = 10.0   # after start, a preload waits this long for earlier models' workers
UNLOAD_REPLY_S = 55.0   # mmi.unload waiters get the current status by then (clients wait 60 s)
# A replica whose load failed while another replica serves tries again after this, doubled for
# each failure in a row (a broken or full GPU would otherwise be reloaded at every new request,
# each time reading the whole checkpoint), up to the cap.
REPLICA_RETRY_S = 5.0
REPLICA_RETRY_MAX_S = 300.0


class Lifecycle:
    def __init__(self, broker: "Broker"):
        self.b = broker
        self.models: dict[str, ModelState] = broker.models
        # by model id (a unit's `group`): (client, query id, since)
        self.load_waiters: dict[str, list[tuple[bytes, str, float]]] = {}
        self.unload_waiters: dict[str, list[tuple[bytes, str, float]]] = {}
        self.preload_at: dict[str, float] = {}
        self.doomed_at: dict[bytes, float] = {}
        self.promised: str | None = None    # the model an eviction made room for: first claim on it
        self.seen: set[str] = set()         # models whose worker has registered at least once
        self.making_room: set[str] = set()  # units whose load waits for memory being freed (last reconcile)

    # ---- helpers -------------------------------------------------------------------------------

    def _worker(self, m: ModelState) -> Worker | None:
        return self.b.registry.for_model(m.id)

    def _is_busy(self, m: ModelState) -> bool:
        w = self._worker(m)
        return w is not None and w.busy > 0

    def _log(self, level: int, text: str, m: ModelState, **ctx) -> None:
        self.b.emit(Log(level, text, {"model": m.id, **ctx}))

    def _units(self, group: str) -> list[ModelState]:
        return self.b.groups[group]

    def _others_serve(self, m: ModelState) -> bool:
        """Another unit of m's model is loaded, loading or waiting for memory to be freed for its
        load: the model's waiters and queued jobs wait for it rather than share m's failure."""
        return any(u is not m and (u.state in (s.LOADED, s.LOADING) or u.id in self.making_room)
                   for u in self._units(m.group))

    def _all_unloaded(self, group: str) -> bool:
        return all(u.state in (s.UNLOADED, s.FAILED) and u.charge == 0 for u in self._units(group))

    def _reply_waiters(self, waiters: dict, group: str, code: str | None = None,
                       message: str = "", retryable: bool = False) -> None:
        for client, qid, _ in waiters.pop(group, []):
            if code is None:
                self.b.emit(ToClient(client, p.QueryReply(qid, group_status(self.b, group))))
            else:
                self.b.emit(ToClient(client, p.Error(qid, code, message, retryable,
                                                     self.b.config.retry_after_ms if retryable else None)))

    def _set(self, m: ModelState, state: str, now: float) -> None:
        m.state, m.since = state, now

    def doom(self, w: Worker, reason: str, now: float) -> None:
        """Give up on a worker: no more work; the supervisor kills it (process exit is the only
        guaranteed release). Without a supervisor, tell it to re-register and forget it."""
        if w.doomed:
            return
        sup = self.b.registry.supervisor_for(w)
        if sup is None or not w.pid:
            self.b.emit(ToWorker(w.identity, p.BrokerDisconnect(reason)))
            self.b.lose_worker(w, reason, now)
            return
        w.doomed = True
        self.doomed_at[w.identity] = now
        self.b.count("worker_kills_total")
        self.b.emit(ToWorker(sup.identity, p.Kill(w.pid, 9, reason)))
        self.b.emit(Log(logging.WARNING, "asking the supervisor to kill worker",
                        {"model": w.model_id, "worker": w.uid, "pid": w.pid, "reason": reason}))

    # ---- queries -------------------------------------------------------------------------------

    def query_load(self, client: bytes, qid: str, group: str, now: float) -> None:
        """mmi.load: every unit of the model is wanted; the answer comes once one is loaded."""
        units = self._units(group)
        for u in units:
            u.want_unload = False
            if u.state != s.LOADED:
                u.wanted_at = now
        if any(u.state == s.LOADED for u in units):
            self.b.emit(ToClient(client, p.QueryReply(qid, group_status(self.b, group))))
            return
        self.load_waiters.setdefault(group, []).append((client, qid, now))

    def query_unload(self, client: bytes, qid: str, group: str, now: float) -> None:
        """mmi.unload: every unit of the model; the answer comes once all are unloaded."""
        if self._all_unloaded(group):
            self.b.emit(ToClient(client, p.QueryReply(qid, group_status(self.b, group))))
            return
        self.unload_waiters.setdefault(group, []).append((client, qid, now))
        for u in self._units(group):
            self.preload_at.pop(u.id, None)
            self.request_unload(u, now)

    def forget_client(self, client: bytes) -> None:
        for waiters in (self.load_waiters, self.unload_waiters):
            for mid in list(waiters):
                waiters[mid] = [w for w in waiters[mid] if w[0] != client]

    # ---- worker facts --------------------------------------------------------------------------

    def on_ready(self, w: Worker, msg: p.Ready, now: float) -> None:
        m = self.models[w.model_id]
        self.seen.add(m.id)
        est = w.capabilities.get("est_weights_bytes")
        if isinstance(est, int) and not isinstance(est, bool) and est > 0:
            m.est_weights = est
        if m.seen_weights:
            m.est_weights = m.seen_weights   # a real load's figure beats the worker's estimate
        m.mem, m.want_unload = dict(msg.mem), False
        if msg.state == "loaded":
            self._set(m, s.LOADED, now)
            m.weights = msg.weights_bytes if msg.weights_bytes > 0 else m.est_weights
            if msg.weights_bytes > 0:
                m.est_weights = m.seen_weights = msg.weights_bytes
            m.charge, m.loaded_at, m.load_seconds = m.resident(), now, msg.load_seconds
            m.wanted_at = None
            self._reply_waiters(self.load_waiters, m.group)
        elif msg.state == "loading":
            self._set(m, s.LOADING, now)
            m.charge = m.need()
        elif msg.state == "unloading":
            self._set(m, s.UNLOADING, now)
            m.charge = max(m.need(), m.weights)
        else:
            self._set(m, s.UNLOADED, now)
            m.charge, m.weights, m.loaded_at = 0, 0, None
            if m.spec.preload:
                self.preload_at[m.id] = now

    def on_loaded(self, w: Worker, msg: p.Loaded, now: float) -> None:
        m = self.models[w.model_id]
        if w.doomed:
            return
        self._set(m, s.LOADED, now)
        m.weights = msg.weights_bytes if msg.weights_bytes > 0 else m.est_weights
        m.est_weights = m.weights or m.est_weights
        if msg.weights_bytes > 0:
            m.seen_weights = msg.weights_bytes
        m.charge, m.loaded_at, m.load_seconds = m.resident(), now, msg.load_seconds
        m.last_error, m.wanted_at, m.fail_streak = None, None, 0
        if msg.mem:
            m.mem = dict(msg.mem)
        self.b.count("model_loads_total")
        self._log(logging.INFO, "model loaded", m, weights_bytes=m.weights, load_s=round(msg.load_seconds, 3))
        self._reply_waiters(self.load_waiters, m.group)
        if m.want_unload:
            m.want_unload = False
            self.request_unload(m, now)

    def on_load_failed(self, m: ModelState, code: str, message: str, now: float, charge_kept: bool = False) -> None:
        """A load failed (worker error or timeout): waiters and queued jobs get the error."""
        self._set(m, s.FAILED, now)
        if not charge_kept:
            m.charge = 0
        m.weights, m.loaded_at, m.want_unload = 0, None, False
        m.wanted_at = None
        m.failures += 1
        m.fail_streak += 1
        m.last_error = f"{code}: {message}"
        self.preload_at.pop(m.id, None)
        self.b.count("load_failures_total")
        self._log(logging.WARNING, f"load failed: {message}", m, code=code)
        if self._others_serve(m):
            m.retry_at = now + min(REPLICA_RETRY_S * 2 ** (m.fail_streak - 1), REPLICA_RETRY_MAX_S)
            return
        self._reply_waiters(self.load_waiters, m.group, code, message)
        for job in self.b.jobs.queued(m.group):
            self.b.fail(job, code, f"loading model {m.group!r} failed: {message}")

    def on_unloaded(self, w: Worker, now: float) -> None:
        m = self.models[w.model_id]
        if m.state not in (s.LOADED, s.DRAINING, s.UNLOADING):
            return
        self._set(m, s.UNLOADED, now)
        m.charge, m.weights, m.loaded_at = 0, 0, None
        self.b.count("model_unloads_total")
        self._log(logging.INFO, "model unloaded", m)
        if self._all_unloaded(m.group):
            self._reply_waiters(self.unload_waiters, m.group)

    def on_worker_gone(self, w: Worker, now: float) -> None:
        """Its process is gone or forgotten: whatever it held counts as released."""
        self.doomed_at.pop(w.identity, None)
        m = self.models.get(w.model_id)
        if m is None:
            return
        if m.state == s.LOADING:
            m.last_error = "worker lost while loading"
            if not self._others_serve(m):
                self._reply_waiters(self.load_waiters, m.group, "load_failed", "the worker was lost while loading")
        if m.state != s.FAILED:
            self._set(m, s.UNLOADED, now)
        m.charge, m.weights, m.loaded_at, m.want_unload = 0, 0, None, False
        self.preload_at.pop(m.id, None)
        if self._all_unloaded(m.group):
            self._reply_waiters(self.unload_waiters, m.group)

    # ---- decisions -----------------------------------------------------------------------------

    def start_load(self, m: ModelState, w: Worker, now: float) -> None:
        assert m.state in (s.UNLOADED, s.FAILED), m.state   # never two loads of one model at once
        self._set(m, s.LOADING, now)
        m.charge = m.need()
        m.wanted_at = None
        self.preload_at.pop(m.id, None)
        if self.promised == m.id:
            self.promised = None
        self.b.emit(ToWorker(w.identity, p.Load(m.id)))
        self._log(logging.INFO, "loading model", m, reserved_bytes=m.charge, worker=w.uid)

    def request_unload(self, m: ModelState, now: float) -> None:
        """Unload as soon as nothing runs on it (explicit unload or eviction)."""
        m.wanted_at = None
        if m.state == s.LOADING:
            m.want_unload = True
        elif m.state == s.LOADED:
            self._set(m, s.DRAINING, now)
            self._drain(m, now)

    def _drain(self, m: ModelState, now: float) -> None:
        w = self._worker(m)
        if m.state == s.DRAINING and w is not None and w.busy == 0 and not w.doomed:
            self._set(m, s.UNLOADING, now)
            m.escalation = 0
            self.b.emit(ToWorker(w.identity, p.Unload(m.id, "stay")))
            self._log(logging.INFO, "unloading model", m, worker=w.uid)

    def _demand_since(self, m: ModelState) -> float | None:
        """When the oldest demand for loading this unit arose: its model's mmi.load waiters and
        queued jobs, its own preload or mmi.load."""
        times = [t for _, _, t in self.load_waiters.get(m.group, ())]
        q = self.b.jobs.queue(m.group)
        if q:
            times.append(q[0].accepted_at)
        if m.id in self.preload_at:
            times.append(self.preload_at[m.id])
        if m.wanted_at is not None:
            times.append(m.wanted_at)
        return min(times) if times else None

    def reconcile(self, now: float) -> None:
        """After every event: finish drains, relieve pressure, start loads or evictions. Memory is
        planned per device: a unit competes only with the units on its own device."""
        b = self.b
        for m in self.models.values():
            if m.state == s.DRAINING:
                self._drain(m, now)
        on_device = {d: [m for m in self.models.values() if m.device_key == d] for d in b.devices()}
        budgets = {d: b.budget(d) for d in on_device}
        for d, units in on_device.items():
            for victim in s.plan_relief(units, budgets[d], now, b.config.min_residency_s, self._is_busy):
                self._log(logging.WARNING, "evicting: working memory pushed committed past the budget", victim)
                b.count("evictions_total.pressure")
                self.request_unload(victim, now)
        if b.shutting_down:
            self._refuse_loads_during_shutdown()
            return
        demands = []
        for m in self.models.values():
            w = self._worker(m)
            if w is None or w.doomed or m.state not in (s.UNLOADED, s.FAILED) or m.charge:
                continue
            if now < m.retry_at and self._others_serve(m):
                continue
            since = self._demand_since(m)
            if since is None:
                continue
            preload_only = (not self.load_waiters.get(m.group) and not b.jobs.queue_depth(m.group)
                            and m.wanted_at is None)
            if preload_only and self._earlier_preload_pending(m, now):
                continue
            # real demands (jobs, mmi.load) oldest first, then preloads in config order
            demands.append(((m.id != self.promised, preload_only, 0.0 if preload_only else since, m.order),
                            m, w, preload_only))
        if self.promised not in {d[1].id for d in demands}:
            self.promised = None
        demands.sort(key=lambda d: d[0])
        held: dict[int, int] = {}   # by device: bytes kept for an earlier demand that waits for room
        self.making_room = set()
        cannot = []
        for _, m, w, preload_only in demands:
            d = m.device_key
            budget, units, kept = budgets[d], on_device[d], held.get(d, 0)
            plan = s.plan_load(m, units, budget, now, b.config.min_residency_s, self._is_busy)
            if plan.action == "never":
                cannot.append((m, budget))
            elif plan.action == "load" and (budget is None or s.committed(units) + m.need() + kept <= budget):
                self.start_load(m, w, now)
            elif preload_only:
                self.preload_at.pop(m.id, None)   # preload never evicts
                self._log(logging.INFO, "preload skipped: not enough memory within budget", m)
            else:
                if kept == 0 and plan.action == "evict":
                    self._evict(m, plan, now)
                held[d] = kept + m.need()
                self.making_room.add(m.id)
        for m, budget in cannot:      # after the loads: another replica may serve what m cannot
            self._cannot_fit(m, budget)

    def _earlier_preload_pending(self, m: ModelState, now: float) -> bool:
        """Preloads go in config order: an earlier preload model whose worker has not registered
        yet keeps later ones waiting, for up to PRELOAD_WAIT_S after the broker started."""
        started = self.b.started_at if self.b.started_at is not None else now
        if now - started >= PRELOAD_WAIT_S:
            return False
        return any(o.order < m.order and o.spec.enabled and o.spec.preload and o.id not in self.seen
                   for o in self.models.values())

    def _evict(self, for_model: ModelState, plan: s.Plan, now: float) -> None:
        self.promised = for_model.id
        for victim in (*plan.idle, *plan.busy):
            self.b.count("evictions_total.lru")
            self._log(logging.INFO, f"evicting for {for_model.id!r} (least recently used)", victim,
                      busy=victim in plan.busy)
            self.request_unload(victim, now)

    def _cannot_fit(self, m: ModelState, budget: int) -> None:
        where = f" on device {m.device}" if m.device is not None else ""
        message = (f"model {m.group!r} needs {m.need()} bytes, more than the memory budget of {budget} "
                   f"bytes{where} allows even with every unpinned model unloaded")
        m.wanted_at = None
        self.preload_at.pop(m.id, None)
        if m.last_error != f"insufficient_memory: {message}":   # once, not at every demand
            self._log(logging.WARNING, "model cannot fit", m, need_bytes=m.need(), budget_bytes=budget)
        m.last_error = f"insufficient_memory: {message}"
        if self._others_serve(m):
            return
        self._reply_waiters(self.load_waiters, m.group, "insufficient_memory", message)
        for job in self.b.jobs.queued(m.group):
            self.b.fail(job, "insufficient_memory", message)

    def _refuse_loads_during_shutdown(self) -> None:
        msg = "the broker is shutting down"
        for group, units in self.b.groups.items():
            for u in units:
                if u.state not in (s.LOADED, s.DRAINING):
                    self.preload_at.pop(u.id, None)
            if any(u.state in (s.LOADED, s.DRAINING) for u in units):
                continue
            self._reply_waiters(self.load_waiters, group, "overloaded", msg, retryable=True)
            for job in self.b.jobs.queued(group):
                self.b.fail(job, "overloaded", msg, retryable=True)

    # ---- timers --------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        cfg = self.b.config
        for m in self.models.values():
            w = self._worker(m)
            if m.state == s.LOADING and now - m.since > cfg.load_timeout_s:
                self.on_load_failed(m, "load_failed", f"not loaded after {cfg.load_timeout_s:g} s", now,
                                    charge_kept=True)
                if w is not None:
                    self.doom(w, "load timeout", now)
            elif m.state == s.UNLOADING and w is not None and now - m.since > cfg.unload_timeout_s * (m.escalation + 1):
                m.escalation += 1
                if m.escalation == 1:
                    self._log(logging.WARNING, "unload is slow: asking the worker to exit", m)
                    self.b.emit(ToWorker(w.identity, p.Unload(m.id, "exit")))
                else:
                    self.doom(w, "unload timeout", now)
        for group, units in self.b.groups.items():
            # mmi.load waiters that are still not loading after load_timeout_s give up
            if self.load_waiters.get(group) and not any(u.state == s.LOADING for u in units):
                expired = [x for x in self.load_waiters[group] if now - x[2] > cfg.load_timeout_s]
                if expired:
                    self.load_waiters[group] = [x for x in self.load_waiters[group] if x not in expired]
                    code, why = (("model_unavailable", "no worker for this model is connected")
                                 if all(self._worker(u) is None for u in units)
                                 else ("insufficient_memory", "no room could be made in time"))
                    for client, qid, _ in expired:
                        self.b.emit(ToClient(client, p.Error(qid, code, why, True, cfg.retry_after_ms)))
            # mmi.unload waiters get the current status rather than hanging on a long drain
            for client, qid, since in [x for x in self.unload_waiters.get(group, ()) if now - x[2] > UNLOAD_REPLY_S]:
                self.unload_waiters[group].remove((client, qid, since))
                self.b.emit(ToClient(client, p.QueryReply(qid, group_status(self.b, group))))
        for ident, since in list(self.doomed_at.items()):
            w = self.b.registry.get(ident)
            if w is not None and now - since > DOOMED_GRACE_S:
                self.b.emit(ToWorker(ident, p.BrokerDisconnect("killed by the broker")))
                self.b.lose_worker(w, "did not exit after a kill request", now)

    def fail_all_waiters(self, code: str, message: str) -> None:
        for group in self.b.groups:
            self._reply_waiters(self.load_waiters, group, code, message, retryable=True)
            self._reply_waiters(self.unload_waiters, group, code, message, retryable=True)
