"""Test helpers for the worker and supervisor: a raw ROUTER that speaks common.wire on the worker
link (standing in for the broker), config files, and process start/stop with no leftovers."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
import zmq
from PIL import Image

from common import protocol as p
from common import wire
from common.zmqutil import free_tcp_endpoint, make_socket

ROOT = Path(__file__).resolve().parent.parent


def png(width: int = 640, height: int = 480, pad: int = 0) -> bytes:
    """A real PNG; `pad` bytes of a private ancillary chunk make it bigger without more pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 100, 50)).save(buf, "PNG")
    data = buf.getvalue()
    if pad:
        import struct
        import zlib
        body = b"\0" * pad
        chunk = struct.pack(">I", pad) + b"prVt" + body + struct.pack(">I", zlib.crc32(b"prVt" + body))
        data = data[:-12] + chunk + data[-12:]   # before IEND
    return data


def write_config(tmp_path: Path, worker_endpoint: str, models: dict, **sections: Any) -> Path:
    cfg = {"broker": {"worker_endpoint": worker_endpoint, "client_endpoint": free_tcp_endpoint(),
                      **sections.pop("broker", {})},
           "models": models, "cache_dir": str(tmp_path / "cache"), **sections}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fake_spec(**fake: Any) -> dict:
    return {"path": "fake", "engine": "fake", "max_batch": fake.pop("max_batch", 4),
            "fake": {"load_s": 0.01, **fake}}


def spawn(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, start_new_session=True,
                            env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """SIGKILL the process group if still running; never hangs."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass
    if proc.stderr:
        proc.stderr.close()


def terminate(procs: list[subprocess.Popen], timeout_s: float = 15.0) -> None:
    """Graceful stop as honcho does it: SIGTERM each process group, then SIGKILL what is left."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc), in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class RawBroker:
    """ROUTER on the worker link. `recv` answers worker heartbeats with BrokerHeartbeat (so the
    worker sees a live broker) unless `auto_heartbeat` is False, and skips heartbeats by default;
    WorkerFinishing (advisory, as the real broker treats it) is skipped too and kept, in order
    of arrival among the other messages, in `finishing` as (index of the next message, message)."""

    def __init__(self, endpoint: str | None = None, incarnation: str = "inc-1"):
        self.endpoint = endpoint or free_tcp_endpoint()
        self.ctx = zmq.Context()
        self.sock = make_socket(self.ctx, zmq.ROUTER)
        self.sock.bind(self.endpoint)
        self.incarnation = incarnation
        self.auto_heartbeat = True
        self.heartbeats: list[tuple[bytes, p.Heartbeat]] = []
        self.finishing: list[tuple[int, p.WorkerFinishing]] = []
        self.received = 0     # messages returned by recv
        self._seq = 0

    def send(self, ident: bytes, msg: p.Message, blobs: tuple | list = ()) -> None:
        self.sock.send_multipart([ident, *wire.encode(msg, blobs)])

    def send_raw(self, ident: bytes, frames: list[bytes]) -> None:
        self.sock.send_multipart([ident, *frames])

    def recv(self, timeout_s: float = 5.0, skip_heartbeats: bool = True) -> tuple[bytes, p.Message, list]:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise TimeoutError(f"nothing from the worker link within {timeout_s}s")
            frames = self.sock.recv_multipart()
            msg, blobs = wire.decode(frames[1:], wire.FROM_WORKER)
            if isinstance(msg, p.Heartbeat):
                self.heartbeats.append((frames[0], msg))
                if self.auto_heartbeat:
                    self._seq += 1
                    try:
                        self.send(frames[0], p.BrokerHeartbeat(seq=self._seq, broker_incarnation=self.incarnation))
                    except zmq.ZMQError:
                        pass   # that worker has already gone (EHOSTUNREACH)
                if skip_heartbeats:
                    continue
            if isinstance(msg, p.WorkerFinishing):
                self.finishing.append((self.received, msg))
                continue
            self.received += 1
            return frames[0], msg, blobs

    def expect(self, cls: type, timeout_s: float = 5.0, ignore: tuple = ()) -> tuple[bytes, Any, list]:
        """The next message, which must be a `cls` (messages of `ignore` types are skipped)."""
        while True:
            ident, msg, blobs = self.recv(timeout_s)
            if isinstance(msg, ignore) and not isinstance(msg, cls):
                continue
            assert isinstance(msg, cls), f"expected {cls}, got {msg!r}"
            return ident, msg, blobs

    def quiet(self, seconds: float) -> list:
        """Everything but heartbeats received during `seconds` (expected: nothing)."""
        got = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                got.append(self.recv(max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                break
        return got

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def our_pids(config_path: Path, module: str | None = None) -> list[int]:
    """Live processes of one stack: $GROUNDING_CONFIG or the config path names it. `module`:
    only those started as `python -m <module>`."""
    needle = str(config_path).encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as fh:
                cmd = fh.read()
            with open(f"/proc/{d}/environ", "rb") as fh:
                env = fh.read()
        except OSError:
            continue
        if (b"GROUNDING_CONFIG=" + needle + b"\0" in env or needle in cmd) and pid_alive(int(d)):
            if module is None or b"\0-m\0" + module.encode() + b"\0" in cmd:
                out.append(int(d))
    return out
