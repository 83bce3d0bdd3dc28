"""Memory-aware LRU model management on real processes (issue 5).

Fake-engine models report synthetic weights and peaks: a pinned 20 MB model plus three 100 MB
ones under a 250 MB budget, so the pinned one and two others fit and a third does not. Then the
real tiny MLX model (engine mlx, `tiny:qwen2_vl`) shows real memory reports arriving.
The property tests of the same rules on the pure core are in tests/test_broker_scheduler.py.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from common import protocol as p
from common.client import Client
from tests.stackutil import Stack, fake_model
from tests.test_faults import IMG, SUPERVISOR_FAST, chat_body, post, running, wait_for

MB = 1_000_000
BUDGET = 250 * MB


def fake(weights: int, load_s: float = 0.05, **kw) -> dict:
    return fake_model(fake={"load_s": load_s, "weights_bytes": weights, "job_bytes": 1 * MB}, **kw)


def test_preloads_follow_config_order_whatever_order_workers_register_in():
    """Workers start together and register in any order; preloads still go a, b (c does not fit
    and preload never evicts). Pure core, hand-held clock."""
    from tests.test_broker_core import Harness, of, spec
    h = Harness({x: spec(preload=True) for x in "abc"}, memory_budget=250)
    assert not of(h.ready(b"wc", model="c", est=100), p.Load)     # a and b have not registered yet
    assert not of(h.ready(b"wb", model="b", est=100), p.Load)
    cmds = h.ready(b"wa", model="a", est=100)
    assert [c.identity for c in cmds if isinstance(getattr(c, "msg", None), p.Load)] == [b"wa", b"wb"]
    for ident, mid in ((b"wa", "a"), (b"wb", "b")):
        h.worker(ident, p.Loaded(mid, 100, 0.1))
    assert {m: h.b.models[m].state for m in "abc"} == {"a": "loaded", "b": "loaded", "c": "unloaded"}
    # a worker that never comes does not block the others forever
    h2 = Harness({x: spec(preload=True) for x in "ab"}, memory_budget=250)
    assert not of(h2.ready(b"wb", model="b", est=100), p.Load)
    assert of(h2.advance(10.5, alive=(b"wb",)), p.Load) == [p.Load("b")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    cfg = {"broker": {"memory_budget": BUDGET, "min_residency_s": 0.0, "heartbeat_interval_ms": 250},
           "supervisor": SUPERVISOR_FAST,
           "models": {"pinned": fake(20 * MB, pin=True), "b": fake(100 * MB), "c": fake(100 * MB),
                      "d": fake(100 * MB, load_s=0.6), "huge": fake(300 * MB, preload=False),
                      "broken": fake_model(preload=False, fake={"fail_load": "simulated bad checkpoint"})}}
    st = Stack(tmp_path_factory.mktemp("memory"), cfg)
    with running(st, 60, ("pinned", "b", "c")):
        yield st


def http_models(st: Stack) -> dict[str, dict]:
    status, _, raw = st.http("GET", "/v1/models")
    assert status == 200
    import json
    return {m["id"]: m for m in json.loads(raw)["data"]}


def states(st: Stack) -> dict[str, str]:
    return {m["id"]: m["status"] for m in st.models()}


class BudgetWatch:
    """Samples mmi.stats in the background: committed must never exceed the budget."""

    def __init__(self, st: Stack):
        self.st, self.worst, self.samples = st, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            mem = self.st.query(p.Q_STATS)["memory"]
            self.worst = max(self.worst, mem["committed"])
            self.samples += 1
            time.sleep(0.02)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(2)


def test_preload_in_config_order_within_budget(stack):
    # pinned (20) + b (100) + c (100) fit; d's preload would need an eviction: preload never evicts
    assert states(stack) == {"pinned": "loaded", "b": "loaded", "c": "loaded", "d": "unloaded",
                             "huge": "unloaded", "broken": "unloaded"}
    models = http_models(stack)
    for mid in ("pinned", "b", "c"):
        m = models[mid]
        assert m["status"] == "loaded" and m["memory"]["weights_bytes"] > 0 and m["load_seconds"] > 0
        assert {"last_used", "loaded_at", "pinned", "failures", "queue_depth", "inflight"} <= set(m)
    assert models["pinned"]["pinned"] is True and models["b"]["pinned"] is False
    assert stack.query(p.Q_STATS)["memory"] == {"budget": BUDGET, "committed": 220 * MB}


def test_lru_eviction_load_on_demand_and_pinned_never_evicted(stack):
    with BudgetWatch(stack) as watch:
        assert post(stack.http_base, chat_body("b"))[0] == 200         # b used: c is now the LRU
        before = stack.query(p.Q_STATS)["counters"].get("evictions_total.lru", 0)
        # three requests for d while it loads (0.6 s): they queue, then all run
        with ThreadPoolExecutor(3) as pool:
            t0 = time.monotonic()
            futs = [pool.submit(post, stack.http_base, chat_body("d")) for _ in range(3)]
            seen = wait_for(lambda: (lambda m: m if m["status"] == "loading" and m["queue_depth"] >= 1 else None)(
                http_models(stack)["d"]), 5, step=0.02, what="d loading with requests queued")
            assert all(f.result()[0] == 200 for f in futs)
            took = time.monotonic() - t0
        assert took >= 0.6 and seen["queue_depth"] >= 1
        # c (least recently used, unpinned) went; pinned stayed although it was never used
        assert states(stack) == {"pinned": "loaded", "b": "loaded", "c": "unloaded", "d": "loaded",
                                 "huge": "unloaded", "broken": "unloaded"}
        # now c again: b was used before d, so b goes
        assert post(stack.http_base, chat_body("c"))[0] == 200
        assert states(stack)["b"] == "unloaded" and states(stack)["d"] == "loaded"
        assert states(stack)["pinned"] == "loaded"
        after = stack.query(p.Q_STATS)["counters"]
        assert after["evictions_total.lru"] - before == 2
    assert watch.samples > 10 and watch.worst <= BUDGET, watch.worst
    models = http_models(stack)
    assert models["d"]["last_used"] > models["pinned"]["loaded_at"]
    assert models["d"]["load_seconds"] >= 0.6 and models["c"]["memory"]["weights_bytes"] == 100 * MB


def test_model_that_cannot_fit_alone_is_507_at_once(stack):
    t0 = time.monotonic()
    status, hdrs, body = post(stack.http_base, chat_body("huge"))
    assert status == 507 and time.monotonic() - t0 < 1.0
    err = body["error"]
    assert err["code"] == "insufficient_memory"
    assert "huge" in err["message"] and str(BUDGET) in err["message"] and "300000000" in err["message"]
    m = http_models(stack)["huge"]
    assert m["status"] == "unloaded" and "insufficient_memory" in m["last_error"]
    assert states(stack)["pinned"] == "loaded"      # nothing was evicted for a hopeless load


def test_failed_load_is_reported_with_failures(stack):
    status, _, body = post(stack.http_base, chat_body("broken"))
    assert status == 500 and body["error"]["code"] == "load_failed"
    assert "simulated bad checkpoint" in body["error"]["message"]
    m = http_models(stack)["broken"]
    assert m["status"] == "failed" and m["failures"] == 1 and "simulated bad checkpoint" in m["last_error"]


# ---- the real tiny MLX model ----------------------------------------------------------------------------


@pytest.mark.mlx
def test_real_mlx_memory_reports(tmp_path):
    pytest.importorskip("mlx.core")
    cfg = {"broker": {"heartbeat_interval_ms": 250},
           "models": {"tiny": {"path": "tiny:qwen2_vl", "engine": "mlx", "preload": True,
                               "max_pixels": 150_000}}}
    st = Stack(tmp_path, cfg, procs=("broker", "supervisor"))
    try:
        st.start(ready_timeout_s=90, loaded=("tiny",))
        with Client(st.client_endpoint, default_ttl_s=60) as c:
            (m,) = c.models("tiny")
            mem = m["memory"]
            assert mem["weights_bytes"] > 0 and mem["active_bytes"] >= mem["weights_bytes"] > 0
            assert c.ground("tiny", IMG, "click the button").result["points"]
            # the job's activations show in the next report's peak (tens of MB for ~1 MB of weights)
            peak = wait_for(lambda: (lambda v: v if v > 2 * mem["weights_bytes"] else 0)(
                c.models("tiny")[0]["memory"]["peak_bytes"]), 3, what="job peak reported")
            status = c.unload("tiny")
            assert status["status"] == "unloaded"
            (m,) = c.models("tiny")
            assert m["memory"]["weights_bytes"] == 0
            assert m["memory"]["active_bytes"] < mem["weights_bytes"]       # released
            assert c.load("tiny")["status"] == "loaded"                     # and back
            assert c.models("tiny")[0]["memory"]["active_bytes"] >= mem["weights_bytes"]
            print(f"\ntiny mlx: weights {mem['weights_bytes']} B, active after load {mem['active_bytes']} B, "
                  f"peak {peak} B, active after unload {m['memory']['active_bytes']} B")
    finally:
        st.stop()
