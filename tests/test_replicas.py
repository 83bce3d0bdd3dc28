"""Replicas: a model with `devices` is served by one worker per device (pure broker core; the
supervisor's side and a whole stack are at the end). Clients name the model; the broker spreads
its jobs over the loaded replicas (least busy first, a screenshot seen before back to its replica:
broker/placement.py) and keeps per device memory budgets."""
from __future__ import annotations

import base64
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from common import protocol as p
from common.config import ModelSpec, parse_config, units_of
from common.errors import ConfigError
from common.client import Client
from broker.placement import replica_rank, screen_key
from tests.rawbroker import png
from tests.stackutil import Stack, fake_model
from tests.test_broker_core import Harness, answers, of, spec
from tests.test_faults import IMG, log_on_failure, model_status, running, wait_for
from workers.supervisor import Supervisor, device_env, nvidia_gpus

R0, R1 = b"w-r0", b"w-r1"
SHOT_A, SHOT_B = b"\x89PNG screen A" * 100, b"\x89PNG screen B" * 100


class Replicated(Harness):
    """The core harness, submitting to model "r" unless told otherwise."""

    def submit(self, jid, model="r", **kw) -> list:
        return super().submit(jid, model=model, **kw)


def replicated(models=None, **cfg) -> Replicated:
    return Replicated(models or {"r": spec(devices=[0, 1])}, **cfg)


def both_loaded(h: Harness, slots: int = 2) -> None:
    h.ready(R0, "r@0", "loaded", slots=slots)
    h.ready(R1, "r@1", "loaded", slots=slots)


def both_loading_for_a_job() -> Replicated:
    """Both replicas registered empty; job j1 made both load."""
    h = replicated()
    h.ready(R0, "r@0")
    h.ready(R1, "r@1")
    h.submit("j1")
    return h


def dispatched_to(cmds, ident) -> list[str]:
    return [j.id for j in of(cmds, p.Job, ident)]


# ---- config ------------------------------------------------------------------------------------------

def test_config_names_one_unit_per_device_and_refuses_bad_devices():
    cfg = parse_config({"models": {"r": {"path": "x", "devices": [1, 0]}, "m": {"path": "y"}}})
    assert [(u.id, u.model_id, u.device) for u in units_of(cfg.models)] == [("r@1", "r", 1), ("r@0", "r", 0),
                                                                            ("m", "m", None)]
    for bad in ([], [0, 0], [-1], [64], ["0"], [True]):
        with pytest.raises(ConfigError, match="models.r.devices"):
            parse_config({"models": {"r": {"path": "x", "devices": bad}}})
    with pytest.raises(ConfigError, match="r@0"):
        parse_config({"models": {"r": {"path": "x", "devices": [0]}, "r@0": {"path": "y"}}})


def test_supervisor_puts_each_replica_on_its_device_counted_within_cuda_visible_devices(tmp_path):
    cfg = parse_config({"models": {"r": {"path": "x", "devices": [0, 2]}, "m": {"path": "y"},
                                   "off": {"path": "z", "enabled": False, "devices": [5]}}})
    sup = Supervisor(cfg, None, environ={}, gpus=4)
    assert {c.model_id: c.env for c in sup.children.values()} == {
        "r@0": {"CUDA_VISIBLE_DEVICES": "0"}, "r@2": {"CUDA_VISIBLE_DEVICES": "2"}, "m": {}}
    units = cfg.units()
    assert device_env(units["r@2"], {"CUDA_VISIBLE_DEVICES": "4, 5,6"}) == {"CUDA_VISIBLE_DEVICES": "6"}
    assert device_env(units["r@2"], {"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb,GPU-cc"}) == {"CUDA_VISIBLE_DEVICES": "GPU-cc"}
    with pytest.raises(ConfigError, match="device 2 is not among the 2"):
        Supervisor(cfg, None, environ={"CUDA_VISIBLE_DEVICES": "4,5"})
    # without CUDA_VISIBLE_DEVICES, the driver's list of GPUs decides (a missing GPU would make
    # its worker fail to import MLX, again at every restart)
    assert Supervisor(cfg, None, environ={}, gpus=3).children["r@2"].env == {"CUDA_VISIBLE_DEVICES": "2"}
    with pytest.raises(ConfigError, match="device 2, and the NVIDIA driver lists 2 GPU"):
        Supervisor(cfg, None, environ={}, gpus=2)
    listing = tmp_path / "gpus"
    assert nvidia_gpus(str(listing)) is None                  # no driver
    listing.mkdir()
    assert nvidia_gpus(str(listing)) is None                  # no GPU listed
    for bus in ("0000:18:00.0", "0000:2a:00.0"):
        (listing / bus).mkdir()
    assert nvidia_gpus(str(listing)) == 2


# ---- dispatch ----------------------------------------------------------------------------------------

def test_jobs_go_to_the_least_busy_replica():
    h = replicated()
    both_loaded(h)
    cmds = h.submit("j1", blobs=[SHOT_A]) + h.submit("j2", blobs=[SHOT_A]) + h.submit("j3", blobs=[SHOT_B])
    assert sorted([len(dispatched_to(cmds, R0)), len(dispatched_to(cmds, R1))]) == [1, 2]
    cmds = h.submit("j4", blobs=[SHOT_B])
    assert len(dispatched_to(h.log, R0)) == len(dispatched_to(h.log, R1)) == 2
    assert not of(h.submit("j5"), p.Job)                  # all four slots taken: it queues
    first = dispatched_to(h.log, R1)[0]
    cmds = h.result(R1, first)
    assert dispatched_to(cmds, R1) == ["j5"] and answers(h.log, first)


def test_a_screenshot_goes_back_to_the_replica_that_saw_it_when_both_are_idle():
    h = replicated()
    both_loaded(h)
    homes = {}
    for shot in (SHOT_A, SHOT_B, b"\x89PNG screen C" * 9000, b"\x89PNG screen D"):
        seen = set()
        for i in range(3):                                # a question at a time: both replicas idle
            jid = f"{hash(shot)}-{i}"
            cmds = h.submit(jid, blobs=[shot])
            [target] = [ident for ident in (R0, R1) if dispatched_to(cmds, ident)]
            h.result(target, jid)
            seen.add(target)
        assert len(seen) == 1                             # the same replica every time
        homes[shot] = seen.pop()
    assert set(homes.values()) == {R0, R1}               # and different screens use both


def test_a_new_screenshot_goes_to_the_least_busy_replica_the_client_sent_it_to():
    h = replicated()
    to = {R0: "tcp://127.0.0.1:7000", R1: "tcp://127.0.0.1:7001"}
    h.ready(R0, "r@0", "loaded", slots=3, jobs_to=to[R0])
    h.ready(R1, "r@1", "loaded", slots=3, jobs_to=to[R1])
    for i in range(8):                                    # new screens, a job at a time: the copy's worker,
        shot = SHOT_B + b"%d" % i                         # which their rank does not prefer
        key = screen_key(SimpleNamespace(blobs=[shot], screen_key=None))
        ident = R1 if replica_rank(key, "r@0") > replica_rank(key, "r@1") else R0
        assert dispatched_to(h.submit(f"s{i}", blobs=[shot], direct_to=to[ident]), ident) == [f"s{i}"]
        h.result(ident, f"s{i}")
    cmds = h.submit("a1", blobs=[SHOT_A], direct_to=to[R0])
    assert dispatched_to(cmds, R0) == ["a1"]
    # busier: the least busy replica all the same (the copy is dropped there, unanswered)
    assert dispatched_to(h.submit("n1", blobs=[SHOT_B + b"n1"], direct_to=to[R0]), R1) == ["n1"]
    h.result(R0, "a1")
    h.result(R1, "n1")
    # a screenshot seen before: its replica, wherever the copy went
    assert dispatched_to(h.submit("a2", blobs=[SHOT_A], direct_to=to[R1]), R0) == ["a2"]
    # an endpoint no replica has: as without one
    assert dispatched_to(h.submit("n2", blobs=[SHOT_B + b"n2"], direct_to="tcp://127.0.0.1:9"), R1) == ["n2"]


def test_a_screenshot_seen_before_waits_one_job_for_its_replica_but_not_two():
    h = replicated()
    h.ready(R0, "r@0", "loaded", slots=3)
    h.ready(R1, "r@1", "loaded", slots=3)
    cmds = h.submit("a1", blobs=[SHOT_A])
    [home] = [ident for ident in (R0, R1) if dispatched_to(cmds, ident)]
    other = R1 if home == R0 else R0
    h.result(home, "a1")
    h.submit("x1", blobs=[SHOT_B + b"1"])                 # something else runs on each replica
    h.submit("x2", blobs=[SHOT_B + b"2"])
    busy = {ident: h.b.registry.get(ident).busy for ident in (R0, R1)}
    assert busy == {R0: 1, R1: 1}
    assert dispatched_to(h.submit("a2", blobs=[SHOT_A]), home) == ["a2"]         # equal: its replica
    assert dispatched_to(h.submit("a3", blobs=[SHOT_A]), home) == ["a3"]         # one job more: still
    assert dispatched_to(h.submit("a4", blobs=[SHOT_A]), other) == ["a4"]        # two more: elsewhere
    for jid in ("a2", "a3"):
        h.result(home, jid)
    assert dispatched_to(h.submit("a5", blobs=[SHOT_A]), other) == ["a5"]        # and that is its replica now


def test_jobs_wait_for_any_replica_and_a_lost_replica_hands_its_jobs_to_the_other():
    h = both_loading_for_a_job()
    assert sorted(of(h.log, p.Load), key=lambda m: m.model_id) == [p.Load("r@0"), p.Load("r@1")]
    cmds = h.worker(R1, p.Loaded("r@1", 100, 1.0))
    assert dispatched_to(cmds, R1) == ["j1"]
    h.worker(R0, p.Loaded("r@0", 100, 1.0))
    h.host(exited=[h.pids[R1]])                          # r@1's process died with j1 on it
    assert dispatched_to(h.log, R0) == ["j1"] and h.b.jobs.get("j1").attempt == 2


def test_a_failed_replica_leaves_the_jobs_to_the_other_and_is_retried_after_a_backoff():
    h = both_loading_for_a_job()
    h.worker(R0, p.WorkerError(None, "load_failed", "no such GPU"))
    assert not answers(h.log, "j1")                       # r@1 is still loading
    assert h.b.models["r@0"].state == "failed"
    h.tick()
    assert len(of(h.log, p.Load, R0)) == 1                # not retried at once
    cmds = h.worker(R1, p.Loaded("r@1", 100, 1.0))
    assert dispatched_to(cmds, R1) == ["j1"]
    h.now += 1
    assert not of(h.submit("j2", ttl_ms=60_000), p.Load, R0)   # more demand, but within the 5 s backoff
    h.advance(4.5, alive=(R0, R1))
    assert of(h.log, p.Load, R0) == [p.Load("r@0")] * 2  # then r@0 is tried again
    h.worker(R0, p.WorkerError(None, "load_failed", "no such GPU"))
    h.worker(R1, p.WorkerError(None, "load_failed", "also gone"))   # stray: r@1 is loaded, not loading
    assert not [a for a in answers(h.log, "j2") if isinstance(a, p.Error)]
    h.submit("j3", ttl_ms=60_000)
    h.advance(9.0, alive=(R0, R1))                        # the second failure in a row: 10 s
    assert len(of(h.log, p.Load, R0)) == 2
    h.advance(1.5, alive=(R0, R1))
    assert len(of(h.log, p.Load, R0)) == 3
    h.worker(R0, p.Loaded("r@0", 100, 1.0))
    assert h.b.models["r@0"].fail_streak == 0


def test_a_failed_replica_left_alone_retries_without_waiting_for_its_backoff():
    h = both_loading_for_a_job()
    h.worker(R0, p.WorkerError(None, "load_failed", "flaky"))
    h.worker(R1, p.Loaded("r@1", 100, 1.0))
    h.now += 1
    h.query(p.Q_UNLOAD, {"model": "r"})                   # r@1 goes: nobody else serves r
    h.worker(R1, p.Unloaded("r@1", 100))
    cmds = h.submit("j2")
    assert of(cmds, p.Load, R0) == [p.Load("r@0")]


def test_jobs_fail_once_every_replica_failed_to_load():
    h = both_loading_for_a_job()
    h.worker(R0, p.WorkerError(None, "load_failed", "bad"))
    assert not answers(h.log, "j1")
    h.worker(R1, p.WorkerError(None, "load_failed", "worse"))
    [err] = answers(h.log, "j1")
    assert err.code == "load_failed" and "worse" in err.message


# ---- memory per device -------------------------------------------------------------------------------

def test_each_device_has_its_own_budget():
    h = replicated({"r": spec(devices=[0, 1]), "m": spec()}, memory_budget=1000)
    h.ready(R0, "r@0", est=700)
    h.ready(R1, "r@1", est=700)
    h.ready(b"w-m", "m", est=700)
    h.submit("j1", model="r")
    assert {l.model_id for l in of(h.log, p.Load)} == {"r@0", "r@1"}   # 1400 bytes, on two devices
    h.worker(R0, p.Loaded("r@0", 700, 1.0))
    h.worker(R1, p.Loaded("r@1", 700, 1.0))
    assert h.b.committed(0) == h.b.committed(1) == 700 and h.b.budget() == 2000
    h.result(R0, "j1")
    h.submit("j2", model="m", ttl_ms=60_000)              # device 0 is full: m waits for r@0
    assert not of(h.log, p.Load, b"w-m")
    h.advance(10.5, alive=(R0, R1, b"w-m"))               # r@0 idle past its residency: evicted
    assert of(h.log, p.Unload, R0) and not of(h.log, p.Unload, R1)
    h.worker(R0, p.Unloaded("r@0", 700))
    assert of(h.log, p.Load, b"w-m") == [p.Load("m")]


def test_a_replica_that_cannot_fit_its_device_does_not_fail_the_model():
    h = replicated({"r": spec(devices=[0, 1]), "big": spec(pin=True)}, memory_budget=1000)
    h.ready(b"w-big", "big", "loaded", est=600)           # pinned on device 0
    h.ready(R0, "r@0", est=700)
    h.ready(R1, "r@1", est=700)
    h.submit("j1", model="r")
    assert of(h.log, p.Load) == [p.Load("r@1")]           # r@0 can never fit beside `big`
    assert "on device 0" in h.b.models["r@0"].last_error
    h.worker(R1, p.Loaded("r@1", 700, 1.0))
    assert dispatched_to(h.log, R1) == ["j1"] and not [a for a in answers(h.log, "j1") if isinstance(a, p.Error)]


# ---- queries -----------------------------------------------------------------------------------------

def test_load_answers_at_the_first_replica_and_loads_all_and_unload_answers_when_all_are_gone():
    h = replicated()
    h.ready(R0, "r@0")
    h.ready(R1, "r@1")
    cmds = h.query(p.Q_LOAD, {"model": "r"})
    assert len(of(cmds, p.Load)) == 2 and not of(cmds, p.QueryReply)
    h.worker(R1, p.Loaded("r@1", 100, 1.0))
    [reply] = of(h.log, p.QueryReply)
    assert reply.data["id"] == "r" and reply.data["status"] == "loaded"
    assert [(r["device"], r["status"]) for r in reply.data["replicas"]] == [(0, "loading"), (1, "loaded")]
    h.worker(R0, p.Loaded("r@0", 100, 1.0))
    status = of(h.query(p.Q_MODELS, {"model": "r"}, qid="q2"), p.QueryReply)[0].data["models"][0]
    assert status["memory"]["weights_bytes"] == 200 and status["worker"] is None
    cmds = h.query(p.Q_UNLOAD, {"model": "r"}, qid="q3")
    assert len(of(cmds, p.Unload)) == 2
    h.worker(R0, p.Unloaded("r@0", 100))
    assert not [r for r in of(h.log, p.QueryReply) if r.id == "q3"]
    cmds = h.worker(R1, p.Unloaded("r@1", 100))
    [done] = [r for r in of(cmds, p.QueryReply) if r.id == "q3"]
    assert done.data["status"] == "unloaded"
    listing = of(h.query(p.Q_MODELS, qid="q4"), p.QueryReply)[0].data["models"]
    assert [m["id"] for m in listing] == ["r"]            # replicas are not models of their own


def test_a_replica_id_is_not_a_model_clients_can_ask_for():
    h = replicated()
    both_loaded(h)
    assert of(h.submit("j1", model="r@0"), p.Error)[0].code == "unknown_model"
    assert of(h.query(p.Q_LOAD, {"model": "r@1"}), p.Error)[0].code == "unknown_model"


# ---- the whole stack: supervisor, broker and two worker processes ------------------------------------

def test_stack_runs_one_worker_per_device_and_spreads_jobs_over_them(tmp_path):
    """Fake-engine replicas on "devices" 0 and 1 of two named GPUs: each worker process sees only
    its own, a job that holds one replica does not hold up the next, and a killed replica's work
    goes on."""
    cfg = {"models": {"r": fake_model(devices=[0, 1], max_batch=1)}, "supervisor": {"restart_backoff_s": 0.2}}
    gpus = ["GPU-test-a", "GPU-test-b"]       # any machine: no real GPU is asked for
    st = Stack(tmp_path, cfg, env={"CUDA_VISIBLE_DEVICES": ",".join(gpus)})
    with running(st, 30, ("r",)), log_on_failure(st), Client(st.client_endpoint, default_ttl_s=30) as c:
        status = wait_for(lambda: (s := model_status(st, "r"))["status"] == "loaded" and
                          all(x["status"] == "loaded" for x in s["replicas"]) and s, 10, what="both loaded")
        pids = {x["device"]: x["worker"]["pid"] for x in status["replicas"]}
        assert sorted(pids) == [0, 1] and len(set(pids.values())) == 2
        for device, pid in pids.items():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert f"CUDA_VISIBLE_DEVICES={gpus[device]}".encode() in env
        slow = c.submit("r", {"instruction": "slow", "fake": {"sleep_ms": 4000}}, [IMG])
        wait_for(lambda: any(slow.job_id in w["running"] for w in st.query(p.Q_STATS)["workers"]), 3,
                 what="the slow job runs")
        t0 = time.monotonic()
        assert c.ground("r", png(300, 200), "quick").result["points"]   # another screen: not behind it
        assert time.monotonic() - t0 < 3.0
        busy = next(x["worker"]["pid"] for x in model_status(st, "r")["replicas"] if x["inflight"])
        os.kill(busy, signal.SIGKILL)                             # the slow job's replica dies
        assert slow.result().result["points"]                     # rerun on the survivor
        assert c.ground("r", IMG, "after").result["points"]
        wait_for(lambda: all(x["status"] == "loaded" for x in model_status(st, "r")["replicas"]), 10,
                 what="the killed replica restarted and loaded")
        # the HTTP API: one model, its replicas listed; unload and load act on both
        status, _, raw = st.http("GET", "/v1/models")
        assert status == 200 and [m["id"] for m in json.loads(raw)["data"]] == ["r"]
        status, _, raw = st.http("DELETE", "/v1/models/r")
        assert status == 200 and [x["status"] for x in json.loads(raw)["replicas"]] == ["unloaded", "unloaded"]
        status, _, raw = st.http("POST", "/v1/models/r/load")
        assert status == 200 and json.loads(raw)["status"] == "loaded"
        status, _, raw = st.http("POST", "/v1/chat/completions", {"model": "r", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(IMG).decode()}},
            {"type": "text", "text": "click OK"}]}]})
        assert status == 200 and json.loads(raw)["choices"][0]["message"]["grounding"]
        wait_for(lambda: all(x["status"] == "loaded" for x in model_status(st, "r")["replicas"]), 10,
                 what="the load brought both replicas back")


def test_the_mlx_engine_refuses_replicas_off_cuda(tmp_path):
    """On the CPU (and Metal) every replica would share one memory and one compute unit, which
    per-device budgets would count twice: the load fails and says why."""
    from workers.engine import EngineOptions
    from workers.mlx.engine import MlxEngine
    engine = MlxEngine(ModelSpec(path="tiny:qwen2_vl", devices=[0]), EngineOptions("r@0", str(tmp_path), 10**8))
    with pytest.raises(RuntimeError, match="one replica per CUDA GPU.*not on CUDA"):
        engine.load()


def test_stats_and_metrics_give_each_devices_memory():
    from broker import status
    from frontend.metrics import Metrics
    h = replicated({"r": spec(devices=[0, 1]), "m": spec()}, memory_budget=1000)
    h.ready(R0, "r@0", "loaded", est=300)
    h.ready(R1, "r@1", "loaded", est=300)
    h.ready(b"w-m", "m", "loaded", est=200)
    stats = status.stats(h.b, h.now)
    assert stats["memory"] == {"budget": 2000, "committed": 800, "devices": [
        {"device": 0, "budget": 1000, "committed": 500}, {"device": 1, "budget": 1000, "committed": 300}]}
    assert stats["models"]["r"]["memory"]["weights_bytes"] == 600 and stats["models"]["r"]["state"] == "loaded"
    text = Metrics().render(stats).decode()
    assert 'grounding_device_memory_bytes{device="0",kind="committed"} 500.0' in text
    assert 'grounding_device_memory_bytes{device="1",kind="budget"} 1000.0' in text
    assert "grounding_memory_committed_bytes 800.0" in text


def test_placement_remembers_a_bounded_number_of_screenshots():
    from broker.jobs import Job
    from broker.placement import Placement, screen_key
    h = replicated()
    both_loaded(h)
    ready = [(h.b.models[u], h.b.registry.get(ident)) for u, ident in (("r@0", R0), ("r@1", R1))]
    placement = Placement(homes=2)
    jobs = [Job(f"j{i}", b"c", "r", {}, [shot], [], False, 0.0, 10.0) for i, shot in enumerate((SHOT_A, SHOT_B, SHOT_A + b"!"))]
    for job in jobs:
        placement.choose(job, ready)
    assert list(placement.homes) == [("r", screen_key(jobs[1])), ("r", screen_key(jobs[2]))]
    assert screen_key(jobs[0]) != screen_key(jobs[2])     # the last 64 KiB differ
