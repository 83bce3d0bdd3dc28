"""The worker process (`python -m workers`) against a raw ROUTER speaking common.wire."""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import struct
import time

import pytest
import zmq

from common import protocol as p
from common import wire
from common.zmqutil import free_tcp_endpoint, make_socket
from tests.rawbroker import RawBroker, fake_spec, png, spawn, stop, write_config
from workers.direct_answers import SEND_HWM

IMG = png(640, 480)


@pytest.fixture
def broker():
    b = RawBroker()
    yield b
    b.close()


def start(tmp_path, rb, spec=None, model="m1", **sections):
    cfg = write_config(tmp_path, rb.endpoint, {model: spec or fake_spec()}, **sections)
    proc = spawn("-m", "workers", "--config", str(cfg), "--model", model)
    return proc


def loaded(broker, model="m1"):
    ident, ready, _ = broker.expect(p.Ready)
    broker.send(ident, p.Load(model_id=model))
    broker.expect(p.Loaded)
    broker.expect(p.Memory)
    return ident, ready


def job(jid, instruction="click the OK button", blobs=(IMG,), ttl_ms=10_000, **params):
    return p.Job(id=jid, params={"instruction": instruction, **params}, ttl_ms=ttl_ms), list(blobs)


def answer(broker, timeout_s=5.0):
    _, msg, blobs = broker.expect((p.Result, p.WorkerError), timeout_s, ignore=(p.Memory, p.Loaded))
    return msg, blobs


@pytest.fixture
def proc_list():
    procs = []
    yield procs
    for proc in procs:
        stop(proc)


def test_ready_load_and_grounding_result(tmp_path, broker, proc_list):
    proc_list.append(start(tmp_path, broker))
    ident, ready, _ = broker.expect(p.Ready)
    assert ident.startswith(b"w:") and len(ident) == 18
    assert ready.model_id == "m1" and ready.state == "empty" and ready.pid == proc_list[0].pid
    caps = ready.capabilities
    assert caps["max_batch"] == 4 and caps["max_slots"] >= 4 and caps["engine"] == "fake"
    assert caps["est_weights_bytes"] == 100_000_000
    broker.send(ident, p.Load(model_id="m1"))
    _, ld, _ = broker.expect(p.Loaded)
    assert ld.weights_bytes == 100_000_000 and ld.mem["weights"] == 100_000_000
    _, mem, _ = broker.expect(p.Memory)
    assert mem.reason == "after_load"

    points = []
    for jid in ("a", "b"):
        msg, blobs = job(jid, return_attention=True)
        broker.send(ident, msg, blobs)
        res, out = answer(broker)
        assert isinstance(res, p.Result) and res.id == jid, res
        r = res.result
        assert r["image_size"] == [640, 480] and r["resized_size"] == [644, 476] and r["grid"] == [17, 23]
        assert r["attention_blob"] == 0 and len(out) == 1 and len(out[0]) == 17 * 23 * 4
        att = struct.unpack(f"<{17 * 23}f", out[0])
        assert max(att) > 0
        assert len(r["points"]) == 3 and r["points"][0]["score"] >= r["points"][1]["score"]
        for pt in r["points"]:
            assert 0 <= pt["x"] < 640 and 0 <= pt["y"] < 480 and 0 < pt["nx"] < 1 and 0 < pt["ny"] < 1
        assert res.usage["image_tokens"] == 17 * 23
        assert {"queue", "preprocess", "forward", "total"} <= set(res.timings)
        assert res.peak_mem_job >= 100_000_000
        points.append(r["points"])
    assert points[0] == points[1]   # deterministic for one instruction

    msg, blobs = job("c", instruction="open the settings menu", topk=1)
    broker.send(ident, msg, blobs)
    res, out = answer(broker)
    assert len(res.result["points"]) == 1 and res.result["points"] != points[0][:1] and out == []

    # heartbeats carry state and free slots
    _, hb, _ = broker.recv(skip_heartbeats=False, timeout_s=3)
    assert isinstance(hb, p.Heartbeat) and hb.state == "loaded" and hb.free_slots == caps["max_slots"]


def test_job_errors_and_bad_frames(tmp_path, broker, proc_list):
    proc_list.append(start(tmp_path, broker, server={"max_image_pixels": 1_000_000}))
    ident, _, _ = broker.expect(p.Ready)
    msg, blobs = job("early")
    broker.send(ident, msg, blobs)
    res, _ = answer(broker)
    assert res.code == "model_unavailable"
    broker.send(ident, p.Load(model_id="m1"))
    broker.expect(p.Loaded)
    # garbage from the "broker" is counted and dropped, never fatal
    broker.send_raw(ident, [b"XXXX", b"\x11", b"\x80"])
    broker.send_raw(ident, [b"VLW1", b"\x11", b"\xc1\xc1"])
    broker.send_raw(ident, [b"VLW1"])
    cases = [
        (job("notimg", blobs=(b"hello world",)), "invalid_image"),
        (job("trunc", blobs=(IMG[:20],)), "invalid_image"),
        (job("big", blobs=(png(1200, 1000),)), "payload_too_large"),
        (job("noinstr", instruction=""), "bad_request"),
        (job("twoimg", blobs=(IMG, IMG)), "bad_request"),
        (job("fail", fake={"fail": "overloaded"}), "overloaded"),
        (job("failx", fake={"fail": "whatever"}), "internal"),
    ]
    for (msg, blobs), code in cases:
        broker.send(ident, msg, blobs)
        res, _ = answer(broker)
        assert isinstance(res, p.WorkerError) and res.id == msg.id and res.code == code, res
    msg, blobs = job("ok")
    broker.send(ident, msg, blobs)
    res, _ = answer(broker)
    assert isinstance(res, p.Result) and res.id == "ok"
    assert proc_list[0].poll() is None


def test_batching_cancel_and_progress(tmp_path, broker, proc_list):
    proc_list.append(start(tmp_path, broker, spec=fake_spec(latency_ms=300, max_batch=2)))
    ident, _ = loaded(broker)
    for i in range(4):
        msg, blobs = job(f"j{i}")
        broker.send(ident, msg, blobs)
    time.sleep(0.1)
    broker.send(ident, p.JobCancel(id="j3"))     # still queued behind the first batch
    got = {}
    for _ in range(4):
        res, _ = answer(broker)
        got[res.id] = res
    assert isinstance(got["j3"], p.WorkerError) and got["j3"].code == "cancelled"
    batches = sorted(got[f"j{i}"].timings["batch"] for i in range(3))
    assert batches[-1] == 2   # at least one batch ran two jobs together

    # a job stuck in compute: heartbeats keep coming and show its progress age growing
    msg, blobs = job("stuck", fake={"hang_s": 1.5})
    broker.send(ident, msg, blobs)
    ages = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and len(ages) < 2:
        _, hb, _ = broker.recv(skip_heartbeats=False, timeout_s=2)
        if isinstance(hb, p.Heartbeat) and hb.inflight:
            ages.append(hb.inflight[0]["last_progress_ms_ago"])
            assert hb.inflight[0]["id"] == "stuck" and hb.free_slots == 3
    assert len(ages) == 2 and ages[1] > ages[0] >= 0
    broker.send(ident, p.JobCancel(id="stuck"))
    res, _ = answer(broker)
    assert res.id == "stuck" and res.code == "cancelled"


def test_deadline_in_worker_queue(tmp_path, broker, proc_list):
    proc_list.append(start(tmp_path, broker, spec=fake_spec(max_batch=1)))
    ident, _ = loaded(broker)
    msg, blobs = job("slow", fake={"sleep_ms": 400})
    broker.send(ident, msg, blobs)
    msg, blobs = job("late", ttl_ms=100)
    broker.send(ident, msg, blobs)
    got = {}
    for _ in range(2):
        res, _ = answer(broker)
        got[res.id] = res
    assert isinstance(got["slow"], p.Result) and got["late"].code == "deadline_exceeded"


def test_reconnect_keeps_model_and_drops_stale_results(tmp_path, broker, proc_list):
    proc_list.append(start(tmp_path, broker, broker={"heartbeat_interval_ms": 200}))
    ident, _ = loaded(broker)
    # BrokerDisconnect: new identity, READY with the model still loaded, no reload
    msg, blobs = job("old", fake={"sleep_ms": 500})
    broker.send(ident, msg, blobs)
    time.sleep(0.1)
    broker.send(ident, p.BrokerDisconnect(reason="test"))
    ident2, ready, _ = broker.expect(p.Ready)
    assert ident2 != ident and ready.state == "loaded" and ready.weights_bytes == 100_000_000
    assert broker.quiet(0.8) == []   # the old job's result is dropped, not sent on the new link
    # broker silence (3 intervals): the worker re-registers by itself
    broker.auto_heartbeat = False
    t0 = time.monotonic()
    ident3, ready, _ = broker.expect(p.Ready, timeout_s=3)
    assert ident3 not in (ident, ident2) and ready.state == "loaded"
    assert 0.4 < time.monotonic() - t0 < 1.5
    broker.auto_heartbeat = True
    msg, blobs = job("new")
    broker.send(ident3, msg, blobs)
    res, _ = answer(broker)
    assert isinstance(res, p.Result) and res.id == "new"


def test_unload_load_cycle_and_load_failure(tmp_path, broker, proc_list):
    models = {"m1": fake_spec(), "bad": fake_spec(fail_load="weights file missing")}
    cfg = write_config(tmp_path, broker.endpoint, models)
    proc_list.append(spawn("-m", "workers", "--config", str(cfg), "--model", "m1"))
    proc_list.append(spawn("-m", "workers", "--config", str(cfg), "--model", "bad"))
    idents = {}
    for _ in range(2):
        ident, ready, _ = broker.expect(p.Ready)
        idents[ready.model_id] = ident
    broker.send(idents["bad"], p.Load(model_id="bad"))
    _, err, _ = broker.expect(p.WorkerError)
    assert err.id is None and err.code == "load_failed" and "weights file missing" in err.message
    broker.send(idents["m1"], p.Load(model_id="other"))
    _, err, _ = broker.expect(p.WorkerError)
    assert err.code == "load_failed" and "other" in err.message

    broker.send(idents["m1"], p.Load(model_id="m1"))
    broker.expect(p.Loaded)
    broker.send(idents["m1"], p.Unload(model_id="m1"))
    _, un, _ = broker.expect(p.Unloaded, ignore=(p.Memory,))
    assert un.released_bytes == 100_000_000 and un.mem["active"] == 0
    msg, blobs = job("x")
    broker.send(idents["m1"], msg, blobs)
    res, _ = answer(broker)
    assert res.code == "model_unavailable"
    broker.send(idents["m1"], p.Load(model_id="m1"))
    broker.expect(p.Loaded, ignore=(p.Memory,))
    broker.send(idents["m1"], p.Unload(model_id="m1", then="exit"))
    broker.expect(p.Unloaded, ignore=(p.Memory,))
    broker.expect(p.WorkerDisconnect, ignore=(p.Memory,))
    assert proc_list[0].wait(5) == 0


def test_sigterm_finishes_inflight_then_leaves(tmp_path, broker, proc_list):
    proc = start(tmp_path, broker)
    proc_list.append(proc)
    ident, _ = loaded(broker)
    msg, blobs = job("inflight", fake={"sleep_ms": 600})
    broker.send(ident, msg, blobs)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    msg, blobs = job("too-late")       # arrives while draining: not started, left to the broker
    broker.send(ident, msg, blobs)
    res, _ = answer(broker)
    assert isinstance(res, p.Result) and res.id == "inflight"
    broker.expect(p.Unloaded, ignore=(p.Memory,))
    broker.expect(p.WorkerDisconnect, ignore=(p.Memory,))
    assert proc.wait(5) == 0


def test_crash_knob_exits_without_answer(tmp_path, broker, proc_list):
    proc = start(tmp_path, broker)
    proc_list.append(proc)
    ident, _ = loaded(broker)
    msg, blobs = job("boom", fake={"crash": True})
    broker.send(ident, msg, blobs)
    assert proc.wait(5) == 1
    assert broker.quiet(0.2) == []


def test_bad_model_id_exits_2(tmp_path, broker):
    proc = start(tmp_path, broker, model="m1")
    stop(proc)
    cfg = tmp_path / "config.yaml"
    bad = spawn("-m", "workers", "--config", str(cfg), "--model", "nope")
    try:
        assert bad.wait(20) == 2
        err = bad.stderr.read().strip()
        assert len(err.splitlines()) == 1 and "nope" in err
    finally:
        stop(bad)


def test_load_and_unload_overlapping_keep_their_order(tmp_path, broker, proc_list):
    proc_list.append(start(tmp_path, broker, spec=fake_spec(load_s=0.3)))
    ident, _, _ = broker.expect(p.Ready)
    broker.send(ident, p.Load(model_id="m1"))
    broker.send(ident, p.Load(model_id="m1"))        # duplicate while loading: one load
    broker.send(ident, p.Unload(model_id="m1"))      # while loading: runs after the load
    got = [type(m).__name__ for m in _models_msgs(broker, 2)]
    assert got == ["Loaded", "Unloaded"], got
    broker.send(ident, p.Load(model_id="m1"))
    broker.expect(p.Loaded, ignore=(p.Memory,))
    broker.send(ident, p.Unload(model_id="m1"))
    broker.send(ident, p.Load(model_id="m1"))        # while unloading: loads again afterwards
    got = [type(m).__name__ for m in _models_msgs(broker, 2)]
    assert got == ["Unloaded", "Loaded"], got
    msg, blobs = job("after")
    broker.send(ident, msg, blobs)
    res, _ = answer(broker)
    assert isinstance(res, p.Result)
    assert not [m for _, m, _ in broker.quiet(0.4) if not isinstance(m, p.Memory)]   # no extra load


def _models_msgs(broker, n):
    out = []
    while len(out) < n:
        _, msg, _ = broker.recv()
        if not isinstance(msg, p.Memory):
            out.append(msg)
    return out


def test_mlx_kernel_cache_goes_to_our_cache_folder_unless_chosen(tmp_path, monkeypatch):
    from workers.__main__ import keep_kernel_cache
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    keep_kernel_cache(str(tmp_path))
    chosen = os.environ["MLX_PTX_CACHE_DIR"]
    assert chosen.startswith(str(tmp_path / "mlx-kernels")) and not chosen.startswith("/tmp/mlx")
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", "/elsewhere")
    keep_kernel_cache(str(tmp_path))
    assert os.environ["MLX_PTX_CACHE_DIR"] == "/elsewhere"


@pytest.mark.parametrize("finishing", [True, False])
def test_finishing_goes_out_once_per_batch_before_its_answers_unless_turned_off(tmp_path, broker, proc_list, finishing):
    spec = {**fake_spec(latency_ms=40), "finishing": finishing}
    proc_list.append(start(tmp_path, broker, spec))
    ident, _ = loaded(broker)
    ids = ["f1", "f2", "f3"]
    for jid in ids:            # in one batch or more, as they reach the compute thread
        broker.send(ident, *job(jid))
    results = {}
    for _ in ids:
        res, _ = answer(broker)
        assert isinstance(res, p.Result), res
        results[res.id] = (broker.received - 1, res)     # its index among the messages received
    if not finishing:
        assert broker.finishing == [] and all("finishing" not in r.timings for _, r in results.values())
        return
    sent = [jid for _, msg in broker.finishing for jid in msg.ids]
    assert sorted(sent) == ids                            # each job named once
    for before, msg in broker.finishing:
        for jid in msg.ids:
            index, res = results[jid]
            assert before <= index                        # ahead of its answer
            # the fake forward calls near_end 3 ms before it ends (fake_engine.NEAR_END_S)
            assert 2.9 <= res.timings["finishing"] <= res.timings["forward"]
    # one message per batch, naming that batch's jobs
    assert all(results[jid][1].timings["batch"] == len(msg.ids) for _, msg in broker.finishing for jid in msg.ids)


def test_direct_answers_go_straight_to_a_client_on_this_host_only(tmp_path, broker, proc_list):
    proc_list.append(start(tmp_path, broker, spec=fake_spec(max_batch=1)))
    ident, _ = loaded(broker)
    ctx = zmq.Context()
    pull = make_socket(ctx, zmq.PULL)
    pull.bind("tcp://127.0.0.1:*")
    here, host = pull.getsockopt_string(zmq.LAST_ENDPOINT), socket.gethostname()

    def send(jid, to, on, **params):
        msg, blobs = job(jid, **params)
        broker.send(ident, dataclasses.replace(msg, answer_to=to, answer_host=on), blobs)

    def direct_copy(timeout_s=3.0):
        assert pull.poll(int(timeout_s * 1000)), "no direct answer"
        return wire.decode(pull.recv_multipart(), wire.DIRECT_TO_CLIENT)

    try:
        send("d1", here, host, return_attention=True)
        res, out = answer(broker)
        got, blobs = direct_copy()
        assert isinstance(got, p.Final) and got.id == "d1" and isinstance(res, p.Result)
        assert (got.result, got.usage, got.timings, got.finish_reason) == (res.result, res.usage, res.timings, "stop")
        assert blobs == out and len(out) == 1 and got.result["attention_blob"] == 0
        # another host's client, a job that asked for nothing, an error, a job cancelled while it
        # runs: the broker's answer alone
        send("d2", here, "another-host")
        send("d3", None, None)
        send("d4", here, host, fake={"fail": "internal"})
        send("d5", here, host, fake={"hang_s": 0.6})
        time.sleep(0.2)
        broker.send(ident, p.JobCancel(id="d5"))
        got = {r.id: r for r in (answer(broker)[0] for _ in range(4))}
        assert [type(got[j]).__name__ for j in ("d2", "d3", "d4", "d5")] == ["Result", "Result", "WorkerError", "WorkerError"]
        assert got["d5"].code == "cancelled" and not pull.poll(300)
        # a client that is gone: its answers queue up to the HWM, then are dropped; never a block
        gone = free_tcp_endpoint()
        for i in range(SEND_HWM + 16):
            send(f"x{i}", gone, host)
            res, _ = answer(broker)
            assert isinstance(res, p.Result) and res.id == f"x{i}"
        send("d6", here, host)
        assert answer(broker)[0].id == "d6" and direct_copy()[0].id == "d6"
    finally:
        pull.close(linger=0)
        ctx.term()


def test_direct_jobs_run_only_as_their_brokers_job(tmp_path, broker, proc_list):
    proc_list.append(start(tmp_path, broker, spec=fake_spec(max_batch=1)))
    ident, ready = loaded(broker)
    jobs_to = ready.capabilities["jobs_to"]
    assert p.direct_endpoint_ok(jobs_to) and jobs_to.startswith("tcp://127.0.0.1:")
    ctx = zmq.Context()
    push = make_socket(ctx, zmq.PUSH)
    push.connect(jobs_to)
    pull = make_socket(ctx, zmq.PULL)
    pull.bind("tcp://127.0.0.1:*")
    here, host = pull.getsockopt_string(zmq.LAST_ENDPOINT), socket.gethostname()
    other = png(320, 200)

    def copy(jid, blobs=(IMG,), model="m1", **params):
        msg, _ = job(jid, **params)
        push.send_multipart(wire.encode(p.Submit(id=jid, model=model, params=msg.params, ttl_ms=10_000), blobs))

    def send(jid, blobs=(IMG,), **params):
        msg, _ = job(jid, **params)
        broker.send(ident, dataclasses.replace(msg, answer_to=here, answer_host=host), list(blobs))

    def result(jid):
        res, _ = answer(broker)
        assert isinstance(res, p.Result) and res.id == jid, res
        return res

    def copy_then_job(jid, copy_kw=None, job_kw=None):
        """A copy, its JOB 50 ms later: the result."""
        copy(jid, **(copy_kw or {}))
        time.sleep(0.05)
        send(jid, **(job_kw or {}))
        return result(jid)

    try:
        # a copy, then its JOB: it runs once, as the JOB, its total counted from the copy
        res = copy_then_job("c1")
        assert 45 <= res.timings["early"] <= res.timings["total"], res.timings
        assert pull.poll(3000)
        final, _ = wire.decode(pull.recv_multipart(), wire.DIRECT_TO_CLIENT)
        assert final.id == "c1" and final.jobs_to == jobs_to and final.timings["early"] == res.timings["early"]
        # the same id with other bytes or params: the JOB's own are what run
        res = copy_then_job("c2", copy_kw={"blobs": (other,)})
        assert "early" not in res.timings and res.result["image_size"] == [640, 480]
        assert "early" not in copy_then_job("c3", copy_kw={"instruction": "something else"}).timings
        # a copy whose JOB never comes is dropped unanswered, and holds nothing after WAIT_S
        copy("gone")
        time.sleep(0.7)
        send("c4")
        assert "early" not in result("c4").timings
        assert not broker.quiet(0.3)
        # another JOB first: the copy is dropped at once; its JOB, later, runs from scratch
        copy("c5")
        time.sleep(0.05)
        send("c6")
        assert "early" not in result("c6").timings
        send("c5")
        assert "early" not in result("c5").timings
        # taken only while the worker holds no job, for its model, from well-formed frames
        send("busy", fake={"sleep_ms": 300})
        time.sleep(0.05)
        copy("c7")
        push.send_multipart([b"junk"])
        copy("c8", model="m2")
        send("c7")
        assert result("busy") and "early" not in result("c7").timings
        assert "early" not in copy_then_job("c8", copy_kw={"model": "m2"}).timings
        # a copy that comes after its JOB is refused, and keeps no later copy out
        send("late")
        result("late")
        copy("late")
        time.sleep(0.05)
        assert "early" in copy_then_job("c10").timings
        # a copy, then UNLOAD: unloaded at once, not after the copy's wait
        copy("c9")
        time.sleep(0.05)
        t0 = time.monotonic()
        broker.send(ident, p.Unload(model_id="m1"))
        broker.expect(p.Unloaded, ignore=(p.Memory,))
        assert time.monotonic() - t0 < 0.4
        broker.expect(p.Memory)
        assert not broker.quiet(0.7)   # nor any answer for the copy
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()
