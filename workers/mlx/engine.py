"""MlxEngine: a GUI-Actor checkpoint on MLX (mlx-vlm backbone + our pointer head).

`prepare` (any thread, NumPy/PIL/tokenizers only) decodes, resizes, patchifies and tokenizes;
`run` (compute thread) does one prefill per job: vision tower -> encoder vectors, language model
-> final-norm state at <|pointer_pad|>, head in float32, regions -> points. docs/gui-actor.md.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

from common.config import ModelSpec
from workers.engine import HELPER_GPUS_ENV, EngineOptions, GroundingRequest, GroundingResult, JobError, LoadReport, MemoryReport
from workers.families import family_for
from workers.images import PreparedImage, decode_image, plan_resize, preprocess, size_of
from workers.mlx.backbone import (load_backbone, padded_length, pointer_state_after, pointer_states_batch,
                                   prompt_multiple, resolve_dtype)
from workers.mlx.checkpoint import CheckpointError, read_checkpoint, resolve_path
from workers.mlx.cuda_rotary import on_cuda
from workers.mlx.head import float32_matmul_error, head_from_tensors
from workers.mlx.language import FastLanguageModel, dequantize_rows_here, split_pays
from workers.mlx.run_ahead import RunAhead
from workers.mlx.split import Helpers
from workers.mlx import cpu_blas, cuda_upload, resize
from workers.mlx.prebuild import Prebuild
from workers.mlx.vision import FastQwen2Vision, FastVision, normalized_patches
from workers.mlx.vision_qwen2_5 import FastQwen25Vision
from workers.parallel_resize import learn_now
from workers.screen_cache import ScreenCache

log = logging.getLogger(__name__)

HEAD_IDS_KEPT = 64  # prompt heads (one per system prompt in use) kept tokenized
RUN_AHEAD = 2       # the device runs one chunk of the forward while the host encodes the next


@dataclass
class PreparedJob:
    """A job ready for the forward pass. `input_ids` [L] int32 with the image pads expanded at
    `image_start`; `position_ids` [3, L] M-RoPE; `pointer_pos` index of <|pointer_pad|>."""
    job_id: str
    image: PreparedImage
    input_ids: np.ndarray
    image_start: int
    position_ids: np.ndarray
    pointer_pos: int
    topk: int
    return_attention: bool
    preprocess_ms: float
    cache_key: tuple | None = None            # the screenshot cache's key; None: the cache is off
    cached: "ScreenEntry | None" = None       # found in the cache when prepared
    prefill: bool = False                     # keep the screenshot's state; no question to answer

    @property
    def prefix(self) -> int:
        """Tokens up to the image's end: what a screenshot cache entry holds the state of."""
        return self.image_start + self.image.n_tokens


@dataclass(frozen=True)
class ScreenEntry:
    """A screenshot's instruction-independent state (workers/screen_cache.py): the image's sizes
    (no pixels), the prompt's length up to the image's end, the pointer head's image side
    [n_img, D] float32 and the language model's keys and values over that prefix, per layer."""
    image: PreparedImage
    prefix: int
    image_side: mx.array
    kept: list

    @property
    def nbytes(self) -> int:
        return self.image_side.nbytes + sum(k.nbytes + v.nbytes for k, v in self.kept)


def fast_language_model(text_model) -> FastLanguageModel | None:
    """Our language-model forward if it supports these weights and agrees with mlx-vlm's on a
    probe; otherwise None, and mlx-vlm's forward runs (logged)."""
    if not FastLanguageModel.supports(text_model):
        return None
    try:
        fast = FastLanguageModel(text_model, dequantize_rows=dequantize_rows_here())
        if fast.agrees_with(text_model):
            return fast
        log.warning("our language-model forward disagrees with mlx-vlm's on the load probe; using mlx-vlm's")
    except Exception as exc:
        log.warning("our language-model forward failed on the load probe (%s: %s); using mlx-vlm's",
                    type(exc).__name__, exc)
    return None


def fast_vision(model_type: str, tower) -> FastVision:
    """Our vision forward over mlx-vlm's tower, for the checkpoint's backbone."""
    return (FastQwen2Vision if model_type == "qwen2_vl" else FastQwen25Vision)(tower)


@functools.cache
def _device_memory() -> int:
    """Bytes of memory of the default device (unified/host memory on CPU). Asked once: on CUDA
    `mx.device_info()` also queries the free memory, after every batch otherwise."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    for key in ("memory_size", "total_memory"):
        if isinstance(info.get(key), int) and info[key] > 0:
            return info[key]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


class MlxEngine:
    def __init__(self, spec: ModelSpec, options: EngineOptions):
        self.spec = spec
        self.options = options
        self.max_batch = spec.max_batch
        self._model = None
        self._head = None
        self._tok = None
        self._family = None
        self._ids: dict[str, int] = {}
        self._head_ids: dict[str, list[int]] = {}   # prompt text before the image -> its token ids
        self._system = ""
        self._weights_bytes = 0
        self._vision: FastVision | None = None   # our vision forward (both backbones)
        self._helpers: Helpers | None = None       # a vision split's helper processes (gpus_per_replica)
        self._prebuild: Prebuild | None = None     # a fresh CUDA machine's kernel builders, during a load
        self._device_resize = False
        self._upload: cuda_upload.CudaUpload | None = None   # screenshots to a CUDA GPU in one copy
        self._lm: FastLanguageModel | None = None     # our language-model forward; None: mlx-vlm's
        self._cache = ScreenCache(0)                   # the screenshot cache, sized at load
        self._cache_off = "the model is not loaded"    # why the cache is off, for prefill answers
        self.pad_questions = False                     # cached questions in batches of 1, 2, 4, ... (GPU)
        self.run_ahead = RUN_AHEAD                     # chunks of the forward scheduled at once
        self.dtype = None
        self.path = None

    # ---- lifecycle -------------------------------------------------------------------------
    def load(self) -> LoadReport:
        """Resolve, check and load the checkpoint. Raises CheckpointError (message names the file
        or tensor) on any problem with it; the worker reports load_failed."""
        t0 = time.perf_counter()
        if self.spec.devices is not None and not on_cuda():
            # each replica's budget is its own device's memory: on one Metal GPU or the CPU,
            # replicas would share one memory and one compute unit
            raise RuntimeError(f"`devices` places one replica per CUDA GPU, and MLX runs on "
                               f"{mx.default_device()} here, not on CUDA (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}: a GPU that does not exist?)")
        path = resolve_path(self.spec.path, self.options.cache_dir, self.options.hf_home)
        if self.spec.gpus_per_replica > 1:
            self._start_helpers().load(path, self.spec.dtype, self.spec.quantize)   # they load beside us
        try:
            return self._load(path, t0)
        except BaseException:
            if self._helpers is not None:
                self._helpers.unload()
            raise
        finally:
            if self._prebuild is not None:
                self._prebuild.stop()
                self._prebuild = None

    def _start_helpers(self) -> Helpers:
        """The vision split's helpers, started at the first load; they live as long as the worker
        (its distributed group cannot be joined twice)."""
        if self._helpers is None:
            gpus = self.options.helper_gpus
            if on_cuda() and (gpus is None or len(gpus) != self.spec.gpus_per_replica - 1):
                raise RuntimeError(f"gpus_per_replica {self.spec.gpus_per_replica} needs the helpers' GPUs in "
                                   f"${HELPER_GPUS_ENV} (set by the supervisor), got {gpus}")
            self._helpers = Helpers(self.spec.gpus_per_replica, list(gpus) if on_cuda() else None)
        return self._helpers

    def _load(self, path, t0: float) -> LoadReport:
        from tokenizers import Tokenizer
        ckpt = read_checkpoint(path)
        family = family_for(ckpt.model_type)
        try:
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:
            raise CheckpointError(f"tokenizer.json in {path} cannot be loaded: {exc}") from None
        ids = {t: tok.token_to_id(t) for t in family.CONFIG_TOKEN_KEYS.values()}
        try:
            family.check_config(ckpt.config, ids)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        dtype = resolve_dtype(self.spec.dtype)
        self._prebuild = Prebuild.start(path, self.spec.dtype, self.spec.quantize,
                                        sum(f.stat().st_size for f in ckpt.weight_files), _device_memory())
        model, head_tensors = load_backbone(ckpt, dtype, self.spec.quantize)
        vocab, hidden = model.language_model.model.embed_tokens.weight.shape
        if max(ids.values()) >= vocab:
            raise CheckpointError(f"tokenizer.json token id {max(ids.values())} is outside the "
                                  f"{vocab}-row model.embed_tokens.weight")
        try:
            head = head_from_tensors(head_tensors, hidden)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        mx.eval(head.parameters())
        self._model, self._head, self._tok, self._family, self._ids = model, head, tok, family, ids
        self._head_ids = {}
        self._vision = fast_vision(ckpt.model_type, model.vision_tower)
        if self._helpers is not None:
            try:
                self._vision.share_heads(self._helpers.split)
            except ValueError as exc:
                raise CheckpointError(str(exc)) from None
        self._lm = fast_language_model(model.language_model.model)
        budget, self._cache_off = self._screen_cache_budget()
        self._cache = ScreenCache(budget)
        # on a GPU a question's rows are weight-bound (extra rows nearly free) and each new batch
        # shape builds attention plans; on the CPU extra rows cost their full compute
        self.pad_questions = mx.default_device() == mx.gpu
        if mx.default_device() == mx.cpu:
            log.info("CPU matmuls: %s", f"OpenBLAS ({cpu_blas.loaded()})" if cpu_blas.loaded()
                     else "MLX's bundled BLAS")
        err = float32_matmul_error()
        log.info("pointer head in float32: its matmuls run %s here (relative error %.1e); its self-attention "
                 "runs %s", "in full float32" if err < 1e-5 else "as TF32 (MLX_ENABLE_TF32=0 for full float32)", err,
                 "as the CUDA kernel" if head.self_attention.fused is not None else "as MLX ops")
        if self._prebuild is not None:      # the helpers' kernels are used from here on
            self._prebuild.wait()
        # resize on a GPU: exact there, ~1 ms instead of ~14 ms of host CPU per 1080p screenshot
        self._device_resize = mx.default_device() == mx.gpu and resize.matches_pil_here()
        if mx.default_device() == mx.gpu and not self._device_resize:
            log.warning("this GPU's float32 matmuls do not reproduce PIL's resize; resizing on the CPU")
        self._upload = cuda_upload.load()
        self._system = self.spec.system_prompt if self.spec.system_prompt is not None \
            else family.SYSTEM_PROMPTS[ckpt.model_type]
        self.dtype, self.path = dtype, path
        self._weights_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters())) + \
            sum(v.nbytes for _, v in tree_flatten(head.parameters()))
        if self._helpers is not None:
            self._helpers.wait_loaded()
        self._warm_up()
        self._cache.clear()
        seconds = time.perf_counter() - t0
        log.info("loaded %s (%s, %s, %.1f MB) in %.2fs", path, ckpt.model_type, dtype,
                 self._weights_bytes / 1e6, seconds)
        return LoadReport(weights_bytes=self._weights_bytes, load_seconds=seconds)

    def _warm_up(self) -> None:
        """One request per configured screen size before the model reports loaded: the first
        forward in a process JIT-compiles MLX's CUDA kernels and builds cuDNN attention plans
        (36 s for a 1080p screenshot on an H100 whose kernel cache was empty, ~0.2-1 s per new
        size after that; bench/RESULTS.md), which a user's first request would otherwise wait for."""
        for w, h in self.spec.warmup_sizes(on_gpu=mx.default_device() == mx.gpu):
            t = time.perf_counter()
            rgb = np.broadcast_to(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (h, w, 3)).copy()
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, "PNG", compress_level=1)
            capped, _, target = plan_resize(rgb, self.spec.min_pixels, self.spec.max_pixels)
            learn_now(size_of(capped), target)              # so the device resize is warmed too
            # where the screenshot cache is on, then questions about the same screen in each
            # batch width they run in: the cache's path has shapes of its own
            widths = [1 << i for i in range((self.max_batch - 1).bit_length() + 1)] if self._cache.enabled else []
            for width in [1, *widths]:
                try:
                    job = self.prepare(GroundingRequest("warmup", buf.getvalue(), "click the button"))
                    out = self.run([job] * width)[0]
                except JobError as exc:
                    out = exc
                if isinstance(out, JobError):     # e.g. a max_context_length below this screen's tokens
                    log.warning("warm-up at %dx%d skipped: %s", w, h, out.message)
                    break
            else:
                log.info("warm-up at %dx%d took %.2fs", w, h, time.perf_counter() - t)

    def _screen_cache_budget(self) -> tuple[int, str]:
        """(bytes, why it is off) for the screenshot cache: the configured budget where our
        language-model forward runs and keeps a prompt prefix correctly here (a probe), else 0
        and the reason (logged)."""
        budget = self.spec.screenshot_cache_mb << 20
        if not budget:
            return 0, "the screenshot cache is off for this model (screenshot_cache_mb: 0)"
        if self._lm is None:
            why = "the screenshot cache needs our language-model forward, which these weights do not take"
            log.info("screenshot cache off: %s", why)
            return 0, why
        try:
            if self._lm.prefix_agrees():
                log.info("screenshot cache: up to %d MB", self.spec.screenshot_cache_mb)
                return budget, ""
            why = "a kept prefix disagreed with the whole forward on this device's load probe"
        except Exception as exc:
            why = f"the screenshot cache's load probe failed ({type(exc).__name__}: {exc})"
        log.warning("screenshot cache off: %s", why)
        return 0, why

    def unload(self) -> None:
        if self._helpers is not None:
            self._helpers.unload()
        self._cache.clear()
        self._model = self._head = self._tok = self._vision = self._lm = self._upload = None
        self._weights_bytes = 0
        mx.clear_cache()

    # ---- jobs ------------------------------------------------------------------------------
    def prepare(self, request: GroundingRequest) -> PreparedJob:
        """CPU only (thread-safe, no MLX): decode, resize, patchify, tokenize. Raises JobError.
        On CUDA the image decoders write into page-locked memory, which the upload copies fastest."""
        if self._tok is None:
            raise JobError("model_unavailable", "model is not loaded")
        t0 = time.perf_counter()
        max_px = request.max_pixels or self.spec.max_pixels
        min_px = min(request.min_pixels or self.spec.min_pixels, max_px)
        fam = self._family
        system = request.system if request.system is not None else self._system
        # key: a Future, computed beside the decode where no stored entry can match (screen_cache.py)
        entry, key = self._cache.lookup(request.image, min_px, max_px, system, request.cache_scope)
        if entry is not None:           # the same bytes decoded and resized before: sizes suffice
            image = entry.image
        else:
            upload = self._upload
            rgb = decode_image(request.image, self.options.max_image_pixels,
                               upload.host_buffer if upload is not None else None)
            image = preprocess(rgb, min_px, max_px, patches=False,
                               device_resize=resize.supported if self._device_resize else None)
        before, after = fam.prompt_parts(system, request.instruction)
        pad, ptr = self._ids[fam.IMAGE_PAD], self._ids[fam.POINTER_PAD]
        head_ids = self._head_ids.get(before)
        if head_ids is None:   # the same for every request with this system prompt; ~0.1 ms to tokenize
            head_ids = self._tok.encode(before, add_special_tokens=False).ids
            if len(self._head_ids) >= HEAD_IDS_KEPT:
                self._head_ids.clear()
            self._head_ids[before] = head_ids
        tail_ids = self._tok.encode(after, add_special_tokens=False).ids
        n, start = image.n_tokens, len(head_ids)
        ids = np.empty(start + n + len(tail_ids), np.int32)   # not a list of ~2,700 ints: 2 us, not 50
        ids[:start], ids[start:start + n], ids[start + n:] = head_ids, pad, tail_ids
        if int((ids == pad).sum()) != n or int((ids == ptr).sum()) != 1:
            raise JobError("bad_request", "the instruction or system prompt contains reserved tokens "
                                          f"({fam.IMAGE_PAD} or {fam.POINTER_PAD})")
        if len(ids) > self.spec.max_context_length:
            raise JobError("bad_request", f"prompt is {len(ids)} tokens ({n} for the image), over the "
                                          f"model's max_context_length {self.spec.max_context_length}; "
                                          "lower max_pixels or shorten the instruction")
        n_h, n_w = image.token_grid
        cache_key = key.result()        # hashed by now, beside the decode (~0.6 ms against 2-7)
        return PreparedJob(job_id=request.job_id, image=image, input_ids=ids, image_start=start,
                           position_ids=fam.mrope_positions(len(ids), start, n_h, n_w),
                           pointer_pos=len(ids) - 1, topk=request.topk or self.spec.topk,
                           return_attention=request.return_attention,
                           preprocess_ms=(time.perf_counter() - t0) * 1e3, cache_key=cache_key, cached=entry,
                           prefill=request.prefill)

    def run(self, batch: list[PreparedJob], near_end: Callable[[], None] | None = None) -> list[GroundingResult | JobError]:
        """One forward pass for the whole batch (vision tower over all images, language model
        over right-padded prompts); a JobError per failed job. If the batch as a whole fails
        (out of memory, say), each job is retried alone so one bad job cannot sink the others.
        `near_end` is called when a whole forward has only the head, the points and the answer left."""
        if self._model is None:
            return [JobError("model_unavailable", "model is not loaded") for _ in batch]
        try:
            return self._run_batch(batch, near_end)
        except JobError as exc:
            if len(batch) == 1:
                return [exc]
        except Exception:
            if len(batch) == 1:
                raise
            log.exception("batch of %d failed; running its jobs one by one", len(batch))
        return [r for job in batch for r in self.run([job], near_end)]

    def forward(self, batch: list[PreparedJob]) -> tuple[list[mx.array], mx.array]:
        """(encoder vectors per job [n_img, D], pointer states [B, D]), evaluated."""
        encs, dec, _, _ = self._forward(batch)
        return encs, dec

    def _forward(self, batch: list[PreparedJob], keep: list[int] | None = None, sides: bool = False):
        """`forward`, plus each job's kept prefix keys and values where `keep` asks (see
        FastLanguageModel.pointer_states) -> (encs, dec, kept or None, sides or None), evaluated;
        with `sides`, also the head's image side of each job, only scheduled after them."""
        patches = [normalized_patches(self._resized(j.image), self._vision.dtype) for j in batch]
        grids = [j.image.grid_thw[1:] for j in batch]
        if self._helpers is None:
            return self._forward_from(batch, patches, grids, keep, sides=sides)
        ranks = self._helpers.ranks
        length = padded_length([len(j.input_ids) for j in batch], prompt_multiple(ranks))
        split_lm = self._lm is not None and self._helpers.language and \
            split_pays(self._lm.layer_params, len(batch) * length, ranks)
        prompts = (len(batch), length) if split_lm else None
        with self._helpers.forward(mx.concatenate(patches) if len(patches) > 1 else patches[0], grids, prompts) as shared:
            return self._forward_from(batch, [shared], grids, keep, self._helpers.split if split_lm else None, sides)

    def _forward_from(self, batch: list[PreparedJob], patches: list[mx.array], grids: list, keep: list[int] | None,
                      split=None, sides: bool = False):
        # one RunAhead for the whole pass, so the vision tower's last chunks count in the language model's
        pace = RunAhead(self.run_ahead)
        enc_all = self._vision(patches, grids, pace)
        cuts = np.cumsum([j.image.n_tokens for j in batch])[:-1].tolist()
        encs = mx.split(enc_all, cuts, axis=0) if cuts else [enc_all]
        out = pointer_states_batch(self._model, [j.input_ids for j in batch], [j.image_start for j in batch],
                                   encs, [j.position_ids for j in batch], [j.pointer_pos for j in batch],
                                   fast_lm=self._lm, pace=pace, keep=keep, split=split)
        dec, kept = out if keep is not None else (out, None)
        image_sides = None
        if sides:
            # Scheduled behind the forward while this thread would only wait for it: the device goes
            # from the language model's last layer to the head without waiting for this thread to
            # wake and build the head's graph.
            mx.async_eval(encs, dec, kept)
            image_sides = [self._head.encode_image(enc) for enc in encs]
            mx.async_eval(image_sides)
        mx.eval(encs, dec, kept)
        return encs, dec, kept, image_sides

    def _resized(self, image: PreparedImage) -> mx.array:
        """The image as the ViT sees it, uint8 [H', W', 3], resized here if preprocessing left it."""
        rgb = self._upload(image.rgb) if self._upload is not None else mx.array(image.rgb)
        if image.resize_order is None:
            return rgb
        return resize.resize_bicubic(rgb, image.resized[0], image.resized[1], image.resize_order)

    def _run_batch(self, batch: list[PreparedJob], near_end: Callable[[], None] | None
                   ) -> list[GroundingResult | JobError]:
        """Jobs whose screenshot is in the cache run from it; the rest run one forward together.
        Several jobs in one batch about the same new screenshot: the first runs the forward, the
        others then take the cache's path. A prefill whose screenshot is kept already, or could not
        be kept, is answered without running anything; one whose screenshot a question in the batch
        is about lets that question's forward keep it (so the question needs no second forward)."""
        out: list[GroundingResult | JobError | None] = [None] * len(batch)
        whole, later, hits = [], [], []
        computing: set[tuple] = set()
        for i in sorted(range(len(batch)), key=lambda i: batch[i].prefill):    # questions first
            job = batch[i]
            entry = job.cached or self._cache.get(job.cache_key)   # or stored since it was prepared
            if entry is not None and entry.prefix == job.prefix:
                if job.prefill:
                    out[i] = self._prefill_result(job, cached=entry.prefix)
                else:
                    hits.append((i, entry))
            elif job.prefill and not self._keep_length(job):
                out[i] = self._prefill_result(job, not_kept=self._why_not_kept(job))
            elif job.cache_key is not None and job.cache_key in computing:
                later.append(i)
            else:
                whole.append(i)
                if job.cache_key is not None:
                    computing.add(job.cache_key)
        if whole:
            for i, result in zip(whole, self._run_whole([batch[i] for i in whole], near_end)):
                out[i] = result
        for i in later:
            entry = self._cache.get(batch[i].cache_key)
            if entry is not None and batch[i].prefill:
                out[i] = self._prefill_result(batch[i], cached=entry.prefix)
            elif entry is not None:
                hits.append((i, entry))
            else:                       # not stored (over the budget, or that job failed)
                out[i] = self._run_whole([batch[i]], near_end)[0]
        groups: dict[int, tuple[ScreenEntry, list[int]]] = {}   # one forward per screenshot's questions
        for i, entry in hits:
            groups.setdefault(id(entry), (entry, []))[1].append(i)
        for entry, members in groups.values():
            for i, result in zip(members, self._run_cached([batch[i] for i in members], entry)):
                out[i] = result
        return out

    def _keep_length(self, job: PreparedJob) -> int:
        """The prefix length to keep for the cache (0: none, or it would not fit its budget)."""
        if job.cache_key is None:
            return 0
        return job.prefix if self._cache.fits(self._entry_bytes(job)) else 0

    def _entry_bytes(self, job: PreparedJob) -> int:
        """What a cache entry for this job's screenshot holds: keys and values of every layer
        over the prefix, and the head's float32 image side."""
        layer = self._lm.kv_heads * self._lm.head_dim * job.prefix * 2 * self.dtype.size
        return len(self._lm.layers) * layer + job.image.n_tokens * self._head.dim * 4

    def _why_not_kept(self, job: PreparedJob) -> str:
        if job.cache_key is None:
            return self._cache_off
        return (f"this screenshot's state ({self._entry_bytes(job) / 2**20:.0f} MB) is larger than the "
                f"screenshot cache ({self.spec.screenshot_cache_mb} MB, screenshot_cache_mb)")

    def _run_whole(self, batch: list[PreparedJob], near_end: Callable[[], None] | None
                   ) -> list[GroundingResult | JobError]:
        t0 = time.perf_counter()
        keep = [self._keep_length(j) for j in batch]
        encs, dec, kept, sides = self._forward(batch, keep if any(keep) else None, sides=True)
        t1 = time.perf_counter()
        if near_end is not None:
            # what is left, the head's instruction side and the points, takes ~1.3 ms at 1080p on
            # an H200 (the image side ran behind the forward): a lead in which waking the answer's
            # way out pays as much as a ~3 ms one did (bench/RESULTS.md, 24th, 25th, 33rd sessions).
            near_end()
        # squeezed, not indexed: `[0]` is a gather, a kernel of its own to build on a first load
        maps = [self._head.point(side, dec[i:i + 1]).squeeze(0) for i, side in enumerate(sides)]
        mx.eval(sides, maps)
        t2 = time.perf_counter()
        peak = mx.get_peak_memory()
        out = []
        for i, job in enumerate(batch):
            # "forward" includes the head's image side (scheduled behind the forward), "head" the rest
            timings = {"forward": (t1 - t0) * 1e3, "head": (t2 - t1) * 1e3}
            result = self._result(job, maps[i], {"preprocess": job.preprocess_ms, **timings}, peak)
            stored = False
            if keep[i] and isinstance(result, GroundingResult):
                entry = ScreenEntry(replace(job.image, pixel_values=None, rgb=None, resize_order=None),
                                    job.prefix, sides[i], kept[i])
                stored = self._cache.put(job.cache_key, entry, entry.nbytes)
            if job.prefill and isinstance(result, GroundingResult):
                result = self._prefill_result(job, kept=job.prefix if stored else 0, timings=timings, peak=peak,
                                              not_kept=None if stored else self._why_not_kept(job))
            elif stored:
                result.kept_tokens = job.prefix
            out.append(result)
        return out

    def _prefill_result(self, job: PreparedJob, *, cached: int = 0, kept: int = 0, not_kept: str | None = None,
                        timings: dict | None = None, peak: int = 0) -> GroundingResult:
        """A prefill's answer: no points; whether the screenshot's state is kept (`cached`: it
        already was; `kept`: stored now) or why not. Its prompt is the system prompt and the image."""
        return GroundingResult(points=[], image_size=job.image.original, resized_size=job.image.resized,
                               grid=job.image.token_grid, prompt_tokens=job.prefix,
                               image_tokens=job.image.n_tokens, cached_tokens=cached, kept_tokens=kept,
                               not_kept=not_kept, timings={"preprocess": job.preprocess_ms, **(timings or {})},
                               peak_mem=peak)

    def _run_cached(self, jobs: list[PreparedJob], entry: ScreenEntry) -> list[GroundingResult | JobError]:
        """Questions about one cached screenshot: the language model over each instruction's tokens
        only, against the kept prefix; the head's instruction side against its kept image side."""
        t0 = time.perf_counter()
        tails = [j.input_ids[entry.prefix:] for j in jobs]
        positions = [j.position_ids[:, entry.prefix:] for j in jobs]
        if self.pad_questions:
            # 1, 2, 4, 8 ... rows: each new batch shape makes the GPU backend build attention plans
            # and compile kernels (0.1 s and more, once); a few more rows cost nearly nothing here
            width = 1 << (len(jobs) - 1).bit_length()
            tails += tails[-1:] * (width - len(jobs))
            positions += positions[-1:] * (width - len(jobs))
        dec = pointer_state_after(self._model, self._lm, entry.kept, tails, positions)[:len(jobs)]
        mx.eval(dec)
        t1 = time.perf_counter()
        maps = self._head.point(entry.image_side, dec)
        mx.eval(maps)
        t2 = time.perf_counter()
        timings = {"forward": (t1 - t0) * 1e3, "head": (t2 - t1) * 1e3}
        peak = mx.get_peak_memory()
        rows = np.array(maps, dtype=np.float32)      # one copy out, and no gather per row
        return [self._result(job, rows[i], {"preprocess": job.preprocess_ms, **timings}, peak,
                             cached_tokens=entry.prefix) for i, job in enumerate(jobs)]

    def _result(self, job: PreparedJob, scores: mx.array | np.ndarray, timings: dict, peak: int,
                cached_tokens: int = 0) -> GroundingResult | JobError:
        t3 = time.perf_counter()
        s = np.array(scores, dtype=np.float32)
        n_h, n_w = job.image.token_grid
        try:
            regions = self._family.extract_regions(s, n_h, n_w, first=job.topk)
        except self._family.NonFiniteScores:
            return JobError("internal", "the pointer head produced non-finite attention "
                                        f"(dtype {self.dtype}); try dtype float32")
        points = self._family.to_points(regions, job.topk, job.image.original)
        return GroundingResult(
            points=points, image_size=job.image.original, resized_size=job.image.resized,
            grid=(n_h, n_w), prompt_tokens=int(len(job.input_ids)), image_tokens=job.image.n_tokens,
            cached_tokens=cached_tokens,
            attention=s.astype("<f4").tobytes() if job.return_attention else None,
            timings={**timings, "postprocess": (time.perf_counter() - t3) * 1e3}, peak_mem=peak)

    # ---- memory ----------------------------------------------------------------------------
    def memory(self) -> MemoryReport:
        return MemoryReport(active=mx.get_active_memory(), peak=mx.get_peak_memory(),
                            cache=mx.get_cache_memory(), weights=self._weights_bytes,
                            limit=_device_memory(), screenshots=self._cache.nbytes,
                            helpers=tuple(self._helpers.memory()) if self._helpers is not None else ())

    def reset_peak(self) -> None:
        mx.reset_peak_memory()
