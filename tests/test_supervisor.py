"""The supervisor (`python -m workers.supervisor`) with real worker processes, against a raw ROUTER."""
from __future__ import annotations

import os
import signal
import time

import pytest

from common import protocol as p
from tests.rawbroker import RawBroker, fake_spec, pid_alive, png, spawn, stop, write_config


@pytest.fixture
def broker():
    b = RawBroker()
    yield b
    b.close()


@pytest.fixture
def sup(tmp_path, broker):
    models = {"m1": fake_spec(), "m2": fake_spec(), "off": {**fake_spec(), "enabled": False}}
    cfg = write_config(tmp_path, broker.endpoint, models,
                       supervisor={"report_interval_ms": 1000, "restart_backoff_s": 0.2,
                                   "restart_backoff_max_s": 1.0, "shutdown_grace_s": 2.0})
    proc = spawn("-m", "workers.supervisor", "--config", str(cfg))
    seen_pids: set[int] = set()
    yield proc, seen_pids
    stop(proc)
    deadline = time.monotonic() + 5
    for pid in seen_pids:   # no worker may outlive the test, whatever happened
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"worker {pid} outlived its supervisor")


def readies(broker, n, seen, timeout_s=10.0):
    out = {}
    deadline = time.monotonic() + timeout_s
    while len(out) < n:
        ident, msg, _ = broker.recv(max(0.01, deadline - time.monotonic()))
        if isinstance(msg, p.Ready):
            out[msg.model_id] = (ident, msg)
            seen.add(msg.pid)
    return out


def next_host(broker, timeout_s=3.0, pred=lambda h: True):
    deadline = time.monotonic() + timeout_s
    while True:
        ident, msg, _ = broker.recv(max(0.01, deadline - time.monotonic()))
        if isinstance(msg, p.Host) and pred(msg):
            return ident, msg


def test_spawn_report_restart_and_kill(broker, sup):
    proc, seen = sup
    workers = readies(broker, 2, seen)
    assert set(workers) == {"m1", "m2"}     # disabled models get no worker
    sup_ident, host = next_host(broker)
    assert sup_ident.startswith(b"s:") and host.mem_total > host.mem_available > 0
    by_model = {w["model_id"]: w for w in host.workers}
    assert set(by_model) == {"m1", "m2"} and by_model["m1"]["pid"] == workers["m1"][1].pid

    # kill -9: an exit report right away (not at the next interval), then a restart
    pid1 = workers["m1"][1].pid
    os.kill(pid1, signal.SIGKILL)
    t0 = time.monotonic()
    _, host = next_host(broker, pred=lambda h: pid1 in h.exited)
    assert time.monotonic() - t0 < 0.4      # reports are 1 s apart: this one came at once
    entry = next(w for w in host.workers if w["model_id"] == "m1")
    assert entry["exit_code"] == -9 and entry["state"] == "backoff"
    again = readies(broker, 1, seen)
    assert again["m1"][1].pid != pid1
    _, host = next_host(broker, pred=lambda h: any(w["restarts"] == 1 for w in h.workers))

    # KILL from the broker: obeyed for our own worker, refused for any other pid
    bystander = spawn("-c", "import time; time.sleep(30)")
    try:
        broker.send(sup_ident, p.Kill(pid=bystander.pid, signal=9, reason="test"))
        pid2 = workers["m2"][1].pid
        broker.send(sup_ident, p.Kill(pid=pid2, signal=9, reason="watchdog"))
        next_host(broker, pred=lambda h: pid2 in h.exited)
        assert bystander.poll() is None
    finally:
        stop(bystander)
    assert proc.poll() is None


def test_sigterm_stops_workers_gracefully(broker, sup):
    proc, seen = sup
    workers = readies(broker, 2, seen)
    ident = workers["m1"][0]
    broker.send(ident, p.Load(model_id="m1"))
    broker.expect(p.Loaded, ignore=(p.Host, p.Memory))
    # an in-flight job finishes before the worker leaves
    broker.send(ident, p.Job(id="j", params={"instruction": "x", "fake": {"sleep_ms": 400}}, ttl_ms=5000), [png()])
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    got = []
    deadline = time.monotonic() + 5
    while sum(isinstance(m, p.WorkerDisconnect) for m in got) < 2 and time.monotonic() < deadline:
        got.append(broker.recv(timeout_s=5)[1])
    assert any(isinstance(m, p.Result) and m.id == "j" for m in got)
    assert proc.wait(5) == 0
    assert not any(pid_alive(pid) for pid in seen)


def test_grace_expiry_sigkills_stuck_worker(broker, sup):
    proc, seen = sup
    workers = readies(broker, 2, seen)
    ident = workers["m1"][0]
    broker.send(ident, p.Load(model_id="m1"))
    broker.expect(p.Loaded, ignore=(p.Host, p.Memory))
    broker.send(ident, p.Job(id="j", params={"instruction": "x", "fake": {"hang_s": 30}}, ttl_ms=60000), [png()])
    time.sleep(0.2)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert time.monotonic() - t0 < 4.0       # shutdown_grace_s 2 + a little
    assert not any(pid_alive(pid) for pid in seen)


def test_sigkill_supervisor_leaves_no_orphans(broker, sup):
    proc, seen = sup
    readies(broker, 2, seen)
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(pid_alive(pid) for pid in seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(pid) for pid in seen)
