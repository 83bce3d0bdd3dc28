"""The idle-priority spinners (workers/keep_awake.py) and a worker's `keep_cpus_awake_ms`.

Real threads and, for the worker, the whole stack with the fake engine; what the spinners do is
read from /proc: each thread's scheduling policy, its CPU and the CPU time it has used.
"""
from __future__ import annotations

import base64
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.rawbroker import png
from tests.stackutil import Stack, fake_model
from workers import keep_awake
from workers.keep_awake import KeepAwake

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE spinners are Linux only")
SCHED_IDLE = 5
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def task_stat(pid: int | str, tid: int) -> tuple[float, int]:
    """(CPU seconds used, scheduling policy) of one thread, from /proc."""
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S, int(fields[38])


def cpu_seconds(pid: int | str, tids: list[int]) -> float:
    return sum(task_stat(pid, t)[0] for t in tids)


def idle_tasks(pid: int) -> list[int]:
    """The threads of `pid` that run at idle priority."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            if task_stat(pid, int(tid))[1] == SCHED_IDLE:
                out.append(int(tid))
        except FileNotFoundError:   # a thread that ended meanwhile
            pass
    return out


def test_the_spinner_is_built_on_linux():
    # optional at install, like the PNG unfilterer, but CI and every Linux machine with a compiler build it
    assert keep_awake.NATIVE is not None


@pytest.fixture
def spinners():
    awake = KeepAwake(linger_s=0.3)
    assert awake.start() is None
    yield awake
    awake.stop()


def test_one_spinner_per_cpu_each_on_its_cpu_at_idle_priority(spinners):
    assert spinners.cpus == sorted(os.sched_getaffinity(0))
    assert len(spinners.native_ids) == len(spinners.cpus)
    assert sorted(cpu for t in spinners.native_ids for cpu in os.sched_getaffinity(t)) == spinners.cpus
    assert all(task_stat("self", t)[1] == SCHED_IDLE for t in spinners.native_ids)


def test_spinners_sleep_until_held_and_stop_after_the_linger(spinners):
    ids = spinners.native_ids
    before = cpu_seconds("self", ids)
    time.sleep(0.4)
    assert cpu_seconds("self", ids) - before < 0.05          # started asleep
    spinners.hold()
    before = cpu_seconds("self", ids)
    time.sleep(0.5)
    assert cpu_seconds("self", ids) - before > 0.2           # held: spinning (this thread sleeps meanwhile)
    spinners.release()                                       # 0.3 s of linger, then asleep
    time.sleep(0.5)
    before = cpu_seconds("self", ids)
    time.sleep(0.4)
    assert cpu_seconds("self", ids) - before < 0.05


def test_held_spinners_leave_the_cpus_to_other_threads(spinners):
    """A busy thread at normal priority gets its CPU back from the spinner there."""
    spinners.hold()
    used = []

    def busy() -> None:
        t0 = time.thread_time()
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            pass
        used.append(time.thread_time() - t0)

    th = threading.Thread(target=busy)
    th.start()
    th.join()
    # with the spinner taking an equal share it would be ~0.25 s (one CPU's worth, halved); alone, 0.5
    assert used[0] > 0.375


def test_stop_ends_every_spinner_and_new_ones_can_start():
    first = KeepAwake(linger_s=0)
    assert first.start() is None
    first.hold()
    threads = list(first.threads)
    first.stop()
    assert not any(th.is_alive() for th in threads)
    second = KeepAwake(linger_s=0, cpus=[sorted(os.sched_getaffinity(0))[0]])
    assert second.start() is None
    second.hold()
    time.sleep(0.2)
    assert cpu_seconds("self", second.native_ids) > 0.1
    second.stop()


def test_a_worker_spins_while_it_holds_jobs_and_for_the_linger_after(tmp_path):
    """`keep_cpus_awake_ms` through the config, as the Procfile's processes read it: the worker's
    spinners run through a request's forward and for the linger after its answer, then sleep; a
    model without it has none."""
    config = {"models": {"awake": fake_model(keep_cpus_awake_ms=800, fake={"load_s": 0.05, "latency_ms": 600}),
                         "plain": fake_model(fake={"load_s": 0.05, "latency_ms": 0})}}
    with Stack(tmp_path, config).start(loaded=("awake", "plain")) as stack:
        pid, plain_pid = stack.worker_pid("awake"), stack.worker_pid("plain")
        spinning = idle_tasks(pid)
        assert len(spinning) == len(os.sched_getaffinity(pid))
        assert idle_tasks(plain_pid) == []
        assert "keeping CPUs" in stack.log()
        body = {"model": "awake", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png(64, 48)).decode()}},
            {"type": "text", "text": "click OK"}]}]}
        idle_before = cpu_seconds(pid, spinning)
        answer: list = []
        request = threading.Thread(target=lambda: answer.append(stack.http("POST", "/v1/chat/completions", body)))
        request.start()
        time.sleep(0.4)                                       # inside the 600 ms forward
        during = cpu_seconds(pid, spinning)
        request.join()
        assert answer[0][0] == 200
        assert during - idle_before > 0.15                    # spinning through the forward
        time.sleep(0.3)                                       # inside the 800 ms linger
        lingering = cpu_seconds(pid, spinning)
        time.sleep(0.3)
        assert cpu_seconds(pid, spinning) - lingering > 0.1
        time.sleep(0.8)                                       # past it
        after = cpu_seconds(pid, spinning)
        time.sleep(0.4)
        assert cpu_seconds(pid, spinning) - after < 0.05
