"""FakeEngine: a *simulated* grounding engine for tests, benchmarks and running without a model.

It does no ML. It reads the real image header (so size checks and sizes in results are real),
sleeps to simulate load and forward latency, answers deterministic points derived from a hash of
the instruction, and reports synthetic memory. Fault knobs come from two places:
- the model's `fake:` config (ModelSpec.fake): `load_s`, `weights_bytes`, `job_bytes`,
  `latency_ms` (per batch), `fail_load` (bool or message), `mem_limit`, `helper_weights_bytes`
  (what each of a vision split's helper GPUs reports holding, with `gpus_per_replica` > 1;
  no helper process is started);
- each job's `params.fake` (GroundingRequest.fake): `sleep_ms`, `fail` (an error code),
  `crash` (os._exit(1) mid-run), `hang_s` (the compute thread sleeps; heartbeats keep going).
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.config import ModelSpec
from common.errors import ERROR_CODES
from workers.engine import EngineOptions, GroundingRequest, GroundingResult, JobError, LoadReport, MemoryReport
from workers.images import smart_resize

PATCH = 28  # one visual token covers 28x28 pixels of the resized image (Qwen2-VL merge of 2x2 patches)
FORMATS = {"PNG", "JPEG", "WEBP"}
HEADER_PROBE_BYTES = 64 * 1024
NEAR_END_S = 0.003   # the simulated forward calls run()'s near_end this long before it ends


def _header(data: memoryview) -> tuple[int, int, str | None]:
    """(width, height, format) from the image header; PIL decodes no pixels here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            return im.size[0], im.size[1], im.format


@dataclass(frozen=True)
class FakePrepared:
    """What prepare() hands to run(): the request plus sizes in pixels (original and resized)."""
    request: GroundingRequest
    image_size: tuple[int, int]      # (w, h) original
    resized_size: tuple[int, int]    # (w, h) after smart_resize
    grid: tuple[int, int]            # (n_h, n_w) visual tokens
    preprocess_ms: float


class FakeEngine:
    """Simulation of the Engine protocol (workers/engine.py); see the module docstring for knobs."""

    def __init__(self, spec: ModelSpec, options: EngineOptions):
        self.spec = spec
        self.options = options
        self.max_batch = spec.max_batch
        knobs = spec.fake
        self._load_s = float(knobs.get("load_s", 0.05))
        self._weights = int(knobs.get("weights_bytes", 100_000_000))
        self._job_bytes = int(knobs.get("job_bytes", 10_000_000))
        self._latency_s = float(knobs.get("latency_ms", 0)) / 1000.0
        self._fail_load = knobs.get("fail_load", False)
        self._limit = int(knobs.get("mem_limit", 0))
        self._helper_weights = int(knobs.get("helper_weights_bytes", self._weights // 4))
        self._lock = threading.Lock()  # memory() may be read while run() is active
        self._loaded = False
        self._running_jobs = 0
        self._peak = 0

    # ---- lifecycle ------------------------------------------------------------------------------

    def load(self) -> LoadReport:
        t0 = time.monotonic()
        if self._fail_load:
            msg = self._fail_load if isinstance(self._fail_load, str) else "simulated load failure (fake.fail_load)"
            raise RuntimeError(msg)
        Image.preinit()   # imports the common format plugins now, not in the first job
        time.sleep(self._load_s)
        with self._lock:
            self._loaded = True
            self._peak = max(self._peak, self._weights)
        return LoadReport(weights_bytes=self._weights, load_seconds=time.monotonic() - t0)

    def unload(self) -> None:
        with self._lock:
            self._loaded = False
            self._running_jobs = 0

    def memory(self) -> MemoryReport:
        with self._lock:
            weights = self._weights if self._loaded else 0
            active = weights + self._running_jobs * self._job_bytes
            helper = self._helper_weights if self._loaded else 0
            helpers = tuple({"active": helper, "peak": helper, "cache": 0, "weights": helper}
                            for _ in range(self.spec.gpus_per_replica - 1))
            return MemoryReport(active=active, peak=max(self._peak, active), cache=0,
                                weights=weights, limit=self._limit, helpers=helpers)

    def reset_peak(self) -> None:
        with self._lock:
            self._peak = (self._weights if self._loaded else 0) + self._running_jobs * self._job_bytes

    # ---- jobs -----------------------------------------------------------------------------------

    def prepare(self, request: GroundingRequest) -> FakePrepared:
        """Header-only image check (no pixel decode): format, size, pixel cap; then sizes."""
        t0 = time.perf_counter()
        image = memoryview(request.image)
        try:
            try:   # the header is near the start: avoid copying a large image just to read it
                width, height, fmt = _header(image[:HEADER_PROBE_BYTES])
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
                if image.nbytes <= HEADER_PROBE_BYTES:
                    raise
                width, height, fmt = _header(image)   # e.g. big EXIF/ICC blocks before the size
        except Image.DecompressionBombError as exc:
            raise JobError("payload_too_large", f"image too large: {exc}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise JobError("invalid_image", f"not a readable PNG/JPEG/WebP image ({type(exc).__name__})") from None
        if fmt not in FORMATS:
            raise JobError("invalid_image", f"unsupported image format {fmt}; use PNG, JPEG or WebP")
        if width < 1 or height < 1:
            raise JobError("invalid_image", f"empty image {width}x{height}")
        if width * height > self.options.max_image_pixels:
            raise JobError("payload_too_large",
                           f"image of {width}x{height} pixels exceeds {self.options.max_image_pixels} pixels")
        max_px = request.max_pixels or self.spec.max_pixels
        min_px = min(request.min_pixels or self.spec.min_pixels, max_px)
        try:   # the real engine's arithmetic, so sizes in fake results are the real ones
            rh, rw = smart_resize(height, width, PATCH, min_px, max_px)
        except ValueError as exc:
            raise JobError("invalid_image", str(exc)) from None
        return FakePrepared(request, (width, height), (rw, rh), (rh // PATCH, rw // PATCH),
                            (time.perf_counter() - t0) * 1000.0)

    def run(self, batch: list[FakePrepared], near_end: Callable[[], None] | None = None) -> list[GroundingResult | JobError]:
        if not self._loaded:
            raise RuntimeError("FakeEngine.run before load()")
        with self._lock:
            self._running_jobs = len(batch)
            self._peak = max(self._peak, self._weights + len(batch) * self._job_bytes)
        try:
            t0 = time.perf_counter()
            lead = min(NEAR_END_S, self._latency_s / 2)   # as the real engine's, before its pointer head
            if self._latency_s:
                time.sleep(self._latency_s - lead)
            if near_end is not None:
                near_end()
            if lead:
                time.sleep(lead)
            out: list[GroundingResult | JobError] = []
            for item in batch:
                out.append(self._one(item))
            forward_ms = (time.perf_counter() - t0) * 1000.0
            for res in out:
                if isinstance(res, GroundingResult):
                    res.timings["forward"] = forward_ms
                    res.peak_mem = self._weights + len(batch) * self._job_bytes
            return out
        finally:
            with self._lock:
                self._running_jobs = 0

    def _one(self, item: FakePrepared) -> GroundingResult | JobError:
        knobs = item.request.fake
        sleep_ms = knobs.get("sleep_ms", 0)
        if isinstance(sleep_ms, (int, float)) and sleep_ms > 0:
            time.sleep(sleep_ms / 1000.0)
        if knobs.get("crash"):
            os._exit(1)  # simulated hard crash mid-forward: no cleanup, no answer
        hang_s = knobs.get("hang_s", 0)
        if isinstance(hang_s, (int, float)) and hang_s > 0:
            time.sleep(hang_s)
        fail = knobs.get("fail")
        if fail:
            code = fail if isinstance(fail, str) and fail in ERROR_CODES else "internal"
            return JobError(code, f"simulated failure (fake.fail={fail!r})")
        return self._result(item)

    def _result(self, item: FakePrepared) -> GroundingResult:
        req = item.request
        (w, h), (n_h, n_w) = item.image_size, item.grid
        if req.prefill:     # nothing to keep: this engine computes no state
            return GroundingResult(points=[], image_size=(w, h), resized_size=item.resized_size, grid=(n_h, n_w),
                                   prompt_tokens=n_h * n_w + 32, image_tokens=n_h * n_w,
                                   not_kept="a simulated model (engine: fake) keeps no screenshot state",
                                   timings={"preprocess": item.preprocess_ms})
        topk = req.topk or self.spec.topk
        digest = hashlib.sha256(req.instruction.encode("utf-8")).digest()
        points = []
        for i in range(topk):
            # token cell from the hash, point at the cell centre: always inside the image
            a = int.from_bytes(hashlib.sha256(digest + bytes([i % 256])).digest()[:8], "little")
            row, col = (a >> 32) % n_h, (a & 0xFFFFFFFF) % n_w
            nx, ny = (col + 0.5) / n_w, (row + 0.5) / n_h
            points.append({"x": nx * w, "y": ny * h, "nx": nx, "ny": ny, "score": round(0.9 / (i + 1), 6)})
        attention = None
        if req.return_attention:
            att = np.zeros(n_h * n_w, dtype="<f4")
            for p in points:
                att[min(n_h - 1, int(p["ny"] * n_h)) * n_w + min(n_w - 1, int(p["nx"] * n_w))] += p["score"]
            attention = att.tobytes()
        image_tokens = n_h * n_w
        prompt_tokens = image_tokens + 32 + len(req.instruction.split())  # simulated template overhead
        return GroundingResult(points=points, image_size=(w, h), resized_size=item.resized_size,
                               grid=(n_h, n_w), prompt_tokens=prompt_tokens, image_tokens=image_tokens,
                               attention=attention, timings={"preprocess": item.preprocess_ms})
