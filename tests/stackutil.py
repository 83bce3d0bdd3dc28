"""Start the real stack for tests and benchmarks: the Procfile's processes under honcho.

`Stack(tmp_path, config)` writes the config (free loopback ports filled in) to a YAML file, runs
`honcho start -f Procfile <procs>` in its own process group with $GROUNDING_CONFIG pointing at it,
and waits until the broker answers (and the frontend's /v1/health, when it runs). `stop()` sends
SIGTERM like honcho's own shutdown, then SIGKILLs the group; nothing outlives the test.
With `api_key`, `http()` sends it as a Bearer token unless called with `auth=False`.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml
import zmq

from common import protocol as p
from common import wire
from common.zmqutil import free_tcp_endpoint, make_socket

ROOT = Path(__file__).resolve().parent.parent
ALL_PROCS = ("broker", "supervisor", "frontend")


def fake_model(**overrides: Any) -> dict:
    """A model entry for the fake engine (no MLX work)."""
    spec = {"path": "fake", "engine": "fake", "enabled": True, "preload": True,
            "fake": {"load_s": 0.05, "weights_bytes": 100_000_000}}
    spec.update(overrides)
    return spec


def tiny_model(backbone: str = "qwen2_vl", **overrides: Any) -> dict:
    """A model entry for a tiny random-weight GUI-Actor checkpoint on real MLX (CPU), generated
    into the stack's cache_dir on first load. max_pixels is small to keep CPU time low."""
    spec = {"path": f"tiny:{backbone}", "engine": "mlx", "enabled": True, "preload": True,
            "max_pixels": 200_000}
    spec.update(overrides)
    return spec


class Stack:
    def __init__(self, tmp_path: Path, config: dict, procs: tuple[str, ...] = ALL_PROCS,
                 api_key: str | None = None, env: dict[str, str] | None = None):
        """`env`: variables set in the stack's environment, over ours."""
        self.dir = Path(tmp_path)
        self.procs = procs
        self.api_key = api_key
        self.extra_env = dict(env or {})
        self.config = copy.deepcopy(config)
        broker = self.config.setdefault("broker", {})
        broker.setdefault("client_endpoint", free_tcp_endpoint())
        broker.setdefault("worker_endpoint", free_tcp_endpoint())
        server = self.config.setdefault("server", {})
        server.setdefault("port", int(free_tcp_endpoint().rsplit(":", 1)[1]))
        self.config.setdefault("cache_dir", str(self.dir / "cache"))
        self.config_path = self.dir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = self.dir / "stack.log"
        self.proc: subprocess.Popen | None = None

    @property
    def client_endpoint(self) -> str:
        return self.config["broker"]["client_endpoint"]

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.config['server']['port']}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["GROUNDING_CONFIG"] = str(self.config_path)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def start(self, ready_timeout_s: float = 60.0, loaded: tuple[str, ...] = ()) -> "Stack":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "honcho", "start", "-f", str(ROOT / "Procfile"), *self.procs],
            cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.wait_ready(ready_timeout_s, loaded)
        return self

    def wait_ready(self, timeout_s: float, loaded: tuple[str, ...] = ()) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"stack exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                models = {m["id"]: m for m in self.models()}
                ok = all(models.get(mid, {}).get("status") == "loaded" for mid in loaded)
                if ok and "frontend" in self.procs:
                    ok = self.http("GET", "/v1/health")[0] == 200
                if ok:
                    return
            except (OSError, TimeoutError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"stack not ready after {timeout_s}s:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def query(self, service: str, arg: dict | None = None, timeout_s: float = 2.0) -> dict:
        """Ask the broker directly over its client socket (no dependency on our client code)."""
        ctx = zmq.Context.instance()
        sock = make_socket(ctx, zmq.DEALER)
        # IMMEDIATE (make_socket) queues nothing before a connection: without a send timeout a
        # broker that never came up would block this send, and wait_ready with it, for ever
        sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        try:
            sock.connect(self.client_endpoint)
            qid = uuid.uuid4().hex
            try:
                sock.send_multipart(wire.encode(p.Query(id=qid, service=service, arg=arg or {})))
            except zmq.Again:
                raise TimeoutError(f"broker not reachable for {service}") from None
            if not sock.poll(int(timeout_s * 1000)):
                raise TimeoutError(f"broker did not answer {service}")
            msg, _ = wire.decode(sock.recv_multipart(), wire.TO_CLIENT)
            if isinstance(msg, p.Error):
                raise RuntimeError(f"{msg.code}: {msg.message}")
            assert isinstance(msg, p.QueryReply), msg
            return msg.data
        finally:
            sock.close(linger=0)

    def models(self) -> list[dict]:
        return self.query(p.Q_MODELS)["models"]

    def worker_pid(self, model_id: str, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for m in self.models():
                if m["id"] == model_id and m.get("worker") and m["worker"].get("pid"):
                    return int(m["worker"]["pid"])
            time.sleep(0.05)
        raise TimeoutError(f"no worker for {model_id}")

    def http(self, method: str, path: str, body: Any = None, headers: dict | None = None,
             timeout_s: float = 30.0, auth: bool = True) -> tuple[int, dict, bytes]:
        """(status, headers, body bytes); `body` is bytes as is, else JSON-encoded. Sends the
        stack's API key (when it has one) unless `auth` is false; `headers` win over it."""
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        base = {"Content-Type": "application/json"}
        if auth and self.api_key:
            base["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.http_base + path, data=data, method=method,
                                     headers={**base, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM the group (honcho forwards it), then SIGKILL whatever is left."""
        if self.proc is None:
            return None
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if code is None:
            self.proc.wait(5)
        self.proc = None
        return code

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
