"""Node supervisor: `python -m workers.supervisor [--config PATH]`.

Spawns one `python -m workers --model ID` per enabled model (per replica for a model with
`devices`: ID is then "<model>@<device>" and the worker sees only that GPU), restarts crashed
workers with exponential backoff, and reports host memory and worker exits to the broker (HOST on
the worker link; exits are sent at once so the broker fails or requeues their jobs without waiting
for heartbeats). Obeys KILL from the broker for its own children only (the job watchdog's last resort).
honcho stops everything when one Procfile process exits, which is why workers are not Procfile lines.

No orphans: children get PR_SET_PDEATHSIG (Linux) and also watch their parent pid themselves
(GROUNDING_SUPERVISOR_PID, portable), so even a SIGKILLed supervisor leaves no worker behind.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import zmq

from common import protocol as p
from common import wire
from common.config import AppConfig, Unit, add_config_argument, load_or_exit
from common.errors import ConfigError
from common.logs import configure_logging
from common.zmqutil import close_quietly, drain, make_socket
from workers.engine import HELPER_GPUS_ENV

log = logging.getLogger("workers.supervisor")

SUPERVISOR_PID_ENV = "GROUNDING_SUPERVISOR_PID"   # read by workers/__main__.py
STABLE_S = 10.0     # a worker that ran this long resets its restart backoff
PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    """One unit's worker slot (a model, or a replica). Times are time.monotonic() seconds."""
    model_id: str                # the unit id
    backoff_s: float
    env: dict = field(default_factory=dict)   # added to the worker's environment
    proc: subprocess.Popen | None = None
    state: str = "starting"      # starting / running / backoff / exited
    started_t: float = 0.0
    restart_at: float = 0.0
    restarts: int = 0
    exit_code: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.state == "running" else None


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM: /proc/meminfo on Linux, sysctl + vm_stat on macOS."""
    try:
        info = {}
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        return info.get("MemTotal", 0), info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:
        pass
    try:
        total = int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=2).stdout)
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=2).stdout
        page = int(out.split("page size of")[1].split()[0]) if "page size of" in out else 4096
        pages = {k.strip(): int(v.strip().rstrip(".")) for k, v in
                 (ln.split(":", 1) for ln in out.splitlines()[1:] if ":" in ln) if v.strip().rstrip(".").isdigit()}
        free = sum(pages.get(k, 0) for k in ("Pages free", "Pages inactive", "Pages speculative"))
        return total, free * page
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return 0, 0


def _pdeathsig_hook(parent_pid: int):
    """preexec_fn for children: SIGTERM when the supervisor dies (Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)   # loaded before fork: nothing to import in the child

    def hook() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:   # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def nvidia_gpus(listing: str = "/proc/driver/nvidia/gpus") -> int | None:
    """How many GPUs the NVIDIA driver lists (Linux); None where it lists none or cannot be read."""
    try:
        return len(os.listdir(listing)) or None
    except OSError:
        return None


def device_env(unit: Unit, environ: Mapping[str, str], gpus: int | None = None) -> dict:
    """The environment that puts a replica's worker on its GPU: CUDA_VISIBLE_DEVICES naming that
    one device, and HELPER_GPUS_ENV naming its vision split's helper GPUs (gpus_per_replica).
    Device numbers count within our own $CUDA_VISIBLE_DEVICES where that is set, as CUDA itself
    counts them, else among the machine's `gpus` where that is known. Raises ConfigError for a
    device that is not there (its worker could not even import MLX)."""
    if unit.device is None:
        return {}
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else None

    def cuda_id(device: int) -> str:
        if ids is None:
            if gpus is not None and device >= gpus:
                raise ConfigError(f"models.{unit.model_id}.devices: device {device}, and the NVIDIA "
                                  f"driver lists {gpus} GPU(s) on this machine")
            return str(device)
        if device >= len(ids):
            raise ConfigError(f"models.{unit.model_id}.devices: device {device} is not among the "
                              f"{len(ids)} of CUDA_VISIBLE_DEVICES={visible!r}")
        return ids[device]

    env = {"CUDA_VISIBLE_DEVICES": cuda_id(unit.device)}
    if unit.helpers:
        env[HELPER_GPUS_ENV] = ",".join(cuda_id(h) for h in unit.helpers)
    return env


class Supervisor:
    def __init__(self, cfg: AppConfig, config_path: str | None, environ: Mapping[str, str] = os.environ,
                 gpus: int | None = None):
        """`gpus`: the machine's NVIDIA GPUs (default: as the driver lists them)."""
        self.cfg = cfg
        self.sc = cfg.supervisor
        self.config_path = config_path
        self.environ = dict(environ)
        self.host = socket.gethostname()
        units = [u for u in cfg.units().values() if u.spec.enabled]
        if gpus is None and any(u.device is not None for u in units):
            gpus = nvidia_gpus()
        self.children = {u.id: Child(u.id, self.sc.restart_backoff_s, device_env(u, environ, gpus)) for u in units}
        self.exited: list[int] = []      # pids not yet reported to the broker
        self._stop = False

    # ---- children -------------------------------------------------------------------------------

    def _spawn(self, child: Child) -> None:
        argv = [sys.executable, "-m", "workers"]
        if self.config_path:
            argv += ["--config", self.config_path]
        argv += ["--model", child.model_id]
        env = dict(self.environ, **child.env, **{SUPERVISOR_PID_ENV: str(os.getpid())})
        # own session: a terminal's Ctrl-C reaches only us; we stop workers in order
        child.proc = subprocess.Popen(argv, env=env, start_new_session=True,
                                      preexec_fn=_pdeathsig_hook(os.getpid()))
        child.state, child.started_t, child.exit_code = "running", time.monotonic(), None
        log.info("started worker for %s (pid %d)", child.model_id, child.proc.pid)

    def _reap(self) -> bool:
        """Collect exited children; schedule restarts. True if any exited."""
        now, any_exited = time.monotonic(), False
        for child in self.children.values():
            if child.state != "running" or child.proc is None or child.proc.poll() is None:
                continue
            any_exited = True
            code = child.proc.returncode
            child.exit_code = code
            self.exited.append(child.proc.pid)
            how = f"signal {-code}" if code < 0 else f"status {code}"
            if self._stop:
                child.state = "exited"
                log.info("worker %s (pid %d) exited with %s", child.model_id, child.proc.pid, how)
                continue
            if now - child.started_t >= STABLE_S:
                child.backoff_s = self.sc.restart_backoff_s
            child.state, child.restart_at = "backoff", now + child.backoff_s
            log.warning("worker %s (pid %d) exited with %s; restart in %.2fs",
                        child.model_id, child.proc.pid, how, child.backoff_s)
            child.backoff_s = min(child.backoff_s * 2, self.sc.restart_backoff_max_s)
        return any_exited

    def _restart_due(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.state == "backoff" and now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)

    def _signal_all(self, sig: int) -> None:
        for child in self.children.values():
            if child.state == "running" and child.proc is not None:
                try:
                    os.kill(child.proc.pid, sig)
                except ProcessLookupError:
                    pass

    # ---- broker link ----------------------------------------------------------------------------

    def _report(self, dealer: zmq.Socket) -> None:
        total, avail = host_memory()
        workers = [{"model_id": c.model_id, "pid": c.proc.pid if c.proc else None, "state": c.state,
                    "exit_code": c.exit_code, "restarts": c.restarts} for c in self.children.values()]
        msg = p.Host(host=self.host, mem_total=total, mem_available=avail, workers=workers,
                     exited=list(self.exited))
        try:
            dealer.send_multipart(wire.encode(msg), zmq.NOBLOCK)
            self.exited.clear()
        except zmq.Again:
            pass   # broker not connected: the exits stay queued for the next report

    def _on_broker(self, frames: list) -> None:
        try:
            msg, _ = wire.decode(frames, wire.TO_WORKER)
        except wire.ProtocolError as exc:
            log.warning("dropped a bad message from the broker (%s)", exc)
            return
        if isinstance(msg, p.Kill):
            own = {c.pid for c in self.children.values() if c.pid is not None}
            if msg.pid not in own:
                log.warning("refusing to signal pid %d: not one of our workers", msg.pid)
                return
            log.warning("broker asks to signal worker pid %d with %d (%s)", msg.pid, msg.signal, msg.reason)
            try:
                os.kill(msg.pid, msg.signal)
            except (ProcessLookupError, ValueError, OSError) as exc:
                log.warning("kill(%d, %d) failed: %s", msg.pid, msg.signal, exc)

    # ---- main loop ------------------------------------------------------------------------------

    def run(self) -> int:
        ctx = zmq.Context()
        dealer = make_socket(ctx, zmq.DEALER, identity=b"s:" + uuid.uuid4().bytes)
        dealer.connect(self.cfg.broker.worker_endpoint)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        interval = self.sc.report_interval_ms / 1000.0
        try:
            for child in self.children.values():
                self._spawn(child)
            self._report(dealer)
            next_report, stop_deadline = time.monotonic() + interval, None
            while True:
                now = time.monotonic()
                due = [next_report] + [c.restart_at for c in self.children.values() if c.state == "backoff"]
                if stop_deadline is not None:
                    due.append(stop_deadline)
                events = dict(poller.poll(max(0, int((min(due) - now) * 1000)) + 1))
                if events.get(wake_r):
                    try:
                        wake_r.recv(256)
                    except BlockingIOError:
                        pass
                if events.get(dealer):
                    for frames in drain(dealer, copy=True):
                        self._on_broker(frames)
                if self._stop and stop_deadline is None:
                    log.info("stopping %d worker(s)", sum(c.state == "running" for c in self.children.values()))
                    self._signal_all(signal.SIGTERM)
                    stop_deadline = time.monotonic() + self.sc.shutdown_grace_s
                    for c in self.children.values():
                        if c.state == "backoff":
                            c.state = "exited"
                if self._reap():
                    self._report(dealer)   # at once: the broker fails the dead worker's jobs now
                if stop_deadline is not None:   # not self._stop: a signal may land between checks
                    if all(c.state != "running" for c in self.children.values()):
                        break
                    if time.monotonic() >= stop_deadline:
                        log.warning("grace expired; SIGKILL to remaining workers")
                        self._signal_all(signal.SIGKILL)
                        for c in self.children.values():
                            if c.state == "running" and c.proc is not None:
                                c.proc.wait(5)
                        self._reap()
                        break
                else:
                    self._restart_due()
                if time.monotonic() >= next_report:
                    next_report = time.monotonic() + interval
                    self._report(dealer)
            self._report(dealer)
            return 0
        finally:
            self._signal_all(signal.SIGKILL)   # only reached with children alive on an exception
            signal.set_wakeup_fd(old_fd)
            for sig, h in handlers.items():
                signal.signal(sig, h)
            close_quietly(dealer)
            ctx.term()
            wake_r.close()
            wake_w.close()

    def _on_signal(self, signum: int, frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stop = True


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.supervisor",
                                     description="Run one worker per enabled model, restart them, report to the broker.")
    add_config_argument(parser)
    args = parser.parse_args(argv)
    cfg = load_or_exit(args.config, environ)
    configure_logging("supervisor", cfg.log_level)
    if not cfg.enabled_models():
        log.warning("no enabled models in the config; nothing to supervise")
    try:
        supervisor = Supervisor(cfg, args.config, environ)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
