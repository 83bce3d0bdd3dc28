"""The stack helper itself: a stack that cannot start must fail the test at once, not hang it."""
from __future__ import annotations

import time

import pytest

from tests.stackutil import Stack, fake_model


def test_a_stack_that_exits_at_start_is_reported_within_seconds(tmp_path):
    """Before: with no broker ever listening, the readiness query's send blocked for ever (its
    DEALER queues nothing until connected), as on a GPU machine without honcho."""
    st = Stack(tmp_path, {"models": {"m": fake_model()}}, procs=("nosuchproc",))
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="stack exited"):
            st.start(ready_timeout_s=20)
    finally:
        st.stop()
    assert time.monotonic() - t0 < 10
