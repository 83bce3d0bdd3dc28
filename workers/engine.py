"""The engine interface the worker runtime drives, and the job/result records it speaks.

A worker owns exactly one engine (one model). The runtime calls, from its threads:
- `load()` / `unload()` / `memory()`         on the compute thread;
- `prepare(request)`                         on a preprocessing thread (CPU: decode, resize,
                                             tokenize), so it overlaps the previous forward pass;
- `run(batch, near_end)`                     on the compute thread, with up to `max_batch` prepared jobs;
                                             an engine calls `near_end()` (when given) once the batch's
                                             work left is about a few milliseconds: the worker then
                                             sends FINISHING (common/protocol.py says why).
Engines raise `JobError` for a bad job (the worker answers it and goes on) and let anything else
escape (the worker reports `internal` for that job, and exits if the engine is broken).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from common.config import ModelSpec


class JobError(Exception):
    """A job that cannot be answered; `code` is a wire error code (common/errors.py)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class GroundingRequest:
    """One grounding job as the engine sees it. Pixel limits are areas of the resized image.
    `prefill`: no question, only keep the screenshot's state for later ones (workers/screen_cache.py):
    an agent sends the screenshot while it still decides what to ask, and the question then runs
    from the kept state. Its result has no points; `kept_tokens` / `cached_tokens` say what is kept."""
    job_id: str
    image: bytes | memoryview           # the encoded image (PNG / JPEG / WebP), untouched
    instruction: str                    # "" for a prefill
    system: str | None = None           # None: the model's default system prompt
    topk: int | None = None             # None: the model's configured default
    max_pixels: int | None = None       # None: the model's configured value
    min_pixels: int | None = None
    return_attention: bool = False
    cache_scope: str | None = None      # screenshot cache entries are shared only within a scope
    prefill: bool = False
    fake: dict = field(default_factory=dict)  # fault-injection knobs, honoured by FakeEngine only

    @classmethod
    def from_job(cls, job_id: str, params: dict, blobs: Sequence[Any]) -> "GroundingRequest":
        """Validate a JOB's params (the frontend already did; direct clients may not have)."""
        if len(blobs) != 1:
            raise JobError("bad_request", f"a grounding job takes exactly one image, got {len(blobs)}")
        prefill = params.get("prefill", False)
        if not isinstance(prefill, bool):
            raise JobError("bad_request", "params.prefill must be true or false")
        instruction = params.get("instruction")
        if prefill:
            for name in ("instruction", "topk", "return_attention"):
                if params.get(name) not in (None, False):
                    raise JobError("bad_request", f"params.{name} has no meaning in a prefill job "
                                                  "(it keeps a screenshot's state; ask in a later job)")
            instruction = ""
        elif not isinstance(instruction, str) or not instruction.strip():
            raise JobError("bad_request", "params.instruction must be a non-empty string")
        system = params.get("system")
        if system is not None and not isinstance(system, str):
            raise JobError("bad_request", "params.system must be a string")
        ints = {}
        for name in ("topk", "max_pixels", "min_pixels"):
            v = params.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise JobError("bad_request", f"params.{name} must be a positive integer")
            ints[name] = v
        if ints["topk"] is not None and ints["topk"] > 100:
            raise JobError("bad_request", "params.topk must be <= 100")
        scope = params.get("cache_scope")
        if scope is not None and (not isinstance(scope, str) or not 0 < len(scope) <= 128):
            raise JobError("bad_request", "params.cache_scope must be a string of 1..128 characters")
        fake = params.get("fake") or {}
        if not isinstance(fake, dict):
            raise JobError("bad_request", "params.fake must be a mapping")
        blob = blobs[0]
        image = blob.buffer if hasattr(blob, "buffer") else blob
        return cls(job_id=job_id, image=image, instruction=instruction, system=system,
                   return_attention=bool(params.get("return_attention", False)), cache_scope=scope,
                   prefill=prefill, fake=fake, **ints)


@dataclass
class GroundingResult:
    """Points: `x`, `y` in original-image pixels (floats), `nx`, `ny` normalised to [0, 1],
    `score` the region's mean attention; best first. Sizes are [width, height] in pixels;
    `grid` is [n_h, n_w] visual tokens (one token = 28x28 resized pixels). A prefill's result has
    no points: `cached_tokens` (already kept) or `kept_tokens` (kept by this job) say whether the
    screenshot's state is now kept, and `not_kept` says why it is not."""
    points: list[dict]
    image_size: tuple[int, int]
    resized_size: tuple[int, int]
    grid: tuple[int, int]
    prompt_tokens: int
    image_tokens: int
    cached_tokens: int = 0              # prompt tokens whose state came from the screenshot cache
    kept_tokens: int = 0                # prompt tokens whose state this job stored there
    not_kept: str | None = None         # a prefill only: why nothing is kept
    attention: bytes | None = None      # float32 little-endian, row-major n_h*n_w
    timings: dict = field(default_factory=dict)   # milliseconds: preprocess, forward, head, ...
    peak_mem: int = 0                    # bytes, device peak during this job's batch

    def to_wire(self) -> tuple[dict, dict, list[bytes]]:
        """(result, usage, blobs) for a RESULT message; the attention map travels as a blob."""
        result = {"points": self.points, "image_size": list(self.image_size),
                  "resized_size": list(self.resized_size), "grid": list(self.grid),
                  "attention_blob": 0 if self.attention is not None else None}
        if self.not_kept is not None:
            result["not_kept"] = self.not_kept
        usage = {"prompt_tokens": self.prompt_tokens, "image_tokens": self.image_tokens,
                 "cached_tokens": self.cached_tokens, "kept_tokens": self.kept_tokens,
                 "completion_tokens": 0, "total_tokens": self.prompt_tokens}
        return result, usage, ([self.attention] if self.attention is not None else [])


@dataclass(frozen=True)
class MemoryReport:
    """Bytes. `active`: in use now; `peak`: high-water mark since the last reset; `cache`: held by
    the allocator for reuse; `weights`: the model's parameters; `limit`: the allocator's limit."""
    active: int = 0
    peak: int = 0
    cache: int = 0
    weights: int = 0
    limit: int = 0
    screenshots: int = 0                # held by the screenshot cache (within `active`)
    helpers: tuple = ()                 # a vision split's helper GPUs, in rank order: {active, peak, cache, weights}

    def to_wire(self) -> dict:
        wire = {"active": self.active, "peak": self.peak, "cache": self.cache,
                "weights": self.weights, "limit": self.limit, "screenshots": self.screenshots}
        if self.helpers:
            wire["helpers"] = [dict(h) for h in self.helpers]
        return wire


@dataclass(frozen=True)
class LoadReport:
    weights_bytes: int
    load_seconds: float


HELPER_GPUS_ENV = "GROUNDING_HELPER_GPUS"   # a vision split's helper GPUs, set by workers/supervisor.py


@dataclass(frozen=True)
class EngineOptions:
    """What an engine needs beyond its ModelSpec, taken from the app config by `workers/__main__`."""
    model_id: str
    cache_dir: str                      # expanded; where tiny:<backbone> checkpoints are generated
    max_image_pixels: int               # decoded width*height cap (decompression bombs)
    hf_home: str | None = None          # Hugging Face cache root, from the environment in __main__
    helper_gpus: tuple | None = None    # CUDA ids for a vision split's helpers (HELPER_GPUS_ENV)


class Engine(Protocol):
    max_batch: int

    def load(self) -> LoadReport: ...
    def prepare(self, request: GroundingRequest) -> Any: ...
    def run(self, batch: list[Any], near_end: Callable[[], None] | None = None) -> list[GroundingResult | JobError]: ...
    def memory(self) -> MemoryReport: ...
    def reset_peak(self) -> None: ...
    def unload(self) -> None: ...


def make_engine(spec: ModelSpec, options: EngineOptions) -> Engine:
    """The engine named by `spec.engine`. MLX is imported only here, lazily, so that importing
    `workers` never loads it."""
    if spec.engine == "fake":
        from workers.fake_engine import FakeEngine
        return FakeEngine(spec, options)
    from workers.mlx.engine import MlxEngine
    return MlxEngine(spec, options)
