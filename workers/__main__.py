"""`python -m workers --config PATH --model ID [--engine fake|mlx]`: one model worker. ID is a
model id, or "<model id>@<device>" for one replica of a model with `devices`.

Reads the config and the environment once, builds the engine and runs the Worker until
SIGTERM/SIGINT. Exit status 2 with one line on stderr for a bad config or model id.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

from common.config import AppConfig, ModelSpec, add_config_argument, expand_path, load_or_exit
from common.logs import configure_logging
from workers.engine import HELPER_GPUS_ENV, EngineOptions, make_engine
from workers.torchless import keep_torch_and_transformers_out
from workers.worker import Worker, WorkerSettings

SUPERVISOR_PID_ENV = "GROUNDING_SUPERVISOR_PID"   # set by workers/supervisor.py for its children
DEFAULT_FAKE_WEIGHTS = 100_000_000
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}    # `auto`: the checkpoint's own


def default_prep_threads() -> int:
    """Decoding and resizing a 1080p screenshot takes 40-80 ms of CPU; with one thread, 8
    simultaneous requests queue for it while the GPU waits. Half the cores, at most 4."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def keep_kernel_cache(cache_dir: str) -> None:
    """Point MLX's CUDA kernel cache into our cache folder unless the user chose one (our own
    kernels' builds go there too, workers/mlx/nvrtc.py). MLX's default is /tmp/mlx/<version>/ptx,
    which many systems empty at boot; an empty cache makes the first forward compile every kernel
    again (36 s at 1080p on an H100, bench/RESULTS.md)."""
    if "MLX_PTX_CACHE_DIR" in os.environ:
        return
    try:
        from importlib.metadata import version
        mlx_version = version("mlx")
    except Exception:
        mlx_version = "unknown"
    os.environ["MLX_PTX_CACHE_DIR"] = str(Path(cache_dir) / "mlx-kernels" / mlx_version)


def estimate_weights_bytes(spec: ModelSpec, options: EngineOptions, environ: Mapping[str, str]) -> int:
    """The broker's reservation for a model's first load (its LOADED report replaces it): for an
    MLX model whose checkpoint is on disk (a local folder, a repo in the local Hugging Face cache, a
    tiny one already generated), what the engine will keep of it, from the safetensors headers;
    else the fake engine's figure."""
    if spec.engine == "mlx":
        from workers.mlx.checkpoint import estimate_weight_bytes      # reads headers; no MLX
        est = estimate_weight_bytes(expand_path(spec.path, environ), options.cache_dir, options.hf_home,
                                    spec.quantize, _DTYPE_BYTES.get(spec.dtype))
        if est:
            return est
    return int(spec.fake.get("weights_bytes", DEFAULT_FAKE_WEIGHTS))


def worker_settings(cfg: AppConfig, model_id: str, spec: ModelSpec, options: EngineOptions,
                    environ: Mapping[str, str]) -> WorkerSettings:
    parent = environ.get(SUPERVISOR_PID_ENV, "")
    return WorkerSettings(
        model_id=model_id,
        endpoint=cfg.broker.worker_endpoint,
        heartbeat_interval_s=cfg.broker.heartbeat_interval_ms / 1000.0,
        liveness=cfg.broker.heartbeat_liveness,
        # one batch running while the next one is prepared
        max_slots=max(2, 2 * spec.max_batch),
        # finish before the supervisor's SIGKILL at shutdown_grace_s
        shutdown_grace_s=max(0.5, 0.8 * cfg.supervisor.shutdown_grace_s),
        engine_name=spec.engine,
        est_weights_bytes=estimate_weights_bytes(spec, options, environ),
        parent_pid=int(parent) if parent.isdigit() else None,
        prep_threads=spec.prep_threads or default_prep_threads(),
        finishing=spec.finishing,
        keep_cpus_awake_ms=spec.keep_cpus_awake_ms,
    )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    keep_torch_and_transformers_out()
    parser = argparse.ArgumentParser(prog="python -m workers", description="Run one model worker.")
    add_config_argument(parser)
    parser.add_argument("--model", required=True, metavar="ID",
                        help="a key of `models` in the config, or MODEL@DEVICE for a replica")
    parser.add_argument("--engine", choices=("fake", "mlx"), default=None,
                        help="override the model's configured engine")
    args = parser.parse_args(argv)
    cfg = load_or_exit(args.config, environ)
    units = cfg.units()
    unit = units.get(args.model)
    if unit is None:
        known = ", ".join(units) or "none"
        print(f"error: unknown model {args.model!r} (configured: {known})", file=sys.stderr)
        return 2
    spec = unit.spec
    if args.engine:
        spec = dataclasses.replace(spec, engine=args.engine)
    configure_logging(f"worker:{args.model}", cfg.log_level)
    options = EngineOptions(
        model_id=args.model,
        cache_dir=expand_path(cfg.cache_dir, environ),
        max_image_pixels=cfg.server.max_image_pixels,
        hf_home=environ.get("HF_HOME") or environ.get("HF_HUB_CACHE") or None,
        helper_gpus=tuple(environ[HELPER_GPUS_ENV].split(",")) if environ.get(HELPER_GPUS_ENV) else None,
    )
    if spec.engine == "mlx":
        keep_kernel_cache(options.cache_dir)
    try:
        engine = make_engine(spec, options)
    except ImportError as exc:
        print(f"error: engine {spec.engine!r} for model {args.model!r} is not available: {exc}", file=sys.stderr)
        return 2
    return Worker(engine, worker_settings(cfg, args.model, spec, options, environ)).run()


if __name__ == "__main__":
    sys.exit(main())
