"""Configuration: one YAML file -> frozen dataclasses, read once per process in `__main__`.

`load_config(path, environ)` takes the environment as an argument (tests never patch os.environ).
Unknown keys, wrong types and bad values raise `ConfigError` naming the key; `__main__` modules
print it and exit 2, never with a traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Mapping

import yaml

from common.errors import ConfigError

CONFIG_ENV = "GROUNDING_CONFIG"

# Used when neither --config nor $GROUNDING_CONFIG names a file. The model is a GUI-Actor
# checkpoint with random weights that the worker generates locally on first use: the stack works
# out of the box, but its answers are random until a real checkpoint is configured (see README).
EMBEDDED_DEFAULT = """
server:
  host: 127.0.0.1
  port: 8080
  default_model: gui-actor-tiny
models:
  gui-actor-tiny:
    path: "tiny:qwen2_vl"
    enabled: true
    preload: true
    min_pixels: 3136
    max_pixels: 401408      # 512 visual tokens: keeps the random demo model quick on a CPU
    max_context_length: 8192
profiles:
  fast: {max_pixels: 1048576}
  balanced: {max_pixels: 5720064}
  quality: {max_pixels: 12845056}
"""


def _check(cond: bool, key: str, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {why}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    default_model: str | None = None          # None: the first enabled model
    workers: int = 1                          # Sanic worker processes
    api_keys: list = field(default_factory=list)        # Bearer keys; empty: no auth
    cors_origins: list = field(default_factory=list)    # empty: CORS off; ["*"] allows any
    max_body_bytes: int = 64 * 1024 * 1024
    max_image_bytes: int = 32 * 1024 * 1024   # one encoded image
    max_image_pixels: int = 8192 * 8192       # decoded width*height; decompression-bomb cap
    request_timeout_s: float = 120.0          # job ttl when the request sets none
    allow_remote_images: bool = False         # http(s) image_url fetching
    remote_image_allowlist: list = field(default_factory=list)  # host names; empty: any host
    remote_image_timeout_s: float = 10.0
    access_log: bool = False
    # workers on this host also send each answer straight to the frontend, ahead of the broker's
    # copy (common/protocol.py's Final): three hops less on the answer's way out
    direct_answers: bool = True
    # ... and, once a worker has answered it straight, the frontend sends that model's next jobs
    # to the worker too, which decodes their screenshots while the broker routes them (needs
    # direct_answers; common/protocol.py's DIRECT_TO_WORKER)
    direct_jobs: bool = True

    def validate(self, key: str) -> None:
        _check(1 <= self.port <= 65535, f"{key}.port", "must be within 1..65535")
        _check(self.workers >= 1, f"{key}.workers", "must be >= 1")
        for name in ("max_body_bytes", "max_image_bytes", "max_image_pixels"):
            _check(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        _check(self.request_timeout_s > 0, f"{key}.request_timeout_s", "must be > 0")
        _check(all(isinstance(k, str) and k for k in self.api_keys), f"{key}.api_keys",
               "must be a list of non-empty strings")


@dataclass(frozen=True)
class BrokerConfig:
    client_endpoint: str = "tcp://127.0.0.1:5555"   # frontends and Python clients connect here
    worker_endpoint: str = "tcp://127.0.0.1:5556"   # workers and the supervisor connect here
    heartbeat_interval_ms: int = 1000
    heartbeat_liveness: int = 3               # missed intervals before a worker is lost
    queue_size: int = 32                      # per model
    global_queue_size: int = 256
    retry_after_ms: int = 1000                # advice sent with `overloaded`
    # bytes (int > 1), a fraction of the device's memory (0 < float <= 1), or "auto" (0.8)
    memory_budget: int | float | str = "auto"
    min_residency_s: float = 60.0             # a loaded model is not evicted sooner (no thrashing)
    load_timeout_s: float = 300.0
    unload_timeout_s: float = 10.0            # then the worker is made to exit
    job_stall_s: float = 120.0                # per-job progress watchdog
    poison_ttl_s: float = 600.0               # identical resubmits of a poison job are refused

    def validate(self, key: str) -> None:
        for name in ("client_endpoint", "worker_endpoint"):
            ep = getattr(self, name)
            _check(ep.startswith(("tcp://", "ipc://", "inproc://")), f"{key}.{name}",
                   "must start with tcp://, ipc:// or inproc://")
        _check(self.client_endpoint != self.worker_endpoint, f"{key}.worker_endpoint",
               "must differ from client_endpoint")
        for name in ("heartbeat_interval_ms", "heartbeat_liveness", "queue_size", "global_queue_size"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        mb = self.memory_budget
        _check(mb == "auto" or (isinstance(mb, float) and 0 < mb <= 1) or (isinstance(mb, int) and mb > 1),
               f"{key}.memory_budget", "must be 'auto', a fraction in (0, 1] or a byte count")
        for name in ("load_timeout_s", "unload_timeout_s", "job_stall_s"):
            _check(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        _check(self.min_residency_s >= 0, f"{key}.min_residency_s", "must be >= 0")


@dataclass(frozen=True)
class SupervisorConfig:
    restart_backoff_s: float = 0.5            # first restart delay after a crash; doubles
    restart_backoff_max_s: float = 30.0
    report_interval_ms: int = 1000            # HOST reports to the broker
    shutdown_grace_s: float = 10.0            # in-flight jobs may finish, then SIGKILL

    def validate(self, key: str) -> None:
        _check(0 < self.restart_backoff_s <= self.restart_backoff_max_s, f"{key}.restart_backoff_s",
               "must be > 0 and <= restart_backoff_max_s")
        _check(self.report_interval_ms >= 10, f"{key}.report_interval_ms", "must be >= 10")
        _check(self.shutdown_grace_s >= 0, f"{key}.shutdown_grace_s", "must be >= 0")


@dataclass(frozen=True)
class ModelSpec:
    """One configured model. Pixel counts are areas of the resized image in pixels."""
    path: str                                 # local dir, HF repo id (local cache only), or tiny:<backbone>
    enabled: bool = True
    preload: bool = False
    pin: bool = False                         # never evicted
    engine: str = "mlx"                       # mlx | fake (simulated, for tests and development)
    dtype: str = "auto"                       # auto (bf16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    quantize: int | None = None               # None | 4 | 8 bits (MLX affine quantization)
    min_pixels: int = 3136
    max_pixels: int = 5720064
    max_context_length: int = 8192
    topk: int = 3
    max_batch: int = 4                        # jobs batched into one forward pass
    prep_threads: int | None = None           # image decode/resize threads; None: half the cores, <= 4
    # the worker sends FINISHING a few ms before each forward's answers, so the threads the
    # answer crosses have just run when it comes (common/protocol.py's Finishing says why)
    finishing: bool = True
    # > 0: while the worker has jobs, and this many ms after its last answer, idle-priority
    # spinners keep the CPUs it may run on from idling, so the threads a request crosses wake on
    # awake cores (workers/keep_awake.py). 0.5-1.1 ms less per request on an H200 VM, for busy
    # CPUs while serving (README, "CPUs kept awake"). Linux only; 0: off
    keep_cpus_awake_ms: int = 0
    system_prompt: str | None = None          # None: the authors' prompt for the backbone
    # a screenshot's vision encoding and prompt prefix, kept for the next question about the same
    # image (workers/screen_cache.py); 0 turns it off
    screenshot_cache_mb: int = 512
    # screen sizes ("1920x1080") run once at load, so the first request pays no kernel compiling;
    # None: 1920x1080 on a GPU, none on the CPU; [] : none
    warmup: list | None = None
    # CUDA devices to serve the model from, one worker (a replica, with its own copy of the
    # weights) per device; the broker spreads requests over them (broker/placement.py). Numbers
    # count within $CUDA_VISIBLE_DEVICES where that is set. None: one worker, default device.
    devices: list | None = None
    # GPUs per replica: with 2 or more, each replica takes that many of `devices` in order; its
    # worker runs on the first and starts a helper process on each of the others, and they share
    # every vision block's attention heads and, where that pays, the language model's tokens
    # (workers/mlx/split.py): lower latency per request, one GPU's arithmetic. Those other GPUs
    # serve that replica alone.
    gpus_per_replica: int = 1
    fake: dict = field(default_factory=dict)  # fake engine knobs (load_s, latency_ms, weights_bytes, ...)

    def validate(self, key: str) -> None:
        _check(bool(self.path), f"{key}.path", "must not be empty")
        _check(self.engine in ("mlx", "fake"), f"{key}.engine", "must be 'mlx' or 'fake'")
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), f"{key}.dtype",
               "must be auto, float32, bfloat16 or float16")
        _check(self.quantize in (None, 4, 8), f"{key}.quantize", "must be null, 4 or 8")
        _check(self.min_pixels >= 28 * 28, f"{key}.min_pixels", "must be >= 784 (one 28x28 token)")
        _check(self.max_pixels >= self.min_pixels, f"{key}.max_pixels", "must be >= min_pixels")
        _check(self.max_context_length >= 64, f"{key}.max_context_length", "must be >= 64")
        _check(1 <= self.topk <= 100, f"{key}.topk", "must be within 1..100")
        _check(1 <= self.max_batch <= 64, f"{key}.max_batch", "must be within 1..64")
        _check(self.prep_threads is None or 1 <= self.prep_threads <= 64, f"{key}.prep_threads",
               "must be null or within 1..64")
        _check(type(self.keep_cpus_awake_ms) is int and 0 <= self.keep_cpus_awake_ms <= 60_000,
               f"{key}.keep_cpus_awake_ms", "must be an integer within 0..60000 (ms; 0 turns it off)")
        _check(isinstance(self.screenshot_cache_mb, int) and not isinstance(self.screenshot_cache_mb, bool)
               and 0 <= self.screenshot_cache_mb <= 1 << 20, f"{key}.screenshot_cache_mb",
               "must be an integer within 0..1048576 (MB; 0 turns the cache off)")
        _check(self.warmup is None or all(isinstance(v, str) and WARMUP_SIZE.fullmatch(v)
                                          and 28 <= min(warmup_size(v)) and max(warmup_size(v)) <= 8192
                                          for v in self.warmup),
               f"{key}.warmup", "must be null or a list of sizes like '1920x1080' (28..8192 each way)")
        _check(self.devices is None or (0 < len(self.devices) <= MAX_DEVICES
                                        and all(type(d) is int and 0 <= d < MAX_DEVICES for d in self.devices)
                                        and len(set(self.devices)) == len(self.devices)),
               f"{key}.devices", f"must be null or a non-empty list of distinct device numbers 0..{MAX_DEVICES - 1}")
        _check(type(self.gpus_per_replica) is int and 1 <= self.gpus_per_replica <= 8, f"{key}.gpus_per_replica",
               "must be an integer within 1..8")
        _check(self.gpus_per_replica == 1 or (self.devices is not None and len(self.devices) % self.gpus_per_replica == 0),
               f"{key}.gpus_per_replica", "above 1 needs `devices`, a whole number of replicas' GPUs "
                                          f"({self.gpus_per_replica} each)")

    def warmup_sizes(self, on_gpu: bool) -> list[tuple[int, int]]:
        """(width, height) of the screens to run at load."""
        if self.warmup is None:
            return [(1920, 1080)] if on_gpu else []
        return [warmup_size(v) for v in self.warmup]


WARMUP_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
MAX_DEVICES = 64


@dataclass(frozen=True)
class Unit:
    """What one worker process serves: a model, or one replica of a model with `devices`.
    `id` is the worker's name on the broker link: the model id, or "<model id>@<device>"."""
    id: str
    model_id: str
    spec: ModelSpec
    device: int | None = None       # CUDA device ordinal; None: the process's default device
    helpers: tuple = ()             # the devices of its vision split's helpers (gpus_per_replica)


def units_of(models: Mapping[str, ModelSpec]) -> list[Unit]:
    """Every model's units, in config order (a model's replicas in its `devices` order)."""
    out = []
    for mid, spec in models.items():
        if spec.devices is None:
            out.append(Unit(mid, mid, spec))
        else:
            per = spec.gpus_per_replica
            for i in range(0, len(spec.devices), per):
                first, *rest = spec.devices[i:i + per]
                out.append(Unit(f"{mid}@{first}", mid, spec, first, tuple(rest)))
    return out


def warmup_size(text: str) -> tuple[int, int]:
    w, h = WARMUP_SIZE.fullmatch(text).groups()
    return int(w), int(h)


@dataclass(frozen=True)
class Profile:
    max_pixels: int
    min_pixels: int | None = None

    def validate(self, key: str) -> None:
        _check(self.max_pixels >= 28 * 28, f"{key}.max_pixels", "must be >= 784")


DEFAULT_PROFILES = {"fast": Profile(1048576), "balanced": Profile(5720064), "quality": Profile(12845056)}


@dataclass(frozen=True)
class AppConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    models: dict = field(default_factory=dict)          # model id -> ModelSpec
    profiles: dict = field(default_factory=lambda: dict(DEFAULT_PROFILES))  # name -> Profile
    cache_dir: str = "~/.cache/gui-grounding"           # generated tiny checkpoints, MLX GPU kernels
    log_level: str = "info"

    @property
    def default_model(self) -> str | None:
        if self.server.default_model:
            return self.server.default_model
        return next((mid for mid, spec in self.models.items() if spec.enabled), None)

    def enabled_models(self) -> dict[str, ModelSpec]:
        return {mid: spec for mid, spec in self.models.items() if spec.enabled}

    def units(self) -> dict[str, Unit]:
        """Every configured model's units by unit id (`units_of`)."""
        return {u.id: u for u in units_of(self.models)}


def _typename(t: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false",
            list: "a list", dict: "a mapping", type(None): "null"}.get(t, getattr(t, "__name__", str(t)))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in args:
        if t is type(None) and value is None:
            return None
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) if int not in args else value
        if t in (str, list, dict) and isinstance(value, t):
            return value
    raise ConfigError(f"{key}: expected {' or '.join(_typename(t) for t in args)}, got {value!r}")


def _section(cls: type, raw: Any, key: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key}: expected a mapping, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(map(str, unknown))}; "
                          f"known: {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in known.items():
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], f"{key}.{name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{key}.{name}: required")
    obj = cls(**kwargs)
    obj.validate(key)
    return obj


def _named(cls: type, raw: Any, key: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key}: expected a mapping of name -> settings")
    out = {}
    for name, body in raw.items():
        if not isinstance(name, str) or not name or "/" in name and cls is Profile:
            raise ConfigError(f"{key}: bad name {name!r}")
        out[name] = _section(cls, body, f"{key}.{name}")
    return out


def parse_config(raw: Any) -> AppConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("top level: expected a mapping")
    top = {"server", "broker", "supervisor", "models", "profiles", "cache_dir", "log_level"}
    unknown = sorted(map(str, set(raw) - top))
    if unknown:
        raise ConfigError(f"top level: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(top))}")
    models = _named(ModelSpec, raw.get("models"), "models")
    profiles = dict(DEFAULT_PROFILES)
    profiles.update(_named(Profile, raw.get("profiles"), "profiles"))
    cfg = AppConfig(
        server=_section(ServerConfig, raw.get("server"), "server"),
        broker=_section(BrokerConfig, raw.get("broker"), "broker"),
        supervisor=_section(SupervisorConfig, raw.get("supervisor"), "supervisor"),
        models=models, profiles=profiles,
        cache_dir=_coerce(raw.get("cache_dir", AppConfig.cache_dir), str, "cache_dir"),
        log_level=_coerce(raw.get("log_level", "info"), str, "log_level"),
    )
    _check(cfg.log_level in ("debug", "info", "warning", "error"), "log_level",
           "must be debug, info, warning or error")
    ids = [u.id for u in units_of(models)]
    clash = sorted({i for i in ids if ids.count(i) > 1})
    _check(not clash, "models", f"replica name(s) {', '.join(clash)} (model@device) clash with another model's")
    _check_helper_devices([u for u in units_of(models) if u.spec.enabled])
    dm = cfg.server.default_model
    _check(dm is None or dm in models, "server.default_model", f"{dm!r} is not a key of models")
    _check(dm is None or models[dm].enabled, "server.default_model", f"model {dm!r} is disabled")
    return cfg


def _check_helper_devices(units: list[Unit]) -> None:
    """A vision split's helper GPU is its replica's alone: the broker budgets each worker's own GPU
    only, so another model there would not see the helper's memory."""
    owner: dict[int, Unit] = {}
    for u in units:
        for h in u.helpers:
            if h in owner:
                raise ConfigError(f"models.{u.model_id}.devices: device {h} is a vision split's helper GPU "
                                  f"of both {owner[h].id} and {u.id}")
            owner[h] = u
    for u in units:
        d = u.device if u.device is not None else 0        # without `devices`: the default device
        other = owner.get(d)
        if other is not None and other is not u:
            where = "devices" if u.device is not None else "devices (none: it runs on device 0)"
            raise ConfigError(f"models.{u.model_id}.{where}: device {d} is a vision split's helper GPU of "
                              f"{other.id} (gpus_per_replica), which has it to itself")


def load_config(path: str | os.PathLike | None = None, environ: Mapping[str, str] = os.environ) -> AppConfig:
    """`path`, else $GROUNDING_CONFIG, else the embedded default."""
    path = path or environ.get(CONFIG_ENV) or None
    if path is None:
        return parse_config(yaml.safe_load(EMBEDDED_DEFAULT))
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    return parse_config(raw)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", default=None,
                        help=f"YAML config file (default: ${CONFIG_ENV}, else the embedded default)")


def load_or_exit(path: str | None, environ: Mapping[str, str] = os.environ) -> AppConfig:
    """For `__main__`: a config error is one line on stderr and exit status 2."""
    try:
        return load_config(path, environ)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def expand_path(path: str, environ: Mapping[str, str]) -> str:
    """`~` and $VARS in paths from the config, against the given environment."""
    if path.startswith("~"):
        path = environ.get("HOME", os.path.expanduser("~")) + path[1:]
    return os.path.expandvars(path)
