"""common/malloc.py: a large request's buffers come back to the frontend and broker without page
faults (real stack, fake engine)."""
from __future__ import annotations

import base64
import http.client
import io
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.rawbroker import our_pids
from tests.stackutil import Stack, fake_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc on Linux only")


def _minor_faults(pid: int) -> int:
    """/proc/pid/stat's minflt (the 10th field; the command name may hold spaces)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def test_glibc_takes_the_thresholds():
    code = "from common.malloc import keep_freed_memory; assert keep_freed_memory()"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_a_large_request_costs_the_frontend_and_broker_no_page_faults(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (450, 450, 3), dtype=np.uint8)   # incompressible
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": "fake-x", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "click OK"}]}]}
    data = json.dumps(body).encode()
    assert len(data) > 750_000                    # as large as a text- and photo-dense 1080p screenshot's

    def post(conn: http.client.HTTPConnection) -> None:
        conn.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()

    with Stack(tmp_path, {"models": {"fake-x": fake_model()}}) as stack:
        stack.start(loaded=("fake-x",))
        pids: dict[str, int] = {}
        for module in ("frontend", "broker"):
            [pids[module]] = our_pids(stack.config_path, module)
        conn = http.client.HTTPConnection("127.0.0.1", stack.config["server"]["port"], timeout=30)  # kept alive
        for _ in range(5):                        # warm-up: the heaps grow to their working size
            post(conn)
        before = {m: _minor_faults(pid) for m, pid in pids.items()}
        for _ in range(5):
            post(conn)
        per_request = {m: (_minor_faults(pid) - before[m]) / 5 for m, pid in pids.items()}
        conn.close()
    # glibc's own thresholds: ~750 per such request in the frontend (bench/RESULTS.md)
    assert per_request["frontend"] < 40 and per_request["broker"] < 40, per_request
