"""Keeps this process's CPUs awake while the worker has jobs: a model's `keep_cpus_awake_ms`.

One thread per CPU the process may run on (its affinity: start the stack under `taskset` to
choose them), each pinned to its CPU at idle priority (SCHED_IDLE), spinning in C
(workers/keep_awake.c says why) from `hold()` until `release()` and the linger after it, then
asleep. Any other thread that wants one of those CPUs takes it at once, so the spinners never
delay real work; they burn power and show as busy CPUs, which is why this is off by default.
Linux only.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable

try:
    from workers import _keep_awake as NATIVE
except ImportError:
    NATIVE = None

FOREVER_NS = 2**63 - 1
START_WAIT_S = 5.0


class KeepAwake:
    """One at a time per process: the C side's deadline is the module's."""

    def __init__(self, linger_s: float, cpus: Iterable[int] | None = None):
        self.linger_ns = int(linger_s * 1e9)
        if cpus is None:
            cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ()
        self.cpus = sorted(cpus)
        self.threads: list[threading.Thread] = []
        self.native_ids: list[int] = []   # the spinners' thread ids, for /proc and tests
        self._failed: list[str] = []

    def start(self) -> str | None:
        """Start the spinners, asleep; -> None, or why they cannot run here (nothing left running)."""
        if not sys.platform.startswith("linux") or not hasattr(os, "SCHED_IDLE"):
            return "needs Linux (SCHED_IDLE)"
        if NATIVE is None:
            return "the C spinner (workers/keep_awake.c) was not built: reinstall with a C compiler"
        NATIVE.reset()
        ready = [threading.Event() for _ in self.cpus]
        self.threads = [threading.Thread(target=self._serve, args=(cpu, ev), name=f"keep-awake-{cpu}", daemon=True)
                        for cpu, ev in zip(self.cpus, ready)]
        for th in self.threads:
            th.start()
        if not all(ev.wait(START_WAIT_S) for ev in ready) and not self._failed:
            self._failed.append(f"a spinner did not start within {START_WAIT_S} s")
        if self._failed:
            self.stop()
            return self._failed[0]
        return None

    def _serve(self, cpu: int, ready: threading.Event) -> None:
        try:
            # 0 is this thread on Linux: each spinner on its own CPU, below every other thread
            os.sched_setaffinity(0, {cpu})
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:   # never spin at normal priority: that would take CPU from real work
            self._failed.append(f"CPU {cpu}: {exc}")
            ready.set()
            return
        self.native_ids.append(threading.get_native_id())
        ready.set()
        NATIVE.serve()

    def hold(self) -> None:
        """Spin from now until `release`."""
        NATIVE.hold_until(FOREVER_NS)

    def release(self) -> None:
        """Spin for the linger more, then sleep."""
        NATIVE.hold_until(time.monotonic_ns() + self.linger_ns)

    def stop(self) -> None:
        if NATIVE is not None:
            NATIVE.stop()
        for th in self.threads:
            th.join(timeout=2)
        self.threads = []
