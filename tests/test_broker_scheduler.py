"""Memory accounting, load on demand, LRU eviction (pure core), and property tests of the
invariants of architecture.md section 6 over random event sequences."""
from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import protocol as p
from common.config import BrokerConfig, ModelSpec, units_of
from broker import events as e
from broker import scheduler as s
from broker.core import Broker
from tests.test_broker_core import SUP, Harness, answers, of, spec

# ---- load on demand, failures, timeouts ------------------------------------------------------------


def test_load_on_demand_queues_jobs_until_loaded():
    h = Harness()
    cmds = h.ready(b"w1", est=400)
    assert not of(cmds, p.Load)                           # no preload, no demand
    cmds = h.submit("j1") + h.submit("j2")
    assert of(cmds, p.Load, b"w1") == [p.Load("m")] and not of(cmds, p.Job)
    assert h.b.models["m"].state == "loading" and h.b.committed() == 400
    assert not of(h.submit("j3"), p.Load)                 # never a second load at once
    cmds = h.worker(b"w1", p.Loaded("m", 380, 1.5))
    assert [j.id for j in of(cmds, p.Job)] == ["j1"] and h.b.committed() == 380


def test_worker_load_failure_fails_waiters_and_the_next_demand_retries():
    h = Harness()
    h.ready(b"w1")
    h.submit("j1")
    h.query(p.Q_LOAD, {"model": "m"}, qid="load-1")
    cmds = h.worker(b"w1", p.WorkerError(None, "load_failed", "no such checkpoint"))
    assert answers(cmds, "j1")[0].code == "load_failed"
    assert [m.code for m in of(cmds, p.Error) if m.id == "load-1"] == ["load_failed"]
    m = h.b.models["m"]
    assert (m.state, m.failures, m.charge) == ("failed", 1, 0) and "no such checkpoint" in m.last_error
    assert of(h.submit("j2"), p.Load)


def test_load_timeout_fails_waiters_and_asks_the_supervisor_to_kill():
    h = Harness(load_timeout_s=5.0)
    h.host()
    h.ready(b"w1", est=300)
    h.submit("j1", ttl_ms=60_000)
    cmds = h.advance(5.2, alive=[b"w1"])
    assert answers(cmds, "j1")[0].code == "load_failed"
    assert of(cmds, p.Kill, SUP) == [p.Kill(h.pids[b"w1"], 9, "load timeout")]
    assert h.b.committed() == 300                         # still held until the process is gone
    assert not of(h.submit("j2", ttl_ms=60_000), p.Load)  # no load on a doomed worker
    h.host(exited=[h.pids[b"w1"]])
    assert h.b.committed() == 0
    assert of(h.ready(b"w2", est=300), p.Load, b"w2")    # the queued j2 loads on the new worker


def test_mmi_load_and_unload_answer_when_done():
    h = Harness()
    h.ready(b"w1", est=200)
    cmds = h.query(p.Q_LOAD, {"model": "m"}, qid="L")
    assert of(cmds, p.Load) and not of(cmds, p.QueryReply)
    [reply] = of(h.worker(b"w1", p.Loaded("m", 200, 0.3)), p.QueryReply)
    assert reply.id == "L" and reply.data["status"] == "loaded"
    assert of(h.query(p.Q_LOAD, {"model": "m"}, qid="L2"), p.QueryReply)[0].data["status"] == "loaded"
    h.submit("j1")
    cmds = h.query(p.Q_UNLOAD, {"model": "m"}, qid="U")   # busy: drains first
    assert not of(cmds, p.Unload) and h.b.models["m"].state == "draining"
    assert not of(h.submit("j2"), p.Job)                  # no dispatch while draining
    cmds = h.result(b"w1", "j1")
    assert of(cmds, p.Unload, b"w1") == [p.Unload("m", "stay")]
    [reply] = of(h.worker(b"w1", p.Unloaded("m", 200)), p.QueryReply)
    assert reply.id == "U" and reply.data["status"] == "unloaded"
    assert of(h.query(p.Q_UNLOAD, {"model": "nope"}), p.Error)[0].code == "unknown_model"
    assert of(h.query(p.Q_LOAD, {}), p.Error)[0].code == "bad_request"


def test_unload_timeout_escalates_to_exit_then_kill():
    h = Harness(unload_timeout_s=2.0)
    h.host()
    h.loaded_worker(b"w1")
    h.query(p.Q_UNLOAD, {"model": "m"})
    cmds = h.advance(2.2, alive=[b"w1"])
    assert of(cmds, p.Unload, b"w1") == [p.Unload("m", "exit")]
    cmds = h.advance(2.2, alive=[b"w1"])
    assert of(cmds, p.Kill, SUP)


# ---- budget and eviction -----------------------------------------------------------------------------

def test_budget_from_config_device_or_host():
    assert s.budget_bytes(12345, 0, 0) == 12345
    assert s.budget_bytes("auto", 0, 0) is None
    assert s.budget_bytes("auto", 1000, 5000) == 800       # the device wins over the host
    assert s.budget_bytes("auto", 0, 5000) == 4000
    assert s.budget_bytes(0.5, 0, 5000) == 2500
    h = Harness(memory_budget="auto")
    h.host()                                               # mem_total 10_000
    assert h.b.budget() == 8000
    h.ready(b"w1", device_mem=2000)
    assert h.b.budget() == 1600


def three_models(**cfg) -> Harness:
    h = Harness({"a": spec(), "b": spec(), "c": spec()}, memory_budget=1000, min_residency_s=10.0, **cfg)
    for ident, mid in ((b"wa", "a"), (b"wb", "b"), (b"wc", "c")):
        h.ready(ident, mid, est=450)
    return h


def load_now(h: Harness, ident: bytes, mid: str, jid: str, weights: int = 450) -> None:
    h.submit(jid, model=mid)
    h.worker(ident, p.Loaded(mid, weights, 1.0))
    h.result(ident, jid)


def test_lru_victim_is_unloaded_and_the_load_waits_for_the_memory_report():
    h = three_models()
    load_now(h, b"wa", "a", "a1")
    h.advance(1)
    load_now(h, b"wb", "b", "b1")
    h.advance(1)
    h.submit("a2", model="a")                             # a is now more recent than b
    h.result(b"wa", "a2")
    h.advance(10, step=0.5, alive=[b"wa", b"wb", b"wc"])
    cmds = h.submit("c1", model="c")
    assert [(c.identity, c.msg) for c in cmds if isinstance(c, e.ToWorker)] == [(b"wb", p.Unload("b", "stay"))]
    assert not of(h.tick(), p.Load) and h.b.models["b"].state == "unloading"   # not freed yet
    cmds = h.worker(b"wb", p.Unloaded("b", 450))
    assert of(cmds, p.Load, b"wc") == [p.Load("c")]
    assert h.b.counters["evictions_total.lru"] == 1


def test_pinned_models_are_never_evicted_and_a_model_that_cannot_fit_fails_fast():
    h = Harness({"pin": spec(pin=True), "big": spec(), "small": spec()}, memory_budget=1000, min_residency_s=0.0)
    h.ready(b"wp", "pin", est=600)
    h.ready(b"wb", "big", est=500)
    h.ready(b"ws", "small", est=300)
    load_now(h, b"wp", "pin", "p1", 600)
    h.advance(100, step=1.0, alive=[b"wp", b"wb", b"ws"])
    cmds = h.submit("b1", model="big")                    # 600 + 500 > 1000, and pin stays
    assert answers(cmds, "b1")[0].code == "insufficient_memory"
    assert not of(cmds, p.Unload) and not of(cmds, p.Load)
    assert of(h.query(p.Q_LOAD, {"model": "big"}), p.Error)[0].code == "insufficient_memory"
    assert of(h.submit("s1", model="small"), p.Load, b"ws")


def test_min_residency_protects_a_fresh_model_until_it_has_served_its_time():
    h = Harness({"a": spec(), "b": spec()}, memory_budget=1000, min_residency_s=10.0)
    h.ready(b"wa", "a", est=600)
    h.ready(b"wb", "b", est=600)
    load_now(h, b"wa", "a", "a1", 600)
    h.submit("b1", model="b", ttl_ms=30_000)
    unloads = of(h.advance(9.5, alive=[b"wa", b"wb"]), p.Unload)
    assert unloads == []
    assert of(h.advance(1.0, alive=[b"wa", b"wb"]), p.Unload, b"wa") == [p.Unload("a", "stay")]


def test_busy_victim_drains_before_unloading():
    h = Harness({"a": spec(), "b": spec()}, memory_budget=1000, min_residency_s=0.0)
    h.ready(b"wa", "a", est=600)
    h.ready(b"wb", "b", est=600)
    h.submit("a1", model="a")
    h.worker(b"wa", p.Loaded("a", 600, 1.0))              # a1 running
    cmds = h.submit("b1", model="b")
    assert h.b.models["a"].state == "draining" and not of(cmds, p.Unload)
    assert not of(h.submit("a2", model="a"), p.Job)       # draining: nothing new dispatched
    cmds = h.result(b"wa", "a1")
    assert of(cmds, p.Unload, b"wa")
    assert of(h.worker(b"wa", p.Unloaded("a", 600)), p.Load, b"wb")


def test_worker_exit_releases_memory_for_a_waiting_load():
    h = Harness({"a": spec(), "b": spec()}, memory_budget=1000, min_residency_s=0.0)
    h.ready(b"wa", "a", est=600)
    h.ready(b"wb", "b", est=600)
    load_now(h, b"wa", "a", "a1", 600)
    h.submit("b1", model="b")
    assert h.b.models["a"].state == "unloading"
    assert of(h.worker(b"wa", p.WorkerDisconnect("exit")), p.Load, b"wb")


def test_preload_in_config_order_within_budget_never_evicting():
    models = {"p1": spec(preload=True), "p2": spec(preload=True), "p3": spec(preload=True)}
    h = Harness(models, memory_budget=1000, min_residency_s=0.0)
    assert of(h.ready(b"w1", "p1", est=500), p.Load, b"w1")
    h.worker(b"w1", p.Loaded("p1", 500, 0.1))
    assert of(h.ready(b"w2", "p2", est=400), p.Load, b"w2")
    h.worker(b"w2", p.Loaded("p2", 400, 0.1))
    h.advance(5, alive=[b"w1", b"w2"])
    cmds = h.ready(b"w3", "p3", est=300)                  # does not fit; must not evict p1/p2
    assert not of(cmds, p.Load) and not of(cmds, p.Unload)
    assert h.b.models["p3"].state == "unloaded"


def test_learned_working_memory_is_charged_and_raises_the_next_need():
    h = Harness({"a": spec(), "b": spec()}, memory_budget=1000, min_residency_s=0.0)
    h.ready(b"wa", "a", est=400)
    h.ready(b"wb", "b", est=400)
    h.submit("a1", model="a")
    h.worker(b"wa", p.Loaded("a", 400, 1.0))
    h.result(b"wa", "a1", peak=650)                       # 250 bytes of working memory
    assert h.b.models["a"].charge == 650
    cmds = h.submit("b1", model="b")                      # 650 + 400 > 1000: a must go
    assert of(cmds, p.Unload, b"wa")


def test_learned_working_memory_past_the_budget_evicts_an_idle_lru_model():
    h = Harness({"a": spec(), "b": spec()}, memory_budget=1000, min_residency_s=0.0)
    h.ready(b"wa", "a", est=400)
    h.ready(b"wb", "b", est=400)
    load_now(h, b"wb", "b", "b1", 400)
    h.advance(1)
    h.submit("a1", model="a")
    h.worker(b"wa", p.Loaded("a", 400, 1.0))
    cmds = h.result(b"wa", "a1", peak=800)                # a turns out to need 800: 1200 > 1000
    assert of(cmds, p.Unload, b"wb") == [p.Unload("b", "stay")]
    assert not of(cmds, p.Unload, b"wa") and h.b.counters["evictions_total.pressure"] == 1


# ---- property tests ---------------------------------------------------------------------------------

@dataclass
class FakeWorker:
    """Obeys the broker like a real worker would; answers wait in `outbox` until delivered."""
    model: str
    weights: int
    index: int
    gen: int = 0
    alive: bool = False
    state: str = "empty"
    running: set = field(default_factory=set)
    outbox: list = field(default_factory=list)

    @property
    def ident(self) -> bytes:
        return f"w-{self.model}-{self.gen}".encode()

    @property
    def pid(self) -> int:
        return 5000 + 100 * self.index + self.gen


class World:
    """A broker plus obedient fake workers; checks invariants after every event."""

    def __init__(self, weights: dict[str, int], budget: int, min_residency_s: float = 5.0, pins=(),
                 devices: dict[str, list[int]] | None = None):
        """`devices`: models served by replicas, one worker per device (the budget is per device)."""
        self.cfg = BrokerConfig(memory_budget=budget, min_residency_s=min_residency_s, queue_size=6,
                                global_queue_size=10, load_timeout_s=4.0, unload_timeout_s=2.0, job_stall_s=30.0)
        specs = {m: ModelSpec(path="fake", engine="fake", pin=m in pins, devices=(devices or {}).get(m))
                 for m in weights}
        self.b = Broker(self.cfg, specs, "inc", started_at=0.0)
        self.budget = budget
        self.workers = {u.id: FakeWorker(u.id, weights[u.model_id], i) for i, u in enumerate(units_of(specs))}
        self.now = 0.0
        self.msgs: dict[str, list] = {}          # job id -> client messages, in order
        self.deadline: dict[str, float] = {}     # accepted job id -> deadline
        self.loads = 0
        self.next_id = 0
        self.last_hb = 0.0

    def send(self, event) -> None:
        for cmd in self.b.handle(event):
            self.execute(cmd)
        for d in self.b.devices():
            assert self.b.committed(d) <= self.budget, (d, self.b.committed(d), self.budget)
        for m in self.b.models.values():
            assert m.state in p.MODEL_STATES

    def execute(self, cmd) -> None:
        if isinstance(cmd, e.ToClient):
            if isinstance(cmd.msg, (p.Accepted, p.Final, p.Error, p.Partial)) and cmd.msg.id in self.msgs:
                self.msgs[cmd.msg.id].append(cmd.msg)
            return
        if not isinstance(cmd, e.ToWorker):
            return
        w = next((w for w in self.workers.values() if w.alive and w.ident == cmd.identity), None)
        msg = cmd.msg
        if isinstance(msg, p.Kill):
            w = next((w for w in self.workers.values() if w.alive and w.pid == msg.pid), None)
            if w is not None:
                self.crash(w, report=True)
            return
        if w is None:
            return
        if isinstance(msg, p.Load):
            assert w.state == "empty", f"LOAD for {w.model} while {w.state}"    # never twice at once
            self.loads += 1
            w.state = "loading"
            w.outbox.append(p.Loaded(w.model, w.weights, 0.1))
        elif isinstance(msg, p.Unload):
            assert not w.running, f"UNLOAD of {w.model} with jobs in flight {w.running}"
            if msg.then == "exit":                    # escalation of a slow unload: the process exits
                self.crash(w, report=True)
                return
            assert w.state == "loaded", w.state
            w.state = "unloading"
            w.outbox.append(p.Unloaded(w.model, w.weights))
        elif isinstance(msg, p.Job):
            assert w.state == "loaded", f"JOB to {w.model} while {w.state}"
            w.running.add(msg.id)
            if msg.params.get("stream"):
                w.outbox.append(p.WorkerPartial(msg.id, 0, {"text": "..."}))
            w.outbox.append(p.Result(msg.id, {"ok": True}, peak_mem_job=w.weights))
        elif isinstance(msg, p.JobCancel):
            if msg.id in w.running:
                w.outbox = [m for m in w.outbox if getattr(m, "id", None) != msg.id]
                w.outbox.append(p.WorkerError(msg.id, "cancelled", "cancelled"))
        elif isinstance(msg, p.BrokerDisconnect):
            self.crash(w, report=False)
            self.restart(w)

    # world actions
    def host(self, exited=()) -> None:
        workers = [{"model_id": w.model, "pid": w.pid, "state": "running"} for w in self.workers.values() if w.alive]
        self.send(e.WorkerMessage(SUP, p.Host("host", 10**9, 10**9, workers, list(exited)), [], self.now))

    def crash(self, w: FakeWorker, report: bool) -> None:
        w.alive, w.running, w.outbox, w.state = False, set(), [], "empty"
        if report:
            self.host(exited=[w.pid])

    def restart(self, w: FakeWorker) -> None:
        if w.alive:
            return
        w.gen += 1
        w.alive = True
        self.send(e.WorkerMessage(w.ident, p.Ready(w.ident.decode(), w.pid, "host", w.model,
                                                   "empty", {"max_slots": 2, "est_weights_bytes": w.weights}),
                                  [], self.now))

    def deliver(self, w: FakeWorker) -> None:
        if not (w.alive and w.outbox):
            return
        msg = w.outbox.pop(0)
        if isinstance(msg, p.Loaded):
            w.state = "loaded"
        elif isinstance(msg, p.Unloaded):
            w.state = "empty"
        elif isinstance(msg, (p.Result, p.WorkerError)):
            w.running.discard(msg.id)
        self.send(e.WorkerMessage(w.ident, msg, [], self.now))

    def submit(self, model: str, ttl_s: float, stream: bool = False) -> str:
        jid = f"j{self.next_id}"
        self.next_id += 1
        self.msgs[jid] = []
        self.send(e.ClientMessage(b"client", p.Submit(jid, model, {"n": jid, "stream": stream}, [], int(ttl_s * 1000),
                                                      stream), [], self.now))
        if self.msgs[jid] and isinstance(self.msgs[jid][0], p.Accepted):
            self.deadline[jid] = self.now + ttl_s
        return jid

    def advance(self, seconds: float) -> None:
        for _ in range(max(1, round(seconds / 0.1))):
            self.now = round(self.now + 0.1, 6)
            if self.now - self.last_hb >= 1.0:
                self.last_hb = self.now
                self.host()
                for w in self.workers.values():
                    if w.alive:
                        inflight = [{"id": j, "started_ms_ago": 10, "last_progress_ms_ago": 10} for j in w.running]
                        self.send(e.WorkerMessage(w.ident, p.Heartbeat(1, w.state, 0, inflight), [], self.now))
            self.send(e.Tick(self.now))
            self.check_deadlines()

    def check_deadlines(self, slack: float = 0.15) -> None:
        for jid, deadline in self.deadline.items():
            if self.now > deadline + slack:
                assert self.terminal(jid), f"{jid} unanswered {self.now - deadline:.2f} s after its deadline"

    def terminal(self, jid: str) -> list:
        return [m for m in self.msgs[jid] if isinstance(m, (p.Final, p.Error))]

    def play(self, actions) -> None:
        """Start every worker, do `actions` (kind, x, y) in order, then `finish`."""
        for w in self.workers.values():
            self.restart(w)
        for kind, x, y in actions:
            if kind in ("submit", "stream"):
                self.submit(x, y, stream=kind == "stream")
            elif kind == "deliver":
                for _ in range(y):
                    self.deliver(self.workers[x])
            elif kind == "advance":
                self.advance(x)
            elif kind == "crash" and self.workers[x].alive:
                self.crash(self.workers[x], report=y)
            elif kind == "restart":
                self.restart(self.workers[x])
            elif kind == "cancel":
                jid = f"j{x}"
                if jid in self.msgs:
                    self.send(e.ClientMessage(b"client", p.Cancel(jid), [], self.now))
            elif kind in ("load", "unload"):
                service = p.Q_LOAD if kind == "load" else p.Q_UNLOAD
                self.send(e.ClientMessage(b"client", p.Query(f"q-{kind}", service, {"model": x}), [], self.now))
        self.finish()

    def finish(self) -> None:
        """Let everything play out, then check the one-answer rule for every job."""
        for w in self.workers.values():
            self.restart(w)
        for _ in range(100):
            for w in self.workers.values():
                while w.alive and w.outbox:
                    self.deliver(w)
            self.advance(0.2)
        for jid, msgs in self.msgs.items():
            assert len(self.terminal(jid)) <= 1, (jid, msgs)
            if jid in self.deadline:
                assert isinstance(msgs[0], p.Accepted) and len(self.terminal(jid)) == 1, (jid, msgs)
                assert msgs[-1] is self.terminal(jid)[0], (jid, msgs)   # nothing after the answer
                if any(isinstance(m, p.Partial) for m in msgs) and isinstance(msgs[-1], p.Error):
                    assert msgs[-1].code != "worker_lost" or not msgs[-1].retryable
            else:
                assert len(msgs) == 1 and isinstance(msgs[0], p.Error), (jid, msgs)


MODELS = ("a", "b", "c")
action = st.one_of(
    st.tuples(st.just("submit"), st.sampled_from(MODELS), st.sampled_from([0.5, 2.0, 8.0])),
    st.tuples(st.just("stream"), st.sampled_from(MODELS), st.sampled_from([2.0, 8.0])),
    st.tuples(st.just("deliver"), st.sampled_from(MODELS), st.integers(1, 3)),
    st.tuples(st.just("advance"), st.sampled_from([0.1, 0.5, 1.5, 4.0]), st.just(0)),
    st.tuples(st.just("crash"), st.sampled_from(MODELS), st.booleans()),
    st.tuples(st.just("restart"), st.sampled_from(MODELS), st.just(0)),
    st.tuples(st.just("cancel"), st.integers(0, 30), st.just(0)),
    st.tuples(st.just("load"), st.sampled_from(MODELS), st.just(0)),
    st.tuples(st.just("unload"), st.sampled_from(MODELS), st.just(0)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=st.lists(action, min_size=15, max_size=60), budget=st.sampled_from([700, 1000, 1500]),
       pin_a=st.booleans())
def test_invariants_hold_over_random_event_sequences(actions, budget, pin_a):
    world = World({"a": 400, "b": 500, "c": 300}, budget, pins=("a",) if pin_a else ())
    world.play(actions)


REPLICATED = {"r": [0, 1], "s": [1]}
replica_action = st.one_of(
    st.tuples(st.just("submit"), st.sampled_from(["a", "r", "s"]), st.sampled_from([0.5, 2.0, 8.0])),
    st.tuples(st.just("deliver"), st.sampled_from(["a", "r@0", "r@1", "s@1"]), st.integers(1, 3)),
    st.tuples(st.just("advance"), st.sampled_from([0.1, 0.5, 1.5, 4.0]), st.just(0)),
    st.tuples(st.just("crash"), st.sampled_from(["a", "r@0", "r@1", "s@1"]), st.booleans()),
    st.tuples(st.just("restart"), st.sampled_from(["a", "r@0", "r@1", "s@1"]), st.just(0)),
    st.tuples(st.just("load"), st.sampled_from(["a", "r", "s"]), st.just(0)),
    st.tuples(st.just("unload"), st.sampled_from(["a", "r", "s"]), st.just(0)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=st.lists(replica_action, min_size=15, max_size=60), budget=st.sampled_from([700, 1000]))
def test_invariants_hold_with_replicas_on_two_devices(actions, budget):
    """Model "a" on device 0, "r" replicated on devices 0 and 1, "s" on device 1 only: each
    device's budget holds, nothing loads twice, and every job gets one answer."""
    world = World({"a": 400, "r": 500, "s": 300}, budget, devices=REPLICATED)
    world.play(actions)


def test_alternating_two_model_traffic_that_fits_only_one_does_not_thrash():
    world = World({"a": 600, "b": 600}, budget=1000, min_residency_s=10.0)
    for w in world.workers.values():
        world.restart(w)
    duration = 60.0
    for i in range(int(duration)):
        world.submit("a" if i % 2 == 0 else "b", 30.0)
        for _ in range(10):                                   # workers answer promptly
            for w in world.workers.values():
                while w.alive and w.outbox:
                    world.deliver(w)
            world.advance(0.1)
    world.finish()
    assert world.loads <= duration / world.cfg.min_residency_s + 2, world.loads
    finals = sum(isinstance(world.terminal(j)[0], p.Final) for j in world.deadline if world.terminal(j))
    assert finals == len(world.deadline)                  # nobody starved
