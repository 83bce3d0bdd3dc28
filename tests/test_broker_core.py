"""Pure broker core: routing, queues, deadlines, cancel, worker loss, poison, zombies, queries.

The core is driven with typed events and a hand-held clock; commands are inspected directly.
No sockets: tests/test_broker_server.py covers the I/O shell.
"""
from __future__ import annotations

from common import protocol as p
from common.config import BrokerConfig, ModelSpec
from broker import events as e
from broker.backend import STALL_KILL_AFTER_S
from broker.core import Broker

C1, C2 = b"client-1", b"client-2"
SUP = b"supervisor"
IMG = b"\x89PNG fake image bytes"


def spec(**kw) -> ModelSpec:
    return ModelSpec(path="fake", engine="fake", **kw)


class Harness:
    """A Broker plus a clock and helpers that speak for clients, workers and a supervisor."""

    def __init__(self, models: dict[str, ModelSpec] | None = None, **cfg):
        cfg = {"memory_budget": 1000, "min_residency_s": 10.0, "heartbeat_interval_ms": 1000,
               "heartbeat_liveness": 3, "queue_size": 4, "global_queue_size": 8, **cfg}
        self.config = BrokerConfig(**cfg)
        self.b = Broker(self.config, models or {"m": spec()}, "inc-1", wall_offset=1_000_000.0, started_at=0.0)
        self.now = 0.0
        self.log: list = []
        self.pids: dict[bytes, int] = {}

    def handle(self, event) -> list:
        cmds = self.b.handle(event)
        self.log.extend(cmds)
        return cmds

    # clock
    def tick(self, dt: float = 0.1) -> list:
        self.now += dt
        return self.handle(e.Tick(self.now))

    def advance(self, seconds: float, step: float = 0.1, alive=()) -> list:
        """Move the clock in `step`s, ticking; workers named in `alive` heartbeat at each step."""
        out = []
        for _ in range(round(seconds / step)):
            for ident in alive:
                out += self.heartbeat(ident, state=self.b.registry.get(ident).state)
            out += self.tick(step)
        return out

    # clients
    def client(self, msg, blobs=(), ident=C1) -> list:
        return self.handle(e.ClientMessage(ident, msg, list(blobs), self.now))

    def submit(self, jid, model="m", ttl_ms=10_000, ident=C1, blobs=(IMG,), stream=False, params=None,
               finishing=False, direct_to=None) -> list:
        return self.client(p.Submit(jid, model, params or {"instruction": jid}, [{"mime": "image/png", "len": 1}] * len(blobs),
                                    ttl_ms, stream, finishing=finishing, direct_to=direct_to), blobs, ident)

    def query(self, service, arg=None, ident=C1, qid="q1") -> list:
        return self.client(p.Query(qid, service, arg or {}), ident=ident)

    # workers
    def worker(self, ident: bytes, msg, blobs=()) -> list:
        return self.handle(e.WorkerMessage(ident, msg, list(blobs), self.now))

    def ready(self, ident: bytes, model="m", state="empty", est=100, slots=1, pid=None, device_mem=0,
              jobs_to=None) -> list:
        pid = pid or 1000 + len(self.pids)
        self.pids[ident] = pid
        caps = {"max_slots": slots, "max_batch": 1, "engine": "fake", "est_weights_bytes": est, "jobs_to": jobs_to}
        if device_mem:
            caps["device_mem_total"] = device_mem
        return self.worker(ident, p.Ready(ident.hex(), pid, "host", model, state, caps,
                                          weights_bytes=est if state == "loaded" else 0))

    def loaded_worker(self, ident=b"w1", model="m", est=100, slots=1) -> None:
        """A worker READY with its model already loaded."""
        self.ready(ident, model, "loaded", est, slots)

    def heartbeat(self, ident: bytes, inflight=(), state="loaded") -> list:
        return self.worker(ident, p.Heartbeat(1, state, 0, list(inflight)))

    def result(self, ident: bytes, jid: str, blobs=(), peak=0) -> list:
        return self.worker(ident, p.Result(jid, {"points": [{"x": 1, "y": 2}]}, {"total_tokens": 3}, peak_mem_job=peak),
                           blobs)

    def host(self, workers=(), exited=()) -> list:
        return self.worker(SUP, p.Host("host", 10_000, 5_000, list(workers), list(exited)))


def of(cmds, kind, ident=None) -> list:
    """Messages of type `kind` in `cmds` (optionally to `ident`)."""
    return [c.msg for c in cmds if isinstance(c, (e.ToClient, e.ToWorker)) and isinstance(c.msg, kind)
            and (ident is None or c.identity == ident)]


def cmds_to(cmds, kind, ident=None) -> list:
    return [c for c in cmds if isinstance(c, (e.ToClient, e.ToWorker)) and isinstance(c.msg, kind)
            and (ident is None or c.identity == ident)]


def answers(log, jid) -> list:
    """Terminal answers (FINAL/ERROR) sent for job `jid`."""
    return [m for m in of(log, (p.Final, p.Error)) if m.id == jid]


# ---- routing ---------------------------------------------------------------------------------------

def test_submit_is_accepted_dispatched_and_answered_with_blobs_untouched():
    h = Harness()
    h.loaded_worker()
    cmds = h.submit("j1", ttl_ms=5000)
    assert of(cmds, p.Accepted, C1) == [p.Accepted("j1", 0, "inc-1")]
    [job_cmd] = cmds_to(cmds, p.Job, b"w1")
    assert job_cmd.msg.id == "j1" and job_cmd.msg.ttl_ms == 5000 and job_cmd.msg.attempt == 1
    assert list(job_cmd.blobs) == [IMG]
    h.now += 0.25
    attn = b"\x00\x00\x80?" * 4
    cmds = h.result(b"w1", "j1", blobs=[attn])
    [final] = cmds_to(cmds, p.Final, C1)
    assert final.msg.result["points"] == [{"x": 1, "y": 2}] and list(final.blobs) == [attn]
    assert final.msg.usage == {"total_tokens": 3} and "queue" in final.msg.timings
    assert h.b.counters["jobs_completed_total"] == 1 and len(h.b.jobs) == 0


def test_job_carries_the_remaining_ttl():
    h = Harness()
    h.ready(b"w1")                                   # empty: the job waits for the load
    h.submit("j1", ttl_ms=5000)
    h.advance(1.0)
    cmds = h.worker(b"w1", p.Loaded("m", 100, 0.9))
    [job] = of(cmds, p.Job)
    assert 3900 <= job.ttl_ms <= 4000


def test_unknown_or_disabled_model_and_bad_submits_are_refused():
    h = Harness({"m": spec(), "off": spec(enabled=False)})
    assert of(h.submit("j1", model="nope"), p.Error)[0].code == "unknown_model"
    assert of(h.submit("j2", model="off"), p.Error)[0].code == "unknown_model"
    assert of(h.submit("j3", ttl_ms=0), p.Error)[0].code == "bad_request"
    bad_meta = h.client(p.Submit("j4", "m", {}, [{"mime": "image/png", "len": 1}] * 2), [IMG])
    assert of(bad_meta, p.Error)[0].code == "bad_request"
    assert not of(h.log, p.Accepted) and len(h.b.jobs) == 0


def test_credit_based_dispatch_respects_free_slots():
    h = Harness()
    h.loaded_worker(slots=2)
    sent = []
    for i in range(4):
        sent += of(h.submit(f"j{i}"), p.Job)
    assert [j.id for j in sent] == ["j0", "j1"]
    assert of(h.result(b"w1", "j0"), p.Job)[0].id == "j2"
    assert of(h.result(b"w1", "j1"), p.Job)[0].id == "j3"


def test_queue_full_per_model_and_global_answers_overloaded_with_retry_after():
    h = Harness({"a": spec(), "b": spec()}, queue_size=2, global_queue_size=3, retry_after_ms=700)
    for i in range(2):
        assert of(h.submit(f"a{i}", model="a"), p.Accepted)
    [err] = of(h.submit("a2", model="a"), p.Error)
    assert (err.code, err.retryable, err.retry_after_ms) == ("overloaded", True, 700)
    assert of(h.submit("b0", model="b"), p.Accepted)
    [err] = of(h.submit("b1", model="b"), p.Error)
    assert err.code == "overloaded" and "global" in err.message


def test_duplicate_submit_is_reacked_not_requeued_and_foreign_id_reuse_is_refused():
    h = Harness()
    h.submit("j1")
    again = h.submit("j1")
    assert of(again, p.Accepted) == [p.Accepted("j1", 0, "inc-1")]
    assert h.b.jobs.queue_depth("m") == 1
    [err] = of(h.submit("j1", ident=C2), p.Error)
    assert err.code == "bad_request" and err.id == "j1"
    assert h.b.jobs.get("j1").client == C1


# ---- deadlines and cancel ---------------------------------------------------------------------------

def test_deadline_while_queued():
    h = Harness()
    h.submit("j1", ttl_ms=1000)
    assert not answers(h.advance(0.9), "j1")
    [err] = answers(h.advance(0.2), "j1")
    assert err.code == "deadline_exceeded"
    h.advance(2)
    assert len(answers(h.log, "j1")) == 1


def test_deadline_while_dispatched_cancels_on_the_worker_and_drops_its_late_answer():
    h = Harness()
    h.loaded_worker()
    h.submit("j1", ttl_ms=500)
    h.submit("j2", ttl_ms=10_000)
    cmds = h.advance(0.6)
    assert of(cmds, p.JobCancel, b"w1") == [p.JobCancel("j1")]
    assert [m.code for m in answers(cmds, "j1")] == ["deadline_exceeded"]
    assert not of(cmds, p.Job)                      # the cancelled job still holds the slot
    cmds = h.result(b"w1", "j1")                    # the worker finished anyway
    assert not answers(cmds, "j1") and h.b.counters["late_results_dropped_total"] == 1
    assert [j.id for j in of(cmds, p.Job)] == ["j2"]  # slot freed by its answer


def test_cancelled_slot_is_freed_when_heartbeat_no_longer_lists_the_job():
    h = Harness()
    h.loaded_worker()
    h.submit("j1")
    h.submit("j2")
    h.client(p.Cancel("j1"))
    h.advance(1.1)
    cmds = h.heartbeat(b"w1", inflight=[])
    assert [j.id for j in of(cmds, p.Job)] == ["j2"]


def test_cancel_queued_and_dispatched_jobs():
    h = Harness()
    h.loaded_worker()
    h.submit("run")
    h.submit("wait")
    cmds = h.client(p.Cancel("wait", "client_disconnect"))
    assert [m.code for m in answers(cmds, "wait")] == ["cancelled"] and h.b.jobs.queue_depth("m") == 0
    cmds = h.client(p.Cancel("run", "user"), ident=C2)   # not C2's job: ignored
    assert cmds == []
    cmds = h.client(p.Cancel("run"))
    assert of(cmds, p.JobCancel, b"w1") == [p.JobCancel("run")]
    assert [m.code for m in answers(cmds, "run")] == ["cancelled"]
    assert h.client(p.Cancel("run")) == []               # idempotent
    h.worker(b"w1", p.WorkerError("run", "cancelled", "stopped"))
    assert len(answers(h.log, "run")) == 1


# ---- worker loss -------------------------------------------------------------------------------------

def test_worker_lost_requeues_once_at_the_head_then_a_second_crash_is_poison():
    h = Harness()
    h.host()
    h.loaded_worker(b"w1")
    h.submit("j1")
    h.submit("j2")
    h.host(exited=[h.pids[b"w1"]])                        # crash (supervisor exit report)
    assert h.b.jobs.get("j1").attempt == 2 and [j.id for j in h.b.jobs.queued("m")] == ["j1", "j2"]
    cmds = h.ready(b"w2", state="loaded")
    [job] = of(cmds, p.Job, b"w2")
    assert (job.id, job.attempt) == ("j1", 2)
    cmds = h.handle(e.SendFailed(b"w2", e.WORKER, h.now))  # crash again (EHOSTUNREACH)
    [err] = answers(cmds, "j1")
    assert err.code == "worker_crash_poison" and not err.retryable
    assert h.b.counters["poison_requests_total"] == 1
    h.ready(b"w3", state="loaded")
    again = h.submit("j1-again", params={"instruction": "j1"})
    assert of(again, p.Error)[0].code == "worker_crash_poison"
    assert of(h.submit("other"), p.Accepted)
    h.advance(601, step=1.0)                              # poison_ttl_s passed
    h.loaded_worker(b"w4")
    assert of(h.submit("j1-later", params={"instruction": "j1"}), p.Accepted)


def test_orderly_disconnects_requeue_without_counting_toward_poison():
    h = Harness()
    h.loaded_worker(b"w1")
    h.submit("j1")
    h.worker(b"w1", p.WorkerDisconnect("shutdown"))
    h.ready(b"w2", state="loaded")
    h.worker(b"w2", p.WorkerDisconnect("shutdown"))
    assert not answers(h.log, "j1") and h.b.jobs.get("j1").deaths == 0
    h.ready(b"w3", state="loaded")
    assert isinstance(answers(h.result(b"w3", "j1"), "j1")[0], p.Final)


def test_worker_lost_after_streaming_is_not_retried():
    h = Harness()
    h.loaded_worker(b"w1")
    h.submit("s1", stream=True)
    cmds = h.worker(b"w1", p.WorkerPartial("s1", 0, {"text": "pyautogui"}))
    assert of(cmds, p.Partial, C1) == [p.Partial("s1", 0, {"text": "pyautogui"})]
    h.advance(3.2)                                        # heartbeats stop: lost after 3 s
    [err] = answers(h.log, "s1")
    assert err.code == "worker_lost" and not err.retryable


def test_partials_of_non_streaming_jobs_are_not_forwarded_and_keep_the_retry():
    h = Harness()
    h.loaded_worker(b"w1")
    h.submit("j1")
    assert not of(h.worker(b"w1", p.WorkerPartial("j1", 0, {})), p.Partial)
    h.worker(b"w1", p.WorkerDisconnect("x"))
    assert h.b.jobs.get("j1").attempt == 2


def test_finishing_reaches_the_clients_that_asked_and_is_otherwise_dropped_without_consequence():
    h = Harness({"m": spec(), "m2": spec()})
    h.loaded_worker(b"w1", slots=3)
    h.loaded_worker(b"w2", model="m2")
    h.submit("a", finishing=True)
    h.submit("b", finishing=True, ident=C2)
    h.submit("c")                                          # did not ask
    h.submit("d", finishing=True)                          # queued: w1 has three slots
    h.submit("x", model="m2", finishing=True)              # on the other worker
    assert [h.b.jobs.get(j).worker for j in "abcdx"] == [b"w1", b"w1", b"w1", None, b"w2"]
    cmds = h.worker(b"w1", p.WorkerFinishing(ids=[*"abcdx", "gone", 7]))
    sent = [(c.identity, c.msg) for c in cmds if isinstance(c, e.ToClient)]
    assert sent == [(C1, p.Finishing("a")), (C2, p.Finishing("b"))]
    assert not cmds_to(cmds, p.BrokerDisconnect)           # advisory: no zombie treatment of x
    assert h.b.registry.get(b"w1") is not None and h.b.jobs.get("x").worker == b"w2"
    for j in "abc":                                        # the answers still come, one each
        h.result(b"w1", j)
        assert [type(m) for m in answers(h.log, j)] == [p.Final]
    late = h.worker(b"w1", p.WorkerFinishing(ids=["a"]))   # after its answer: dropped
    assert not [c for c in late if isinstance(c, e.ToClient)]


def test_direct_answer_endpoints_reach_the_worker_and_others_are_refused():
    h = Harness()
    h.loaded_worker(b"w1", slots=4)
    ok = ["tcp://127.0.0.1:5999", "tcp://[::1]:5999", "ipc:///tmp/x.sock"]
    for i, endpoint in enumerate(ok):
        h.client(p.Submit(f"ok{i}", "m", {"instruction": "x"}, [{"mime": "image/png", "len": 1}],
                          answer_to=endpoint, answer_host="h1"), [IMG])
    jobs = [m for m in of(h.log, p.Job, b"w1")]
    assert [(j.answer_to, j.answer_host) for j in jobs] == [(ep, "h1") for ep in ok]
    h.submit("plain")
    assert of(h.log, p.Job, b"w1")[-1].answer_to is None
    bad = [("tcp://10.0.0.7:5999", "h1"), ("tcp://localhost:5999", "h1"), ("inproc://x", "h1"),
           ("tcp://127.0.0.1:5999;10.0.0.7:5999", "h1"), ("tcp://127.0.0.1:0;10.0.0.7:5999", "h1"),
           ("tcp://127.0.0.1:", "h1"), ("ipc://", "h1"), ("tcp://127.0.0.1:5999 ", "h1"),
           ("tcp://127.0.0.1:" + "9" * 300, "h1"), ("tcp://127.0.0.1:5999", None), ("tcp://127.0.0.1:5999", "")]
    for i, (endpoint, host) in enumerate(bad):
        h.client(p.Submit(f"bad{i}", "m", {"instruction": "x"}, answer_to=endpoint, answer_host=host))
        [err] = answers(h.log, f"bad{i}")
        assert err.code == "bad_request" and "answer_to" in err.message
    assert len(of(h.log, p.Job, b"w1")) == 4 and len(h.b.jobs) == 4


def test_heartbeat_loss_is_detected_after_liveness_window_only():
    h = Harness()
    h.loaded_worker(b"w1")
    h.submit("j1")
    h.advance(2.9)
    assert h.b.registry.get(b"w1") is not None
    h.advance(0.2)
    assert h.b.registry.get(b"w1") is None and h.b.jobs.get("j1").attempt == 2


def test_heartbeats_keep_a_worker_alive_and_broker_heartbeats_go_out():
    h = Harness()
    h.loaded_worker(b"w1")
    for _ in range(10):
        cmds = h.advance(1.0)
        assert of(cmds, p.BrokerHeartbeat, b"w1")
        h.heartbeat(b"w1")
    assert h.b.registry.get(b"w1") is not None


def test_zombie_result_is_dropped_counted_and_its_sender_disconnected():
    h = Harness()
    h.loaded_worker(b"w1")
    h.submit("j1")
    h.advance(3.2)                                        # w1 frozen: declared lost, j1 requeued
    h.ready(b"w2", state="loaded")
    cmds = h.result(b"w1", "j1")                          # SIGCONT: its late result
    assert not answers(cmds, "j1")
    assert of(cmds, p.BrokerDisconnect, b"w1") and h.b.counters["zombie_results_dropped_total"] == 1
    [final] = answers(h.result(b"w2", "j1"), "j1")
    assert isinstance(final, p.Final)
    assert len(answers(h.log, "j1")) == 1


def test_send_failure_to_a_worker_loses_it_and_to_a_client_drops_its_jobs():
    h = Harness()
    h.loaded_worker(b"w1", slots=2)
    h.submit("a", ident=C1)
    h.submit("b", ident=C2)
    cmds = h.handle(e.SendFailed(C1, e.CLIENT, h.now))
    assert of(cmds, p.JobCancel, b"w1") == [p.JobCancel("a")] and h.b.jobs.get("a") is None
    h.handle(e.SendFailed(b"w1", e.WORKER, h.now))
    assert h.b.registry.get(b"w1") is None and h.b.jobs.get("b").attempt == 2


def test_supervisor_exit_report_loses_the_worker_at_once():
    h = Harness()
    h.loaded_worker(b"w1")
    h.submit("j1")
    h.host(workers=[{"model_id": "m", "pid": h.pids[b"w1"], "state": "running"}])
    assert h.b.registry.get(b"w1") is not None
    h.host(exited=[h.pids[b"w1"]])
    assert h.b.registry.get(b"w1") is None and h.b.models["m"].charge == 0


def test_a_new_ready_for_the_same_model_replaces_the_old_worker():
    h = Harness()
    h.loaded_worker(b"w1")
    h.submit("j1")
    h.ready(b"w2", state="loaded")
    assert h.b.registry.get(b"w1") is None and h.b.registry.for_model("m").identity == b"w2"
    assert h.b.jobs.get("j1").worker == b"w2"


def test_unknown_peer_is_told_to_reregister_at_most_once_a_second():
    h = Harness()
    assert of(h.heartbeat(b"ghost"), p.BrokerDisconnect, b"ghost")
    assert not of(h.heartbeat(b"ghost"), p.BrokerDisconnect)
    h.advance(1.1)
    assert of(h.heartbeat(b"ghost"), p.BrokerDisconnect)
    assert of(h.ready(b"stray", model="nope"), p.BrokerDisconnect, b"stray")


def test_worker_job_error_is_forwarded_with_its_code():
    h = Harness()
    h.loaded_worker(b"w1")
    h.submit("j1")
    [err] = answers(h.worker(b"w1", p.WorkerError("j1", "invalid_image", "not an image")), "j1")
    assert (err.code, err.message) == ("invalid_image", "not an image")
    h.submit("j2")
    [err] = answers(h.worker(b"w1", p.WorkerError("j2", "weird_code", "?")), "j2")
    assert err.code == "internal"


def test_fatal_worker_error_loses_the_worker():
    h = Harness()
    h.loaded_worker(b"w1", slots=2)
    h.submit("j1")
    h.submit("j2")
    h.worker(b"w1", p.WorkerError("j1", "internal", "engine broke", fatal=True))
    assert answers(h.log, "j1")[0].code == "internal"
    assert h.b.registry.get(b"w1") is None and h.b.jobs.get("j2").attempt == 2


# ---- watchdog ----------------------------------------------------------------------------------------

def test_stalled_job_is_cancelled_then_its_worker_killed_then_retried():
    h = Harness(job_stall_s=2.0)
    h.host()
    h.loaded_worker(b"w1")
    h.submit("j1")
    cmds = h.heartbeat(b"w1", inflight=[{"id": "j1", "started_ms_ago": 1500, "last_progress_ms_ago": 1500}])
    assert not of(cmds, p.JobCancel)
    cmds = h.heartbeat(b"w1", inflight=[{"id": "j1", "started_ms_ago": 2500, "last_progress_ms_ago": 2500}])
    assert of(cmds, p.JobCancel, b"w1") == [p.JobCancel("j1")]
    kills = []
    for _ in range(int(STALL_KILL_AFTER_S) + 1):
        kills += of(h.advance(1.0), p.Kill, SUP)
        h.heartbeat(b"w1", inflight=[{"id": "j1", "started_ms_ago": 9000, "last_progress_ms_ago": 9000}])
    assert kills == [p.Kill(h.pids[b"w1"], 9, "job j1 stalled and ignored its cancel")]
    assert not answers(h.log, "j1")
    h.host(exited=[h.pids[b"w1"]])                        # the supervisor killed it
    assert h.b.jobs.get("j1").attempt == 2


def test_stalled_job_that_honours_its_cancel_gets_deadline_exceeded():
    h = Harness(job_stall_s=2.0)
    h.loaded_worker(b"w1")
    h.submit("j1")
    h.heartbeat(b"w1", inflight=[{"id": "j1", "started_ms_ago": 2500, "last_progress_ms_ago": 2500}])
    [err] = answers(h.worker(b"w1", p.WorkerError("j1", "cancelled", "cancelled")), "j1")
    assert err.code == "deadline_exceeded" and "watchdog" in err.message


# ---- malformed input ---------------------------------------------------------------------------------

def test_bad_client_message_is_answered_bad_request_with_its_job_id():
    from common.wire import ProtocolError
    h = Harness()
    cmds = h.handle(e.ClientBadMessage(C1, ProtocolError("bad_field", "Submit.ttl_ms has type str", "j9"), h.now))
    [err] = of(cmds, p.Error, C1)
    assert (err.id, err.code) == ("j9", "bad_request")
    assert h.b.counters["decode_errors_total.client"] == 1


def test_malformed_answer_from_the_assignee_fails_the_job_instead_of_hanging_it():
    from common.wire import ProtocolError
    h = Harness()
    h.loaded_worker(b"w1")
    h.submit("j1")
    h.handle(e.WorkerBadMessage(b"w1", ProtocolError("bad_field", "Result.result has type int", "j1"), h.now))
    assert answers(h.log, "j1")[0].code == "internal"
    assert h.b.counters["decode_errors_total.worker"] == 1


# ---- queries ---------------------------------------------------------------------------------------------

def test_ping_pong_carries_the_incarnation():
    h = Harness()
    assert of(h.client(p.Ping(7)), p.Pong) == [p.Pong(7, "inc-1")]


def test_mmi_models_status_objects_and_filter():
    h = Harness({"m": spec(pin=True), "x": spec(enabled=False)})
    h.loaded_worker(b"w1", est=300)
    h.submit("j1")
    h.now = 5.0
    [reply] = of(h.query(p.Q_MODELS), p.QueryReply)
    assert [m["id"] for m in reply.data["models"]] == ["m", "x"]
    m = reply.data["models"][0]
    assert set(m) >= {"id", "object", "status", "enabled", "pinned", "engine", "memory", "last_used", "loaded_at",
                      "load_seconds", "last_error", "failures", "queue_depth", "inflight", "worker"}
    assert (m["status"], m["pinned"], m["inflight"], m["queue_depth"]) == ("loaded", True, 1, 0)
    assert set(m["memory"]) >= {"weights_bytes", "active_bytes", "peak_bytes", "cache_bytes"}
    assert m["memory"]["weights_bytes"] == 300 and m["loaded_at"] == 1_000_000.0
    assert m["worker"] == {"pid": h.pids[b"w1"], "uid": b"w1".hex(), "state": "loaded"}
    [reply] = of(h.query(p.Q_MODELS, {"model": "x"}), p.QueryReply)
    assert reply.data["models"][0]["status"] == "unloaded" and reply.data["models"][0]["worker"] is None
    [err] = of(h.query(p.Q_MODELS, {"model": "nope"}), p.Error)
    assert (err.id, err.code) == ("q1", "unknown_model")
    assert of(h.query("mmi.nope"), p.Error)[0].code == "bad_request"


def test_mmi_stats_shape():
    h = Harness(memory_budget=5000)
    h.loaded_worker(b"w1", est=300)
    h.submit("j1")
    [reply] = of(h.query(p.Q_STATS), p.QueryReply)
    d = reply.data
    assert d["incarnation"] == "inc-1" and d["memory"] == {"budget": 5000, "committed": 300}
    assert d["models"]["m"]["inflight"] == 1 and d["counters"]["jobs_accepted_total"] == 1
    assert d["workers"][0]["model_id"] == "m"


# ---- shutdown ------------------------------------------------------------------------------------------

def test_graceful_shutdown_refuses_new_jobs_and_lets_dispatched_ones_finish():
    h = Harness()
    h.loaded_worker(b"w1")
    h.submit("run")
    h.handle(e.Shutdown(h.now))
    assert not h.b.drained
    [err] = of(h.submit("late"), p.Error)
    assert (err.code, err.retryable) == ("overloaded", True) and err.retry_after_ms
    h.result(b"w1", "run")
    assert isinstance(answers(h.log, "run")[0], p.Final) and h.b.drained


def test_forced_shutdown_answers_every_live_job():
    h = Harness()
    h.loaded_worker(b"w1")
    h.submit("run")
    h.submit("queued")
    h.handle(e.Shutdown(h.now))
    cmds = h.handle(e.Shutdown(h.now, force=True))
    assert {m.id: m.code for m in of(cmds, p.Error)} == {"run": "broker_unavailable", "queued": "broker_unavailable"}
    assert of(cmds, p.JobCancel, b"w1") == [p.JobCancel("run")] and h.b.drained
