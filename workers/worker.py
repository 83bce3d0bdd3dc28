"""Worker runtime: one model, one engine, three threads.

- control thread: owns the DEALER to the broker. Sends READY on every (re)connection, heartbeats
  every interval, receives JOB / CANCEL / LOAD / UNLOAD / HEARTBEAT / DISCONNECT, and forwards
  answers that the other threads push to it over inproc PUSH/PULL (so its poll wakes at once).
  It also owns the PULL socket where clients on this host send direct copies of their jobs ahead
  of the broker's JOB (workers/direct_jobs.py).
- preprocessing thread: GroundingRequest.from_job + engine.prepare (CPU work overlapping the
  previous forward pass). When both threads are idle there is nothing to overlap, so the job goes
  straight to the compute thread, which prepares it itself (one thread hop less: ~0.2 ms).
- compute thread (the main thread): LOAD / UNLOAD and engine.run on batches; it also sends a
  job's FINAL straight to a client on this host that asked (workers/direct_answers.py).
A long forward pass cannot starve heartbeats: they come from the control thread, and the per-job
`last_progress_ms_ago` lets the broker's watchdog see a stuck computation.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import zmq

from common import protocol as p
from common import wire
from common.zmqutil import close_quietly, drain, make_socket
from workers.compute import DONE_TAG, EXIT_TAG, Compute, Ticket
from workers.direct_answers import DirectAnswers
from workers import direct_jobs
from workers.direct_jobs import EarlyGate
from workers.engine import Engine
from workers.keep_awake import KeepAwake

log = logging.getLogger(__name__)

MAX_DRAIN = 256             # messages handled per socket per poll turn (fairness between sockets)
SEEN_JOBS = 256             # ids of the latest JOBs, so that a direct copy coming after its JOB is refused
FLUSH_S = 0.5               # after a freeze, how long ready answers are awaited before re-registering
LAST_WORDS_LINGER_MS = 1000 # a closing link keeps sending what is queued (answers, DISCONNECT) this long


@dataclass(frozen=True)
class WorkerSettings:
    """Durations in seconds."""
    model_id: str
    endpoint: str                   # broker.worker_endpoint
    heartbeat_interval_s: float = 1.0
    liveness: int = 3               # broker silent for this many intervals -> reconnect
    max_slots: int = 2              # jobs held at once (running + prepared + preparing)
    shutdown_grace_s: float = 8.0   # in-flight jobs may finish within this, then we leave anyway
    engine_name: str = "fake"
    est_weights_bytes: int = 0
    host: str = field(default_factory=socket.gethostname)
    parent_pid: int | None = None   # exit when re-parented (supervisor gone), portable PDEATHSIG
    prep_threads: int = 1           # preprocessing threads (decode + resize release the GIL)
    finishing: bool = True          # FINISHING shortly before each batch's answers (ModelSpec.finishing)
    keep_cpus_awake_ms: int = 0     # spinners while jobs are held, and this long after (ModelSpec's)


class Worker:
    def __init__(self, engine: Engine, settings: WorkerSettings):
        self.engine = engine
        self.s = settings
        self.state = "empty"                       # written by control (loading/unloading) and compute
        self.weights_bytes = 0
        self.load_seconds = 0.0
        self.mem: dict = {}                        # last engine memory report (compute thread reads it)
        self.counters = {"decode_errors": 0, "unexpected": 0, "stale_answers": 0, "reconnects": 0, "jobs": 0,
                         "refused_leaving": 0, "direct_jobs": 0, "direct_jobs_skipped": 0, "direct_jobs_dropped": 0}
        # control thread only: every ticket still held by prep/compute (by seq; they occupy slots),
        # and those of the current connection by job id (answers forwarded, listed in heartbeats)
        self._tickets: dict[int, Ticket] = {}
        self._inflight: dict[str, Ticket] = {}
        self._seq = 0
        self._last_tx = time.monotonic()           # last message sent to the broker
        self._gen = 0                              # connection generation
        self._stop_requested = False
        self._phase = "running"                    # running -> draining -> unloading -> done
        self._work_q: queue.SimpleQueue = queue.SimpleQueue()
        self._prep_q: queue.SimpleQueue = queue.SimpleQueue()
        self._inproc = f"inproc://worker-{uuid.uuid4().hex}"
        self._awake: KeepAwake | None = None       # the model's keep_cpus_awake_ms; the control thread holds it
        self._awake_held = False
        self.jobs_to: str | None = None            # our PULL endpoint for direct jobs, once bound
        self._early: Ticket | None = None          # control thread: the direct copy awaiting its JOB
        self._seen: OrderedDict[str, None] = OrderedDict()   # control thread: the latest JOBs' ids

    # ---- entry point (main thread) --------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or UNLOAD then=exit); returns the exit status."""
        self.mem = self.engine.memory().to_wire()
        ctx = zmq.Context()
        pull = ctx.socket(zmq.PULL)
        pull.bind(self._inproc)
        push_preps = [ctx.socket(zmq.PUSH) for _ in range(max(1, self.s.prep_threads))]
        push_compute = ctx.socket(zmq.PUSH)
        for s in (*push_preps, push_compute):
            s.setsockopt(zmq.LINGER, 0)
            s.connect(self._inproc)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        direct = DirectAnswers(ctx)
        jobs_pull = make_socket(ctx, zmq.PULL)   # frames bounded as on every link
        jobs_pull.setsockopt(zmq.RCVHWM, direct_jobs.RCVHWM)
        jobs_pull.bind(direct_jobs.BIND)
        self.jobs_to = jobs_pull.getsockopt_string(zmq.LAST_ENDPOINT)
        compute = self._compute = Compute(self, push_compute, direct)
        self._start_keep_awake()
        control = threading.Thread(target=self._control, args=(ctx, pull, wake_r, jobs_pull), name="control",
                                   daemon=True)
        preps = [threading.Thread(target=compute.prep_loop, args=(self._prep_q, push), name=f"prep-{i}", daemon=True)
                 for i, push in enumerate(push_preps)]
        control.start()
        for prep in preps:
            prep.start()
        try:
            compute.loop(self._work_q)
        finally:
            direct.close()
            control.join(timeout=self.s.shutdown_grace_s + 5)
            for prep in preps:
                self._prep_q.put(None)
            for prep in preps:
                prep.join(timeout=2)
            signal.set_wakeup_fd(old_fd)
            for sig, handler in old.items():
                signal.signal(sig, handler)
            if not control.is_alive() and not any(prep.is_alive() for prep in preps):
                close_quietly(*push_preps, push_compute, jobs_pull)
                ctx.destroy(linger=0)
            wake_r.close()
            wake_w.close()
            if self._awake is not None:
                self._awake.stop()
        return 0

    def _start_keep_awake(self) -> None:
        if self.s.keep_cpus_awake_ms <= 0:
            return
        awake = KeepAwake(self.s.keep_cpus_awake_ms / 1000.0)
        why = awake.start()
        if why is not None:
            log.warning("keep_cpus_awake_ms is set, but the CPUs are not kept awake: %s", why)
            return
        log.info("keeping CPUs %s awake while jobs are held, and %d ms after", _cpu_list(awake.cpus),
                 self.s.keep_cpus_awake_ms)
        self._awake = awake

    def _follow_jobs(self) -> None:
        """Control thread, after each round of messages: the spinners run while jobs are held."""
        held = bool(self._tickets)   # every job prep or compute still holds, an old connection's too
        if self._awake is not None and held != self._awake_held:
            self._awake_held = held
            if held:
                self._awake.hold()
            else:
                self._awake.release()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs in the main thread; the control thread is woken through the wakeup fd.
        self._stop_requested = True

    # ---- control thread ---------------------------------------------------------------------------

    def _control(self, ctx: zmq.Context, pull: zmq.Socket, wake: socket.socket, jobs_pull: zmq.Socket) -> None:
        try:
            self._control_loop(ctx, pull, wake, jobs_pull)
        except Exception:
            log.exception("control thread failed; exiting")
            os._exit(70)

    def _control_loop(self, ctx: zmq.Context, pull: zmq.Socket, wake: socket.socket, jobs_pull: zmq.Socket) -> None:
        interval = self.s.heartbeat_interval_s
        self._connect(ctx)
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        poller.register(jobs_pull, zmq.POLLIN)
        poller.register(self._dealer, zmq.POLLIN)
        next_hb = time.monotonic() + interval
        phase_deadline = 0.0
        while True:
            wake_at = min(next_hb, phase_deadline) if self._phase in ("draining", "unloading") else next_hb
            timeout_ms = max(0, int((wake_at - time.monotonic()) * 1000)) + 1
            events = dict(poller.poll(timeout_ms))
            if time.monotonic() - self._last_tx > self.s.liveness * interval:
                # We sent nothing for longer than the broker's liveness window: this process was
                # frozen (SIGSTOP, swapped out) and the broker has declared us lost. Messages
                # queued meanwhile are stale; answers computed already go out on the old link
                # (the broker counts them as zombies), then we re-register.
                log.warning("silent for %.1fs (process frozen?); re-registering", time.monotonic() - self._last_tx)
                self._reconnect(ctx, poller, flush=pull)
                next_hb = time.monotonic()
                continue
            if events.get(pull):
                for frames in drain(pull, MAX_DRAIN):
                    self._on_internal(frames)
            if events.get(jobs_pull):
                for frames in drain(jobs_pull, MAX_DRAIN):
                    self._on_direct_job(frames)
            if events.get(self._dealer):
                for _ in range(MAX_DRAIN):   # not drain(): _on_broker may replace self._dealer
                    try:
                        frames = self._dealer.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_broker(frames, ctx, poller)
            if events.get(wake):
                try:
                    if any(b in (signal.SIGTERM, signal.SIGINT) for b in wake.recv(64)):
                        self._stop_requested = True
                except BlockingIOError:
                    pass
            self._follow_jobs()
            now = time.monotonic()
            if now >= next_hb:
                next_hb = now + interval
                if self.s.parent_pid and os.getppid() != self.s.parent_pid:
                    log.warning("parent %d is gone; shutting down", self.s.parent_pid)
                    self._stop_requested = True
                if now - self._last_rx > self.s.liveness * interval:
                    log.warning("broker silent for %.1fs; reconnecting", now - self._last_rx)
                    self._reconnect(ctx, poller)
                self._send_heartbeat()
            # shutdown: stop taking jobs, let in-flight finish within the grace, unload, leave
            if self._phase == "running" and self._stop_requested:
                log.info("shutdown requested: draining %d job(s)", len(self._inflight))
                self._phase, phase_deadline = "draining", now + self.s.shutdown_grace_s
                self._send_heartbeat()   # free_slots 0: the broker stops dispatching
            if self._phase == "draining" and (not self._inflight or now >= phase_deadline):
                if self._inflight:
                    log.warning("grace expired with %d job(s) in flight", len(self._inflight))
                self._phase, phase_deadline = "unloading", now + 5.0
                self._orphan_inflight()   # answers dropped: our DISCONNECT makes the broker requeue them
                self._work_q.put(("shutdown",))
            if self._phase == "unloading" and now >= phase_deadline:
                log.error("compute thread did not finish; exiting without unload")
                self._finish()
                os._exit(0)
            if self._phase == "done":
                self._finish()
                return

    def _finish(self) -> None:
        try:
            self._send(p.WorkerDisconnect(reason="shutdown"))
        finally:
            self._close_dealer()

    def _connect(self, ctx: zmq.Context) -> None:
        """New socket, new identity, READY with full state (the model stays loaded)."""
        self._gen += 1
        self._uid = uuid.uuid4()
        self._dealer = make_socket(ctx, zmq.DEALER, identity=b"w:" + self._uid.bytes)
        # READY must queue until the connection is up (the broker may start after us)
        self._dealer.setsockopt(zmq.IMMEDIATE, 0)
        self._dealer.connect(self.s.endpoint)
        self._last_rx = time.monotonic()
        self._incarnation: str | None = None
        self._hb_seq = 0
        # slot_reports: our heartbeats' free_slots are exact (0 while draining: send no jobs)
        caps = {"max_slots": self.s.max_slots, "max_batch": self.engine.max_batch, "slot_reports": True,
                "engine": self.s.engine_name, "est_weights_bytes": self.s.est_weights_bytes,
                "device_mem_total": int(self.mem.get("limit", 0) or 0), "jobs_to": self.jobs_to}
        self._send(p.Ready(worker_uid=self._uid.hex, pid=os.getpid(), host=self.s.host,
                           model_id=self.s.model_id, state=self.state, capabilities=caps,
                           mem=dict(self.mem), weights_bytes=self.weights_bytes,
                           load_seconds=self.load_seconds))

    def _reconnect(self, ctx: zmq.Context, poller: zmq.Poller, flush: zmq.Socket | None = None) -> None:
        """New identity and READY. `flush`: first forward answers that compute has ready (waiting
        up to FLUSH_S for them) on the old link. Jobs of the old connection are orphaned: the
        broker has requeued or failed them, so their answers are dropped; they still hold slots
        until compute is done with them, and the broker may send them again under the same id."""
        self.counters["reconnects"] += 1
        if flush is not None and self._inflight and flush.poll(int(FLUSH_S * 1000)):
            for frames in drain(flush, MAX_DRAIN):
                self._on_internal(frames)
        self._orphan_inflight()
        poller.unregister(self._dealer)
        self._close_dealer()
        self._connect(ctx)
        poller.register(self._dealer, zmq.POLLIN)

    def _close_dealer(self) -> None:
        # LINGER 0 would drop what is still queued: a flushed answer, our DISCONNECT
        if not self._dealer.closed:
            self._dealer.close(linger=LAST_WORDS_LINGER_MS)

    def _orphan_inflight(self) -> None:
        self._drop_early()
        for t in self._inflight.values():
            t.cancelled = True   # not started yet: skipped; running: its answer is dropped
        self._inflight.clear()

    def _send(self, msg: p.Message, blobs: tuple = ()) -> None:
        self._dealer.send_multipart(wire.encode(msg, blobs), copy=False)
        self._last_tx = time.monotonic()

    def _send_heartbeat(self) -> None:
        now = time.monotonic()
        self._hb_seq += 1
        # state: "running" while prepared or computed, "waiting" while queued in this process
        # (behind a batch: no progress, but not stuck; the watchdog and poison rule skip it)
        inflight = [{"id": t.id, "started_ms_ago": int((now - t.recv_t) * 1000),
                     "last_progress_ms_ago": int((now - t.progress_t) * 1000),
                     "state": "running" if t.fwd_start or (t.prep_start and not t.prep_end) else "waiting"}
                    for t in self._inflight.values()]
        # a direct copy awaiting its JOB takes no slot the broker counts: the JOB is to fill one
        held = len(self._tickets) - (self._early is not None)
        free = 0 if self._phase != "running" else max(0, self.s.max_slots - held)
        self._send(p.Heartbeat(seq=self._hb_seq, state=self.state, free_slots=free,
                               inflight=inflight, mem=dict(self.mem)))

    def _on_internal(self, frames: list) -> None:
        tag = frames[0].bytes
        if tag == DONE_TAG:
            self._phase = "done"
        elif tag == EXIT_TAG:
            self._stop_requested = True
        elif tag:
            ticket = self._tickets.pop(int(tag[1:]), None)
            if len(frames) == 1:   # a direct copy that no JOB confirmed, handed back
                self.counters["direct_jobs_dropped"] += 1
                if self._early is ticket:
                    self._early = None
                return
            if ticket is None or self._inflight.get(ticket.id) is not ticket:
                self.counters["stale_answers"] += 1   # its connection is gone, or we are leaving
                log.info("dropped the answer for job %s of an old connection", ticket.id if ticket else "?")
                return
            del self._inflight[ticket.id]
            if self._phase != "running":
                # leaving: say "no free slot" before the answer frees one, so the broker
                # does not send a job we would only hand back at our DISCONNECT
                self._send_heartbeat()
            self._dealer.send_multipart(frames[1:], copy=False)
            self._last_tx = time.monotonic()
        else:
            self._dealer.send_multipart(frames[1:], copy=False)
            self._last_tx = time.monotonic()

    def _decode(self, frames: list, table: dict, source: str) -> tuple[p.Message | None, list]:
        try:
            return wire.decode(frames, table)
        except wire.ProtocolError as exc:
            self.counters["decode_errors"] += 1
            log.warning("dropped a bad message from %s (%s)", source, exc)
            return None, []

    def _on_broker(self, frames: list, ctx: zmq.Context, poller: zmq.Poller) -> None:
        msg, blobs = self._decode(frames, wire.TO_WORKER, "the broker")
        if msg is None:
            return
        self._last_rx = time.monotonic()
        if isinstance(msg, p.Job):
            self._on_job(msg, blobs)
        elif isinstance(msg, p.JobCancel):
            if msg.id in self._inflight:
                self._inflight[msg.id].cancelled = True
        elif isinstance(msg, p.BrokerHeartbeat):
            if self._incarnation not in (None, msg.broker_incarnation):
                log.warning("broker incarnation changed; re-registering")
                self._reconnect(ctx, poller)
                return
            self._incarnation = msg.broker_incarnation
        elif isinstance(msg, p.Load):
            self._on_load(msg)
        elif isinstance(msg, p.Unload):
            self._on_unload(msg)
        elif isinstance(msg, p.BrokerDisconnect):
            log.warning("broker asked us to reconnect (%s)", msg.reason)
            self._reconnect(ctx, poller)
        else:
            self.counters["unexpected"] += 1   # e.g. a Kill meant for a supervisor

    def _on_direct_job(self, frames: list) -> None:
        """A client's direct copy of a SUBMIT: prepare it now, run it once its JOB comes. Taken only
        while compute has no job to answer (workers/direct_jobs.py says why); otherwise the JOB alone
        counts."""
        msg, blobs = self._decode(frames, wire.DIRECT_TO_WORKER, "a client's direct job")
        if not isinstance(msg, p.Submit):
            return
        # Held: a job compute still has to answer. One it answered straight to its client counts
        # no more: that client may send its next job before the RESULT has reached this thread.
        held = any(not t.answered_direct for t in self._tickets.values())
        # A copy may come after its JOB (both race from the client); taken then, it would wait for
        # a JOB that has been and gone, and keep the next copies out.
        if (msg.model != self.s.model_id or self.state != "loaded" or self._phase != "running" or held
                or msg.id in self._seen or (msg.blob_meta and len(msg.blob_meta) != len(blobs)) or not msg.id):
            self.counters["direct_jobs_skipped"] += 1
            return
        ticket = self._hold(msg, blobs, gate=EarlyGate(msg.params, blobs))
        self._early = ticket
        self._work_q.put(ticket)   # compute prepares it next: at once, or after the answers it is sending

    def _hold(self, msg: p.Job | p.Submit, blobs: list, **extra: Any) -> Ticket:
        """A ticket for `msg` (a JOB, or a client's direct copy of one) received now, held by
        prep/compute under the next seq."""
        now = time.monotonic()
        self._seq += 1
        ticket = Ticket(id=msg.id, params=msg.params, blobs=blobs, gen=self._gen, recv_t=now,
                        deadline=_deadline(now, msg.ttl_ms), seq=self._seq, progress_t=now, **extra)
        self._tickets[ticket.seq] = ticket
        return ticket

    def _drop_early(self) -> None:
        """Something other than its JOB came first: the direct copy will not run."""
        early, self._early = self._early, None
        if early is not None and early.gate.drop():
            early.cancelled = True   # not prepared yet: skipped

    def _confirm_early(self, msg: p.Job, blobs: list, direct_to_client: bool) -> bool:
        """`msg` is the JOB of the direct copy we hold: it runs as that JOB. False if it is not."""
        early = self._early
        if early is None or early.id != msg.id or not early.gate.same_job(msg.params, blobs):
            return False
        now = time.monotonic()

        def apply() -> None:
            early.gen, early.deadline = self._gen, _deadline(now, msg.ttl_ms)
            early.answer_to = msg.answer_to if direct_to_client else None
            early.early_ms = (now - early.recv_t) * 1000.0

        if not early.gate.confirm(apply):
            return False   # compute gave up on it just now; the JOB starts afresh
        self._early = None
        self._inflight[msg.id] = early
        self.counters["direct_jobs"] += 1
        return True

    def _on_job(self, msg: p.Job, blobs: list) -> None:
        self._seen[msg.id] = None
        if len(self._seen) > SEEN_JOBS:
            self._seen.popitem(last=False)
        if msg.id in self._inflight:
            return  # duplicate delivery; the first one will be answered
        if self._phase != "running":
            self.counters["refused_leaving"] += 1
            return  # leaving: not started, not answered; the broker requeues it at our DISCONNECT
        if self.state != "loaded":
            self._send(p.WorkerError(id=msg.id, code="model_unavailable",
                                     message=f"model {self.s.model_id!r} is {self.state}, not loaded"))
            return
        self.counters["jobs"] += 1
        # a direct answer only to a client on this host (the broker checked the endpoint's form)
        direct = msg.answer_host == self.s.host and msg.answer_to and p.direct_endpoint_ok(msg.answer_to)
        if self._confirm_early(msg, blobs, bool(direct)):
            return
        self._drop_early()
        ticket = self._hold(msg, blobs, answer_to=msg.answer_to if direct else None)
        self._inflight[msg.id] = ticket
        if self._compute.idle and self._compute.prep_idle and self._prep_q.empty():
            self._work_q.put(ticket)   # nothing to overlap with: one thread hop less
        else:
            self._prep_q.put(ticket)

    def _on_load(self, msg: p.Load) -> None:
        self._drop_early()
        if msg.model_id != self.s.model_id:
            self._send(p.WorkerError(id=None, code="load_failed",
                                     message=f"this worker serves {self.s.model_id!r}, not {msg.model_id!r}"))
        elif self.state == "loaded":
            self._send(p.Loaded(model_id=self.s.model_id, weights_bytes=self.weights_bytes,
                                load_seconds=self.load_seconds, mem=dict(self.mem)))
        elif self.state in ("empty", "unloading") and self._phase == "running":
            if self.state == "empty":
                self.state = "loading"
            self._work_q.put(("load", msg))   # after a pending unload: the queue keeps the order

    def _on_unload(self, msg: p.Unload) -> None:
        self._drop_early()
        if msg.model_id != self.s.model_id:
            return
        if self.state == "empty":
            self._send(p.Unloaded(model_id=self.s.model_id, released_bytes=0, mem=dict(self.mem)))
            if msg.then == "exit":
                self._stop_requested = True
        elif self.state in ("loaded", "loading"):
            if self.state == "loaded":
                self.state = "unloading"
            self._work_q.put(("unload", msg))   # after a pending load: the queue keeps the order


def _cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5', as taskset writes them."""
    runs: list[list[int]] = []
    for c in cpus:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def _deadline(now: float, ttl_ms: int) -> float:
    return now + max(0, ttl_ms) / 1000.0
