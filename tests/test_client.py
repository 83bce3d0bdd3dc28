"""The Python client (common/client.py).

Part 1 drives the client against a raw ROUTER speaking common.wire (the client's own rules:
resend, ping, incarnation change, silence, errors, cancel). Part 2 runs the real processes
(`python -m broker` + `python -m workers.supervisor`, fake engine) end to end.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time

import pytest
import zmq
import zmq.asyncio

from common import protocol as p
from common import wire
from common.client import AsyncClient, Client, JobResult
from common.errors import ServerError
from common.zmqutil import free_tcp_endpoint, make_socket
from tests.rawbroker import ROOT, pid_alive, png, terminate

IMG = png(320, 200)

# ---- part 1: against a raw ROUTER ----------------------------------------------------------------


class RawFrontend:
    """A ROUTER on the client link, driven synchronously by the test."""

    def __init__(self):
        self.endpoint = free_tcp_endpoint()
        self.ctx = zmq.Context()
        self.sock = make_socket(self.ctx, zmq.ROUTER)
        self.sock.bind(self.endpoint)

    def recv(self, timeout_s: float = 5.0, skip_pings: bool = True):
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise TimeoutError("nothing from the client")
            frames = self.sock.recv_multipart()
            msg, blobs = wire.decode(frames[1:], wire.FROM_CLIENT)
            if skip_pings and isinstance(msg, p.Ping):
                continue
            return frames[0], msg, blobs

    def send(self, ident: bytes, msg: p.Message, blobs=()) -> None:
        self.sock.send_multipart([ident, *wire.encode(msg, blobs)])

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def front():
    f = RawFrontend()
    yield f
    f.close()


@pytest.fixture
def client(front):
    c = Client(front.endpoint, default_ttl_s=30)
    yield c
    c.close()


def test_submit_result_errors_query_and_cancel(front, client):
    h = client.submit("m", {"instruction": "click"}, [IMG], ttl_s=7)
    ident, sub, blobs = front.recv()
    assert isinstance(sub, p.Submit) and sub.id == h.job_id and sub.ttl_ms == 7000
    assert sub.blob_meta == [{"mime": "image/png", "len": len(IMG)}] and blobs == [IMG]
    front.send(ident, p.Accepted(id=sub.id, queue_pos=0, broker_incarnation="A"))
    front.send(ident, p.Final(id=sub.id, result={"points": []}, usage={"total_tokens": 3},
                              timings={"total": 1.5}), [b"\x00" * 8])
    res = h.result()
    assert isinstance(res, JobResult) and res.job_id == sub.id and res.blobs == [b"\x00" * 8]
    assert res.usage == {"total_tokens": 3} and res.timings == {"total": 1.5} and res.finish_reason == "stop"
    assert client.incarnation == "A" and client.healthy

    # ERROR -> ServerError with the wire fields
    h = client.submit("m", {"instruction": "x"}, [IMG])
    ident, sub, _ = front.recv()
    front.send(ident, p.Error(id=sub.id, code="overloaded", message="queue full", retryable=True, retry_after_ms=250))
    with pytest.raises(ServerError) as ei:
        h.result()
    assert ei.value.code == "overloaded" and ei.value.retryable and ei.value.retry_after_ms == 250
    assert ei.value.http_status == 503

    # garbage from the broker is dropped; the client keeps working
    front.sock.send_multipart([ident, b"VLM1", b"\x13", b"\xc1"])
    front.sock.send_multipart([ident, b"NOPE"])

    # queries: reply and error
    t = threading.Thread(target=_answer_queries, args=(front,), daemon=True)
    t.start()
    assert client.models() == [{"id": "m"}]
    with pytest.raises(ServerError) as ei:
        client.query(p.Q_LOAD, {"model": "nope"})
    assert ei.value.code == "unknown_model"
    t.join(5)

    # cancel: CANCEL reaches the broker; the handle ends with `cancelled`
    h = client.submit("m", {"instruction": "x"}, [IMG])
    ident, sub, _ = front.recv()
    h.cancel("client_disconnect")
    _, cancel, _ = front.recv()
    assert isinstance(cancel, p.Cancel) and cancel.id == sub.id and cancel.reason == "client_disconnect"
    with pytest.raises(ServerError) as ei:
        h.result()
    assert ei.value.code == "cancelled"
    assert client._async.counters["decode_errors"] >= 1


def _answer_queries(front: RawFrontend) -> None:
    for _ in range(2):
        ident, q, _ = front.recv()
        if q.service == p.Q_MODELS:
            front.send(ident, p.QueryReply(id=q.id, data={"models": [{"id": "m"}]}))
        else:
            front.send(ident, p.Error(id=q.id, code="unknown_model", message="no model 'nope'"))


def test_resend_once_then_incarnation_change(front, client):
    h = client.submit("m", {"instruction": "x"}, [IMG])
    ident, first, _ = front.recv()
    t0 = time.monotonic()
    ident, again, blobs = front.recv(timeout_s=4)
    assert again.id == first.id and blobs == [IMG] and 1.8 < time.monotonic() - t0 < 3.0
    front.send(ident, p.Accepted(id=first.id, queue_pos=0, broker_incarnation="A"))
    # a PONG from a new broker incarnation fails the job accepted by the old one
    front.send(ident, p.Pong(seq=0, broker_incarnation="B"))
    with pytest.raises(ServerError) as ei:
        h.result()
    assert ei.value.code == "broker_restarted" and ei.value.retryable
    assert client.incarnation == "B"


def test_idle_ping_and_broker_silence(front, client):
    ident, ping, _ = front.recv(skip_pings=False)
    assert isinstance(ping, p.Ping)
    front.send(ident, p.Pong(seq=ping.seq, broker_incarnation="A"))
    _pong_in_thread(front)
    assert client.ping() < 1.0
    h = client.submit("m", {"instruction": "x"}, [IMG])
    t0 = time.monotonic()
    # the "broker" goes silent: no ACCEPTED, no PONG
    with pytest.raises(ServerError) as ei:
        h.result()
    assert ei.value.code == "broker_unavailable" and ei.value.retryable
    assert 2.9 < time.monotonic() - t0 < 4.0
    assert not client.healthy


def _pong_in_thread(front: RawFrontend) -> None:
    def answer():
        ident, ping, _ = front.recv(skip_pings=False)
        front.send(ident, p.Pong(seq=ping.seq, broker_incarnation="A"))
    threading.Thread(target=answer, daemon=True).start()


@pytest.mark.parametrize("finishing", [True, False])
def test_async_client_streams_events_on_any_loop_and_drops_finishing(finishing):
    async def main():
        ctx = zmq.asyncio.Context()
        router = make_socket(ctx, zmq.ROUTER)
        endpoint = free_tcp_endpoint()
        router.bind(endpoint)
        try:
            async with AsyncClient(endpoint, ctx=ctx, finishing=finishing) as c:
                h = await c.submit("m", {"instruction": "x"}, [IMG], stream=True)
                frames = await asyncio.wait_for(router.recv_multipart(), 5)
                ident = frames[0]
                sub, _ = wire.decode(frames[1:], wire.FROM_CLIENT)
                if isinstance(sub, p.Ping):
                    frames = await asyncio.wait_for(router.recv_multipart(), 5)
                    sub, _ = wire.decode(frames[1:], wire.FROM_CLIENT)
                assert sub.stream and sub.finishing is finishing and sub.answer_to is None   # streams ask for none
                for msg in (p.Accepted(id=sub.id, queue_pos=2, broker_incarnation="A"),
                            p.Partial(id=sub.id, seq=0, delta={"text": "pya"}),
                            p.Finishing(id=sub.id),          # advisory: no event
                            p.Final(id=sub.id, result={"ok": True})):
                    await router.send_multipart([ident, *wire.encode(msg)])
                events = [ev async for ev in h]
                assert [type(e).__name__ for e in events] == ["Accepted", "Partial", "JobResult"]
                assert events[0].queue_pos == 2 and events[-1].result == {"ok": True}
                assert (await h.result()).result == {"ok": True}   # the terminal event is kept
                assert c.counters == {"decode_errors": 0, "resends": 0, "unknown_job": 0, "direct_answers": 0,
                                      "direct_jobs": 0, "direct_jobs_unsent": 0}
        finally:
            router.close(linger=0)
            ctx.term()
    asyncio.run(asyncio.wait_for(main(), 20))


def test_direct_answers_first_copy_wins_either_way_and_streams_stay_on_the_broker():
    async def main():
        ctx = zmq.asyncio.Context()
        router = make_socket(ctx, zmq.ROUTER)
        endpoint = free_tcp_endpoint()
        router.bind(endpoint)
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)

        async def next_submit():
            while True:
                frames = await asyncio.wait_for(router.recv_multipart(), 5)
                msg, _ = wire.decode(frames[1:], wire.FROM_CLIENT)
                if isinstance(msg, p.Submit):
                    return frames[0], msg

        async def via_broker(ident, msg):
            await router.send_multipart([ident, *wire.encode(msg)])

        try:
            async with AsyncClient(endpoint, ctx=ctx, direct_answers=True) as c:
                assert c.answer_to.startswith("tcp://127.0.0.1:")
                push.connect(c.answer_to)
                for first in ("direct", "broker"):
                    h = await c.submit("m", {"instruction": first}, [IMG])
                    ident, sub = await next_submit()
                    assert (sub.answer_to, sub.answer_host) == (c.answer_to, socket.gethostname())
                    await via_broker(ident, p.Accepted(id=sub.id, queue_pos=0, broker_incarnation="A"))
                    copies = [p.Final(id=sub.id, result={"from": "direct"}), p.Final(id=sub.id, result={"from": "broker"})]
                    if first == "direct":
                        await push.send_multipart(wire.encode(copies[0], [b"blob"]))
                        assert (await h.result()).blobs == [b"blob"]
                        await via_broker(ident, copies[1])
                    else:
                        await via_broker(ident, copies[1])
                        await h.result()
                        await push.send_multipart(wire.encode(copies[0]))
                    assert (await h.result()).result == {"from": first}
                    answered = sub.id
                # a streamed job, and a job id answered moments ago, ask for none
                h = await c.submit("m", {"instruction": "s"}, [IMG], stream=True)
                ident, sub = await next_submit()
                assert sub.answer_to is None and sub.answer_host is None
                await via_broker(ident, p.Final(id=sub.id, result={"ok": 1}))
                await h.result()
                reused = await c.submit("m", {"instruction": "again"}, [IMG], job_id=answered)
                ident, sub = await next_submit()
                assert sub.answer_to is None
                await push.send_multipart(wire.encode(p.Final(id=answered, result={"stale": 1})))  # a late copy
                await asyncio.sleep(0.2)
                await via_broker(ident, p.Final(id=answered, result={"fresh": 1}))
                assert (await reused.result()).result == {"fresh": 1}
                await asyncio.sleep(0.2)
                assert c.counters == {"decode_errors": 0, "resends": 0, "unknown_job": 0, "direct_answers": 1,
                                      "direct_jobs": 0, "direct_jobs_unsent": 0}
            async with AsyncClient(endpoint, ctx=ctx, direct_answers=False) as plain:
                await plain.submit("m", {"instruction": "plain"}, [IMG])
                _, sub = await next_submit()
                assert plain.answer_to is None and sub.answer_to is None and sub.answer_host is None
        finally:
            push.close(linger=0)
            router.close(linger=0)
            ctx.term()
    asyncio.run(asyncio.wait_for(main(), 20))


def test_submit_without_broker_fails_fast():
    async def main():
        async with AsyncClient(free_tcp_endpoint()) as c:
            t0 = time.monotonic()
            with pytest.raises(ServerError) as ei:
                await c.submit("m", {"instruction": "x"}, [IMG])
            assert ei.value.code == "broker_unavailable" and time.monotonic() - t0 < 2.0
            assert not c.healthy
    asyncio.run(asyncio.wait_for(main(), 20))


def test_submit_cancelled_while_waiting_for_the_broker_is_never_sent():
    """A caller that gives up while the broker is unreachable leaves nothing to resend later."""
    endpoint = free_tcp_endpoint()

    async def main():
        async with AsyncClient(endpoint) as c:
            task = asyncio.ensure_future(c.submit("m", {"instruction": "x"}, [IMG]))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not c._jobs
            ctx = zmq.Context()
            router = make_socket(ctx, zmq.ROUTER)
            router.bind(endpoint)
            try:   # the broker comes up: pings may arrive, a SUBMIT must not
                deadline = time.monotonic() + 3.0
                while time.monotonic() < deadline:
                    if router.poll(100):
                        msg, _ = wire.decode(router.recv_multipart()[1:], wire.FROM_CLIENT)
                        assert not isinstance(msg, p.Submit), msg
                    await asyncio.sleep(0)
            finally:
                router.close(linger=0)
                ctx.term()
    asyncio.run(asyncio.wait_for(main(), 20))


def test_direct_job_copies_go_only_to_loopback_workers_that_answered_and_never_wait():
    from common import client_direct_jobs as cdj
    ctx = zmq.Context()
    counters = {"direct_jobs": 0, "direct_jobs_unsent": 0}
    jobs = cdj.DirectJobs(ctx, counters)
    pull = make_socket(ctx, zmq.PULL)
    pull.bind("tcp://127.0.0.1:*")
    worker = pull.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        for bad in ("tcp://10.0.0.1:5555", "tcp://127.0.0.1:1;tcp://10.0.0.1:2", "tcp://example.org:80", "", None,
                    "ipc://" + "x" * 240):   # loopback's form, but a path libzmq refuses
            jobs.learn("m", bad)
            assert jobs.endpoint("m") is None
        jobs.learn("m", worker)
        assert jobs.endpoint("m") == worker and jobs.endpoint("other") is None
        frames = wire.encode(p.Submit(id="j1", model="m", params={"instruction": "x"}), [IMG])
        deadline = time.monotonic() + 5   # the socket connected at `learn`; up within moments
        while not jobs.send(worker, frames) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pull.poll(2000)
        msg, blobs = wire.decode(pull.recv_multipart(), wire.DIRECT_TO_WORKER)
        assert msg.id == "j1" and blobs == [IMG] and counters["direct_jobs"] == 1
        # a worker that is gone: nothing queues, nothing blocks
        gone = free_tcp_endpoint()
        jobs.learn("g", gone)
        t0 = time.monotonic()
        assert not any(jobs.send(gone, frames) for _ in range(50))
        assert time.monotonic() - t0 < 0.5 and counters["direct_jobs_unsent"] >= 50
        # at most MAX_ENDPOINTS sockets: the least recently used are closed
        for i in range(cdj.MAX_ENDPOINTS + 4):
            jobs.learn(f"r{i}", free_tcp_endpoint())
        assert len(jobs._socks) == cdj.MAX_ENDPOINTS
    finally:
        jobs.close()
        pull.close(linger=0)
        ctx.term()


# ---- part 2: end to end with the real broker, supervisor and fake-engine workers ----------------

from tests.stackutil import Stack, fake_model  # noqa: E402


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    cfg = {"models": {"m1": fake_model(max_batch=4)},
           "supervisor": {"restart_backoff_s": 0.1, "restart_backoff_max_s": 0.5, "report_interval_ms": 200}}
    st = Stack(tmp_path_factory.mktemp("stack"), cfg, procs=("broker", "supervisor"))
    try:
        st.start(ready_timeout_s=30, loaded=("m1",))
        yield st
    finally:
        pids = []
        try:
            pids = [m["worker"]["pid"] for m in st.models() if m.get("worker")]
        except Exception:
            pass
        st.stop()
        time.sleep(0.2)
        assert not [pid for pid in pids if pid_alive(pid)], "a worker outlived the stack"


@pytest.fixture
def e2e(stack):
    c = Client(stack.client_endpoint, default_ttl_s=30)
    yield c
    c.close()


def test_e2e_grounding_round_trip(stack, e2e):
    res = e2e.ground("m1", IMG, "click the blue button", return_attention=True)
    r = res.result
    assert r["image_size"] == [320, 200] and r["grid"] == [7, 11] and r["attention_blob"] == 0
    assert len(res.blobs) == 1 and len(res.blobs[0]) == 7 * 11 * 4
    assert all(0 <= pt["x"] < 320 and 0 <= pt["y"] < 200 for pt in r["points"])
    assert res.usage["image_tokens"] == 77 and {"queue", "preprocess", "forward", "total"} <= set(res.timings)
    again = e2e.ground("m1", IMG, "click the blue button")
    assert again.result["points"] == r["points"] and again.blobs == []
    (m,) = e2e.models("m1")
    assert m["status"] == "loaded" and m["worker"]["pid"] > 0
    assert "counters" in e2e.stats() and e2e.ping() < 0.5 and e2e.healthy


def test_e2e_prefill_job(stack, e2e):
    res = e2e.prefill("m1", IMG, max_pixels=100_000)
    assert res.result["points"] == [] and res.result["image_size"] == [320, 200]
    assert "keeps no screenshot state" in res.result["not_kept"]     # the fake engine computes none
    assert res.usage["kept_tokens"] == res.usage["cached_tokens"] == 0 and res.usage["image_tokens"] > 0
    with pytest.raises(ServerError) as ei:
        e2e.submit("m1", {"prefill": True, "instruction": "click OK"}, [IMG]).result()
    assert ei.value.code == "bad_request" and "prefill" in str(ei.value)


def test_e2e_errors_and_fault_knobs(stack, e2e):
    cases = [
        (dict(model="nope"), "unknown_model"),
        (dict(image=b"not an image"), "invalid_image"),
        (dict(fake={"fail": "insufficient_memory"}), "insufficient_memory"),
        (dict(fake={"fail": "internal"}), "internal"),
    ]
    for kw, code in cases:
        args = {"model": "m1", "image": IMG, "instruction": "x", **kw}
        with pytest.raises(ServerError) as ei:
            e2e.ground(args.pop("model"), args.pop("image"), args.pop("instruction"), **args)
        assert ei.value.code == code, ei.value
    assert e2e.ground("m1", IMG, "still fine").result["points"]


def test_e2e_cancel_and_deadline(stack, e2e):
    h = e2e.submit("m1", {"instruction": "slow", "fake": {"sleep_ms": 1500}}, [IMG])
    time.sleep(0.2)
    t0 = time.monotonic()
    h.cancel()
    with pytest.raises(ServerError) as ei:
        h.result()
    assert ei.value.code == "cancelled" and time.monotonic() - t0 < 0.5
    t0 = time.monotonic()
    with pytest.raises(ServerError) as ei:
        e2e.ground("m1", IMG, "slower", ttl_s=0.5, fake={"sleep_ms": 3000})
    assert ei.value.code == "deadline_exceeded" and time.monotonic() - t0 < 1.5
    # the worker is still sleeping on those two; new work completes after them
    assert e2e.ground("m1", IMG, "after").result["points"]
    time.sleep(0.5)
    assert e2e._async.counters["unknown_job"] == 0


def copies_to(c: Client, model: str = "m1", other_than: str | None = None) -> str:
    """Ground until a direct answer has come first and named the worker's endpoint for direct jobs
    (one other than `other_than`): that endpoint."""
    for i in range(30):
        to = c._async._direct_jobs.endpoint(model)
        if to is not None and to != other_than:
            return to
        c.ground(model, IMG, f"until a direct answer {i}")
    raise AssertionError(f"no direct answer named a new endpoint for direct jobs ({to})")


def test_e2e_kill9_worker_mid_job(stack, e2e):
    old_to = copies_to(e2e)
    pid = stack.worker_pid("m1")
    h = e2e.submit("m1", {"instruction": "long", "fake": {"sleep_ms": 800}}, [IMG])
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    try:
        res = h.result()
        assert res.result["points"]            # retried on the restarted worker
    except ServerError as exc:
        assert exc.code == "worker_lost", exc
    new_pid = stack.worker_pid("m1")
    deadline = time.monotonic() + 10
    while new_pid == pid and time.monotonic() < deadline:
        time.sleep(0.05)
        new_pid = stack.worker_pid("m1")
    assert new_pid != pid and not pid_alive(pid)
    stack.wait_ready(10, loaded=("m1",))
    assert e2e.ground("m1", IMG, "after restart").result["points"]
    # copies go to the new worker once it has answered straight (until then, to the dead worker's
    # endpoint, where they cannot go), and it runs jobs from them
    assert copies_to(e2e, other_than=old_to).startswith("tcp://127.0.0.1:")
    timings = [e2e.ground("m1", IMG, f"copied {i}").timings for i in range(5)]
    assert any("early" in t for t in timings), (timings, e2e._async.counters)
    time.sleep(0.3)
    assert e2e._async.counters["unknown_job"] == 0   # exactly one answer reached the client


def cancel_and_miss_a_deadline(c: Client) -> None:
    """A job cancelled while it runs, one past its deadline, then one more; after them, a second."""
    slow = c.submit("m1", {"instruction": "slow", "fake": {"sleep_ms": 600}}, [IMG])
    time.sleep(0.2)
    slow.cancel()
    with pytest.raises(ServerError) as ei:
        c.ground("m1", IMG, "late", ttl_s=0.3, fake={"sleep_ms": 800})
    assert ei.value.code == "deadline_exceeded"
    assert c.ground("m1", IMG, "after").result["points"]
    time.sleep(1.0)   # the late copies of all of them have come by now


def test_e2e_direct_answers_match_the_brokers_and_each_job_ends_once(stack):
    with Client(stack.client_endpoint, default_ttl_s=30) as d, \
            Client(stack.client_endpoint, default_ttl_s=30, direct_answers=False) as plain:
        want = plain.ground("m1", IMG, "click the blue button", return_attention=True)
        got = d.ground("m1", IMG, "click the blue button", return_attention=True)
        assert (got.result, got.usage, got.blobs) == (want.result, want.usage, want.blobs)
        handles = [d.submit("m1", {"instruction": f"button {i}"}, [IMG]) for i in range(12)]   # batched
        assert all(h.result().result["points"] for h in handles)
        stream = [type(ev).__name__ for ev in d.submit("m1", {"instruction": "s"}, [IMG], stream=True)]
        assert stream[-1] == "JobResult"
        cancel_and_miss_a_deadline(d)
        counters = d._async.counters
        # which copy comes first is the machine's scheduling (10-14 of these 14 on a 2-core box)
        assert counters["direct_answers"] >= 1 and counters["unknown_job"] == 0, counters
        assert plain._async.counters["direct_answers"] == 0


def test_e2e_direct_jobs_run_as_the_brokers_jobs_with_the_same_answers(stack):
    with Client(stack.client_endpoint, default_ttl_s=30) as d, \
            Client(stack.client_endpoint, default_ttl_s=30, direct_jobs=False) as plain:
        assert copies_to(d).startswith("tcp://127.0.0.1:")
        early = []
        for i in range(6):
            want = plain.ground("m1", IMG, f"click button {i}", return_attention=True)
            got = d.ground("m1", IMG, f"click button {i}", return_attention=True)
            assert (got.result, got.usage, got.blobs) == (want.result, want.usage, want.blobs)
            assert "early" not in want.timings
            early.append(got.timings.get("early"))
        # the worker had each copy before the broker's JOB (a few may lose the race on a busy box)
        assert sum(e is not None and e > 0 for e in early) >= 3, early
        # a copy each, sent, or not sent where its socket had not connected yet (the broker's JOB
        # carries the job then; seen once on this 2-core box under load)
        counters = d._async.counters
        assert counters["direct_jobs"] + counters["direct_jobs_unsent"] == 6 and counters["direct_jobs"] >= 3, counters
        assert plain._async.counters["direct_jobs"] == 0
        cancel_and_miss_a_deadline(d)   # jobs the worker holds copies of: one answer each
        assert d._async.counters["unknown_job"] == 0


def test_e2e_poison_job_kills_two_workers_then_fails(stack, e2e):
    with pytest.raises(ServerError) as ei:
        e2e.ground("m1", IMG, "poison", fake={"crash": True})
    assert ei.value.code == "worker_crash_poison" and not ei.value.retryable
    stack.wait_ready(15, loaded=("m1",))
    assert e2e.ground("m1", IMG, "recovered").result["points"]


def test_e2e_broker_kill9_and_restart(tmp_path):
    """Clients fail the lost job with broker_restarted; the worker re-registers with its model
    still loaded (no reload) and serves again."""
    import subprocess
    import sys

    import yaml
    cfg = {"broker": {"client_endpoint": free_tcp_endpoint(), "worker_endpoint": free_tcp_endpoint()},
           "models": {"m1": fake_model(fake={"load_s": 0.05, "weights_bytes": 1000})},
           "cache_dir": str(tmp_path / "cache")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(tmp_path / "log.txt", "wb")

    def spawn(mod):
        return subprocess.Popen([sys.executable, "-m", mod, "--config", str(path)], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_loaded(c, timeout_s=15.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                (m,) = c.models("m1")
                if m["status"] == "loaded":
                    return m
            except ServerError:
                pass
            time.sleep(0.05)
        raise TimeoutError((tmp_path / "log.txt").read_text())

    procs = [spawn("broker"), spawn("workers.supervisor")]
    try:
        with Client(cfg["broker"]["client_endpoint"]) as c:
            before = wait_loaded(c)
            first_inc = c.incarnation
            h = c.submit("m1", {"instruction": "x", "fake": {"sleep_ms": 3000}}, [IMG])
            time.sleep(0.2)
            os.killpg(procs[0].pid, signal.SIGKILL)
            procs[0].wait(5)
            procs[0] = spawn("broker")
            with pytest.raises(ServerError) as ei:
                h.result()
            assert ei.value.code in ("broker_restarted", "broker_unavailable") and ei.value.retryable
            after = wait_loaded(c)
            assert c.incarnation != first_inc
            assert after["worker"]["pid"] == before["worker"]["pid"]   # same process, model kept
            assert c.ground("m1", IMG, "again").result["points"]
    finally:
        terminate(procs)
        log.close()
    assert (tmp_path / "log.txt").read_text().count("loaded m1 in") == 1   # never reloaded
