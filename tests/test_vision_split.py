"""A vision split (gpus_per_replica, workers/mlx/split.py): the worker and its helper processes
share every vision block's attention heads and, where it pays, the language model's tokens. On the CPU the ranks talk over MLX's ring backend on
loopback, the same code as NCCL between GPUs; real helper processes, tiny generated checkpoints."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.config import ConfigError, parse_config
from workers.engine import HELPER_GPUS_ENV
from tests.rawbroker import pid_alive
from tests.test_faults import wait_for
from workers.supervisor import device_env

pytestmark = pytest.mark.mlx
pytest.importorskip("mlx.core")


def _in_a_fresh_process(scenario: str, *args) -> dict:
    """MLX joins one distributed group per process, so each scenario's worker side (rank 0) is a
    process of its own: tests/split_scenarios.py, which prints its findings as JSON."""
    out = subprocess.run([sys.executable, "-m", "tests.split_scenarios", scenario, *map(str, args)],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backbone", ["qwen2_vl", "qwen2_5_vl"])
def test_a_split_forward_gives_one_process_results_bit_for_bit(backbone, tmp_path):
    r = _in_a_fresh_process("compare", backbone, tmp_path)
    assert r["helper_alive"] and r["language_split"]     # the language model split too
    # one image, then two sizes in one batch, with the language model split and not: the same
    # points and attention bytes as one process
    assert r["same"] == [[True], [True, True]] * 2
    # unload and load again: the same helper process, the same answer
    assert r["same_helper_after_reload"] and r["same_after_reload"]
    # the worker holds its share of the tower's qkv weights only, and reports that
    whole, split = r["weights"]
    assert split < whole


def test_a_split_forward_of_a_quantized_model_keeps_a_screenshot_for_questions_as_one_process_does(tmp_path):
    r = _in_a_fresh_process("cached", tmp_path)
    first, *later = r["cached_tokens"][1]
    assert first == 0 and all(n > 0 for n in later)        # the later questions ran from the kept state
    assert r["cached_tokens"][0] == r["cached_tokens"][1] and r["same"] == [True, True, True]


def test_the_worker_reports_its_helpers_memory_after_every_step(tmp_path):
    r = _in_a_fresh_process("memory", tmp_path)
    [loaded], [ran], [unloaded] = r["loaded"], r["ran"], r["unloaded"]
    # the helper holds the backbone but for what only the worker uses (token embeddings, merger,
    # pointer head), with the same share of the vision tower's qkv weights as the worker
    assert loaded["weights"] == r["own_backbone"] > 0 and loaded["active"] >= loaded["weights"]
    # a forward's activations show in its peak (reset at every forward, as the worker's per batch)
    assert ran["weights"] == loaded["weights"] and ran["peak"] > ran["active"]
    assert r["wire"] == [ran]
    assert unloaded["weights"] == 0 and unloaded["active"] < loaded["weights"]


def test_the_language_model_splits_where_the_work_saved_pays_for_the_exchanges():
    from workers.mlx.language import split_pays
    layer_2b, layer_7b = 46_792_704, 233_046_016       # q, k, v, o, gate, up, down of one layer
    assert not split_pays(layer_2b, 2816, 2)             # 1080p: measured no faster split
    assert split_pays(layer_7b, 2816, 2)                 # measured 25-30 ms faster
    assert not split_pays(layer_7b, 1024, 2) and split_pays(layer_2b, 16384, 4)
    assert split_pays(layer_2b, 3 * 2816, 2)              # a batch of three 1080p screenshots


def test_a_forward_that_fails_with_the_helper_in_it_ends_the_worker_and_then_the_helper(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tests.split_scenarios", "forward_fails", str(tmp_path)],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 70, out.stderr[-3000:]
    assert "vision split broken: a forward failed with helpers in it (RuntimeError: out of memory, say)" in out.stderr
    _ends_soon(json.loads(out.stdout.splitlines()[0])["helper_pid"])     # its stdin closed with the worker


def test_a_helper_inside_a_collective_ends_with_its_worker(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tests.split_scenarios", "orphan", str(tmp_path)],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    _ends_soon(json.loads(out.stdout.splitlines()[0])["helper_pid"])


def test_a_helper_stuck_anywhere_ends_once_its_worker_is_gone():
    # Over NCCL a collective whose peer died waits for ever (the ring backend above errors out when
    # the socket closes); the helper's parent watch ends it wherever its main thread is.
    stuck = ("import sys, threading, time; from workers.mlx.split import _end_with_parent; "
             "threading.Thread(target=_end_with_parent, args=(int(sys.argv[1]),), daemon=True).start(); time.sleep(60)")
    worker = ("import os, subprocess, sys; p = subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid())], "
              "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)")
    out = subprocess.run([sys.executable, "-c", worker, stuck], capture_output=True, text=True, timeout=60)
    _ends_soon(int(out.stdout))


def _ends_soon(pid: int) -> None:
    wait_for(lambda: not pid_alive(pid), 20, step=0.1, what=f"process {pid} gone")


def test_a_split_over_ranks_that_do_not_divide_the_patches_gives_one_process_results(tmp_path):
    r = _in_a_fresh_process("three_ranks", tmp_path)
    # one screenshot alone, then with a second; each rank runs a third of the rows through the MLP
    assert [sum(r["patches"][:k]) % 3 for k in (1, 2)] == [2, 2]       # the last rank's share is short
    assert r["same"] == [[True], [True, True]]


def test_heads_that_do_not_split_evenly_fail_the_load_with_the_reason(tmp_path):
    r = _in_a_fresh_process("uneven", tmp_path)           # the tiny towers have 2 heads, 3 ranks
    assert "2 attention heads do not split over 3" in r["error"]


def test_a_helper_that_dies_is_reported():
    assert "exited with status -9" in _in_a_fresh_process("death")["reason"]


def test_a_helper_ignores_the_shutdown_signals_and_ends_with_its_worker():
    r = _in_a_fresh_process("sigterm")
    assert r == {"alive_after_sigterm": True, "exit_status": 0, "reported_dead": False}


def test_config_gives_each_replica_its_gpus_and_the_helpers_theirs():
    cfg = parse_config({"models": {"g": {"path": "x", "devices": [0, 1, 2, 3], "gpus_per_replica": 2}}})
    units = cfg.units()
    assert [(u.id, u.device, u.helpers) for u in units.values()] == [("g@0", 0, (1,)), ("g@2", 2, (3,))]
    env = device_env(units["g@2"], {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert env == {"CUDA_VISIBLE_DEVICES": "6", HELPER_GPUS_ENV: "7"}
    with pytest.raises(ConfigError, match="device 3 is not among"):
        device_env(units["g@2"], {"CUDA_VISIBLE_DEVICES": "4,5,6"})


@pytest.mark.parametrize("models, message", [
    ({"g": {"path": "x", "devices": [0, 1, 2], "gpus_per_replica": 2}}, "whole number of replicas' GPUs"),
    ({"g": {"path": "x", "gpus_per_replica": 2}}, "needs `devices`"),
    ({"g": {"path": "x", "devices": [0, 1], "gpus_per_replica": 0}}, "within 1..8"),
    ({"g": {"path": "x", "devices": [0, 1], "gpus_per_replica": 2}, "h": {"path": "y", "devices": [1]}},
     "device 1 is a vision split's helper GPU of g@0"),
    ({"g": {"path": "x", "devices": [1, 0], "gpus_per_replica": 2}, "h": {"path": "y"}},
     "runs on device 0.*helper GPU of g@1"),
    ({"g": {"path": "x", "devices": [0, 1], "gpus_per_replica": 2},
      "h": {"path": "y", "devices": [2, 1], "gpus_per_replica": 2}}, "helper GPU of both g@0 and h@2"),
])
def test_config_refuses_splits_that_cannot_work(models, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": models})


def test_a_model_without_devices_may_share_device_0_with_a_split_that_starts_there():
    cfg = parse_config({"models": {"g": {"path": "x", "devices": [0, 1], "gpus_per_replica": 2},
                                   "h": {"path": "y"}}})
    assert sorted(cfg.units()) == ["g@0", "h"]


def test_status_names_every_gpu_of_a_split_replica():
    from tests.test_broker_core import Harness, of, spec
    from common import protocol as p
    h = Harness({"g": spec(devices=[0, 1, 2, 3], gpus_per_replica=2)})
    h.ready(b"w-0", "g@0", "loaded")
    h.ready(b"w-2", "g@2")
    [reply] = of(h.query(p.Q_MODELS, {"model": "g"}), p.QueryReply)
    status = reply.data["models"][0]
    assert [(r["device"], r["devices"], r["status"]) for r in status["replicas"]] == \
        [(0, [0, 1], "loaded"), (2, [2, 3], "unloaded")]


def test_status_and_metrics_give_the_helpers_memory_as_their_worker_reports_it():
    from broker import status
    from common import protocol as p
    from frontend.metrics import Metrics
    from tests.test_broker_core import Harness, spec
    h = Harness({"g": spec(devices=[0, 1, 2, 3], gpus_per_replica=2)})
    h.ready(b"w-0", "g@0", "loaded")
    h.ready(b"w-2", "g@2", "loaded")
    helper = {"active": 700, "peak": 900, "cache": 50, "weights": 600}
    h.worker(b"w-0", p.Heartbeat(1, "loaded", 1, [], mem={"active": 2000, "weights": 1500, "helpers": [helper]}))
    g = status.group_status(h.b, "g")
    assert [r["helper_memory"] for r in g["replicas"]] == [
        [{"device": 1, "weights_bytes": 600, "active_bytes": 700, "peak_bytes": 900, "cache_bytes": 50}],
        [{"device": 3, "weights_bytes": 0, "active_bytes": 0, "peak_bytes": 0, "cache_bytes": 0}]]   # none yet
    assert g["memory"]["active_bytes"] == 2000       # the workers' own GPUs, as the broker budgets them
    assert (g["memory"]["helper_weights_bytes"], g["memory"]["helper_active_bytes"]) == (600, 700)
    text = Metrics().render(status.stats(h.b, h.now)).decode()
    assert 'grounding_model_memory_bytes{kind="helper_weights",model="g"} 600.0' in text


def test_the_api_gives_the_helpers_memory_from_a_running_stack(tmp_path):
    """Through the real processes and the wire: a split replica's worker (the fake engine, which
    reports a helper's memory without starting one) -> broker -> HTTP status and /metrics."""
    from tests.stackutil import Stack, fake_model
    from tests.test_faults import running
    cfg = {"models": {"g": fake_model(devices=[0, 1], gpus_per_replica=2,
                                      fake={"load_s": 0.05, "weights_bytes": 4000, "helper_weights_bytes": 1000})}}
    st = Stack(tmp_path, cfg, env={"CUDA_VISIBLE_DEVICES": "GPU-test-a,GPU-test-b"})
    with running(st, 30, ("g",)):
        code, _, raw = st.http("GET", "/v1/models/g")
        [replica] = json.loads(raw)["replicas"]
        assert code == 200 and replica["devices"] == [0, 1]
        assert replica["helper_memory"] == [{"device": 1, "weights_bytes": 1000, "active_bytes": 1000,
                                             "peak_bytes": 1000, "cache_bytes": 0}]
        metrics = st.http("GET", "/metrics")[2].decode()
        assert 'grounding_model_memory_bytes{kind="helper_weights",model="g"} 1000.0' in metrics
