"""The broker process over real sockets: `python -m broker --config ...` as a subprocess, raw DEALER
peers speaking common.wire (a fake worker and a client), loopback tcp on free ports."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgpack
import pytest
import yaml
import zmq

from common import protocol as p
from common import wire
from common.zmqutil import free_tcp_endpoint, make_socket

ROOT = Path(__file__).resolve().parent.parent
IMG = bytes(range(256)) * 64          # 16 KiB of "image"


class BrokerProc:
    def __init__(self, tmp_path: Path, **broker_cfg):
        self.client_ep, self.worker_ep = free_tcp_endpoint(), free_tcp_endpoint()
        cfg = {"broker": {"client_endpoint": self.client_ep, "worker_endpoint": self.worker_ep,
                          "memory_budget": 10**9, "min_residency_s": 0, **broker_cfg},
               "models": {"m": {"path": "fake", "engine": "fake"}, "n": {"path": "fake", "engine": "fake"}},
               "log_level": "debug"}
        self.config = tmp_path / "broker.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = tmp_path / "broker.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "broker", "--config", str(self.config), "--grace", "5"],
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Peer:
    """A raw DEALER on one of the broker's links."""

    def __init__(self, ctx: zmq.Context, endpoint: str, table: dict, identity: bytes | None = None):
        self.sock = make_socket(ctx, zmq.DEALER, identity=identity)
        self.sock.connect(endpoint)
        self.table = table

    def send(self, msg: p.Message, blobs=()) -> None:
        self.sock.send_multipart(wire.encode(msg, blobs), copy=False)

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float = 3.0, skip=(p.BrokerHeartbeat,), on_idle=None):
        """The next message not in `skip`, as (msg, blobs); fails after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from the broker")
            if self.sock.poll(int(min(left, 0.3) * 1000)):
                msg, blobs = wire.decode(self.sock.recv_multipart(), self.table)
                if not isinstance(msg, skip):
                    return msg, [bytes(b) for b in blobs]
            elif on_idle is not None:
                on_idle()


class FakeWorker(Peer):
    def __init__(self, ctx, endpoint, model="m", state="empty", pid=4242):
        super().__init__(ctx, endpoint, wire.TO_WORKER, identity=b"w:" + uuid.uuid4().bytes)
        self.model = model
        self.send(p.Ready(uuid.uuid4().hex, pid, "host", model, state,
                          {"max_slots": 2, "max_batch": 1, "engine": "fake", "est_weights_bytes": 1000},
                          weights_bytes=1000 if state == "loaded" else 0))

    def beat(self) -> None:
        self.send(p.Heartbeat(1, "loaded", 1, []))

    def expect(self, kind, timeout_s: float = 3.0):
        msg, blobs = self.recv(timeout_s, on_idle=self.beat)
        assert isinstance(msg, kind), msg
        return msg, blobs


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def broker(tmp_path, ctx):
    procs = []

    def start(**cfg) -> BrokerProc:
        b = BrokerProc(tmp_path, **cfg)
        procs.append(b)
        pinger = Peer(ctx, b.client_ep, wire.TO_CLIENT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:          # ready when it answers a PING
            pinger.send(p.Ping(1))
            try:
                if isinstance(pinger.recv(0.2)[0], p.Pong):
                    pinger.sock.close(linger=0)
                    return b
            except TimeoutError:
                assert b.proc.poll() is None, b.output()
        raise TimeoutError(b.output())

    yield start
    for b in procs:
        b.kill()


def client(ctx, b: BrokerProc) -> Peer:
    return Peer(ctx, b.client_ep, wire.TO_CLIENT)


def query(c: Peer, service: str, arg=None) -> dict:
    c.send(p.Query(uuid.uuid4().hex, service, arg or {}))
    msg, _ = c.recv()
    assert isinstance(msg, p.QueryReply), msg
    return msg.data


def test_job_routes_end_to_end_with_on_demand_load_and_untouched_blobs(broker, ctx):
    b = broker()
    w = FakeWorker(ctx, b.worker_ep)
    c = client(ctx, b)
    time.sleep(0.2)                                   # READY is in before the SUBMIT
    c.send(p.Submit("j1", "m", {"instruction": "click OK"}, [{"mime": "image/png", "len": len(IMG)}], 5000), [IMG])
    msg, _ = c.recv()
    assert isinstance(msg, p.Accepted) and msg.id == "j1" and msg.broker_incarnation
    w.expect(p.Load)
    w.send(p.Loaded("m", 1000, 0.01))
    job, blobs = w.expect(p.Job)
    assert job.id == "j1" and job.params == {"instruction": "click OK"} and blobs == [IMG] and 0 < job.ttl_ms <= 5000
    attn = b"\x00\x00\x80?" * 1000
    w.send(p.Result("j1", {"points": [{"x": 1.0, "y": 2.0}], "attention_blob": 0}, {"total_tokens": 9}), [attn])
    final, blobs = c.recv()
    assert isinstance(final, p.Final) and final.result["points"] == [{"x": 1.0, "y": 2.0}] and blobs == [attn]
    [m] = query(c, p.Q_MODELS, {"model": "m"})["models"]
    assert m["status"] == "loaded" and m["worker"]["pid"] == 4242 and m["last_used"] > 1.6e9
    c.send(p.Submit("j2", "nope", {}))
    err, _ = c.recv()
    assert isinstance(err, p.Error) and (err.id, err.code) == ("j2", "unknown_model")


def test_malformed_frames_are_answered_or_dropped_and_the_broker_keeps_working(broker, ctx):
    b = broker()
    c = client(ctx, b)
    deep = {"id": "d1", "service": "mmi.models", "arg": {}}
    node = deep["arg"]
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    bad = [
        [b"XXXX", b"\x04", msgpack.packb({"seq": 1})],                                  # bad magic
        [p.MAGIC_CLIENT, b"\x7f", msgpack.packb({"seq": 1})],                            # unknown command
        [p.MAGIC_CLIENT, b"\x04", b"\xc1\xff\x00garbage"],                               # bad msgpack
        [p.MAGIC_CLIENT, b"\x01", b"\x80" + b"\x00" * (300 * 1024)],                     # huge envelope
        [p.MAGIC_CLIENT, b"\x03", msgpack.packb(deep)],                                  # deep nesting
        [p.MAGIC_CLIENT, b"\x01", msgpack.packb({"id": "j9", "model": "m", "params": 5})],  # wrong type
        [p.MAGIC_CLIENT],                                                                # too short
    ]
    for frames in bad:
        c.send_raw(frames)
        err, _ = c.recv()
        assert isinstance(err, p.Error) and err.code == "bad_request", (frames[:2], err)
    assert err.id is None
    c.send_raw(bad[5])
    err, _ = c.recv()
    assert err.id == "j9"                              # readable enough to name the job
    # garbage on the worker link is dropped; the worker link keeps working
    junk = Peer(ctx, b.worker_ep, wire.TO_WORKER)
    junk.send_raw([b"VLW1", b"\x02", b"\xc1"])
    junk.send_raw([b"nonsense"])
    w = FakeWorker(ctx, b.worker_ep, state="loaded")
    c.send(p.Submit("ok", "m", {}, [], 5000))
    assert isinstance(c.recv()[0], p.Accepted)
    w.expect(p.Job)
    w.send(p.Result("ok", {}))
    assert isinstance(c.recv()[0], p.Final)
    counters = query(c, p.Q_STATS)["counters"]
    assert counters["decode_errors_total.client"] == len(bad) + 1
    assert counters["decode_errors_total.worker"] == 2
    assert b.proc.poll() is None


def test_worker_heartbeat_loss_is_detected_within_about_3_s_and_the_job_retried(broker, ctx):
    b = broker(heartbeat_interval_ms=1000, heartbeat_liveness=3)
    w1 = FakeWorker(ctx, b.worker_ep, state="loaded", pid=1)
    c = client(ctx, b)
    time.sleep(0.2)
    c.send(p.Submit("j1", "m", {}, [], 20_000))
    assert isinstance(c.recv()[0], p.Accepted)
    w1.expect(p.Job)
    silent_since = time.monotonic()                   # w1 now freezes: no heartbeats, no answer
    while query(c, p.Q_MODELS, {"model": "m"})["models"][0]["worker"] is not None:
        assert time.monotonic() - silent_since < 4.0, "worker loss not detected"
        time.sleep(0.1)
    detected = time.monotonic() - silent_since
    assert 2.5 < detected < 4.0, detected
    w2 = FakeWorker(ctx, b.worker_ep, state="loaded", pid=2)
    job, _ = w2.expect(p.Job)
    assert (job.id, job.attempt) == ("j1", 2)
    w1.send(p.Result("j1", {"from": "zombie"}))       # SIGCONT: its late answer
    assert isinstance(w1.recv()[0], p.BrokerDisconnect)
    w2.send(p.Result("j1", {"from": "w2"}))
    final, _ = c.recv()
    assert isinstance(final, p.Final) and final.result == {"from": "w2"}
    assert query(c, p.Q_STATS)["counters"]["zombie_results_dropped_total"] == 1


def test_vanished_client_does_not_hurt_the_broker(broker, ctx):
    b = broker()
    w = FakeWorker(ctx, b.worker_ep, state="loaded")
    c = client(ctx, b)
    time.sleep(0.2)
    c.send(p.Submit("j1", "m", {}, [], 5000))
    assert isinstance(c.recv()[0], p.Accepted)
    w.expect(p.Job)
    c.sock.close(linger=0)
    time.sleep(0.3)
    w.send(p.Result("j1", {}))                         # the FINAL goes nowhere: EHOSTUNREACH
    c2 = client(ctx, b)
    deadline = time.monotonic() + 3
    while query(c2, p.Q_STATS)["counters"].get("send_failed_total.client", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert b.proc.poll() is None


def test_sigterm_refuses_new_jobs_lets_dispatched_ones_finish_and_exits_0(broker, ctx):
    b = broker()
    w = FakeWorker(ctx, b.worker_ep, state="loaded")
    c = client(ctx, b)
    time.sleep(0.2)
    c.send(p.Submit("run", "m", {}, [], 10_000))
    assert isinstance(c.recv()[0], p.Accepted)
    w.expect(p.Job)
    b.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    c.send(p.Submit("late", "m", {}, [], 10_000))
    err, _ = c.recv()
    assert isinstance(err, p.Error) and err.code == "overloaded" and err.retryable and err.retry_after_ms
    w.send(p.Result("run", {"done": True}))
    final, _ = c.recv()
    assert isinstance(final, p.Final) and final.result == {"done": True}
    assert b.proc.wait(5) == 0
    assert "drained" in b.output()


def test_config_error_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("broker: {queue_size: 0}\n")
    out = subprocess.run([sys.executable, "-m", "broker", "--config", str(bad)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "broker.queue_size" in out.stderr
