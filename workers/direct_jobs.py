"""Direct jobs: a client's copy of a SUBMIT, sent straight to this worker ahead of the broker's JOB.

A client on this host that had a direct answer from us (common/protocol.py's Final, `jobs_to`)
sends its next SUBMITs for our model to our PULL socket as well as to the broker. While the broker
routes the job (three hops, each a thread woken after the last forward's idle), we decode its
screenshot. The copy is only a head start: the job runs when the broker's JOB for it comes, with
the same params and the same bytes, and it is answered as any JOB is. Otherwise it is dropped
unanswered: when another JOB, a LOAD or an UNLOAD comes first, on a reconnect or shutdown, or when
no JOB comes within WAIT_S (the broker refused the job, queued it, or gave it to another replica).

The control thread takes a copy only while compute has no job left to answer, one at a time, and
not for a job whose JOB came already (a copy may lose the race): that is when a request's way in is
the whole wait (with jobs held, preprocessing already overlaps the forward), and it bounds what a
copy can hold to one prepared job for WAIT_S.

Measured (bench/RESULTS.md, thirty-first session, 2B at 1080p): copies came 0.65-0.9 ms before
their JOB on two H200 hosts; the serving overhead fell 0.2-0.35 ms (median) on one and not on the
other, where the decode took 0.1-0.5 ms longer while the JOB was received and compared beside it.

`EarlyGate` is the one place where the control thread (a JOB confirms) and the compute thread (no
JOB came) race to decide a copy's fate; whichever comes first wins, under a lock.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

WAIT_S = 0.5      # a prepared copy waits this long for its JOB; the broker routes one in ~1 ms
RCVHWM = 4        # copies queued in our PULL socket; beyond it a client's PUSH drops them
BIND = "tcp://127.0.0.1:*"   # loopback only: copies come from clients on this host


class EarlyGate:
    def __init__(self, params: dict, blobs: list):
        self._params = params
        self._blobs: list | None = blobs   # to compare with the JOB's; the ticket lets go of its own
        self._lock = threading.Lock()
        self._decided = threading.Event()
        self.confirmed = False
        self.dropped = False

    def same_job(self, params: dict, blobs: list) -> bool:
        """The JOB asks what the copy asked: equal params and byte-equal blobs (job ids are the
        clients' own, so another client's job could bear this one's id)."""
        mine = self._blobs
        return (mine is not None and params == self._params and len(blobs) == len(mine)
                and all(_same_bytes(a, b) for a, b in zip(mine, blobs)))

    def confirm(self, apply: Callable[[], Any]) -> bool:
        """The JOB came: `apply` its fields to the ticket and let it run; False if already dropped."""
        with self._lock:
            if self.dropped:
                return False
            apply()
            self.confirmed = True
            self._blobs = None
        self._decided.set()
        return True

    def drop(self) -> bool:
        """No JOB for it (now): True once it is dropped, by this call or before; False if confirmed."""
        with self._lock:
            if not self.confirmed:
                self.dropped = True
                self._blobs = None
        self._decided.set()
        return self.dropped

    def wait(self, timeout_s: float) -> bool:
        """Compute thread, the copy prepared: True once confirmed (within `timeout_s`)."""
        self._decided.wait(timeout_s)
        return self.confirmed


def _same_bytes(a: Any, b: Any) -> bool:
    x = np.frombuffer(getattr(a, "buffer", a), np.uint8)
    y = np.frombuffer(getattr(b, "buffer", b), np.uint8)
    # array_equal in NumPy's C loop: ~0.2 ms per MB here, where comparing memoryviews takes ~1 ms
    return x.size == y.size and bool(np.array_equal(x, y))
