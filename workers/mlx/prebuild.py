"""A fresh CUDA machine's MLX kernels, built beside the first load by helper processes.

Why: where MLX's kernel cache is empty, a model's first load waits while MLX builds each of the
forward's kernels with NVRTC, one at a time inside its evaluations: 2.3-7.9 s each, ~50 of the 2B
model's 62 s load (bench/RESULTS.md, thirty-ninth and fortieth sessions). One build keeps one CPU
core busy; the machine has others.

How: the worker's own load builds the language model's kernels first (its probe runs the language
model). Meanwhile two helper processes build the rest on small inputs, each with a kernel cache of
its own: `inputs` the device resize, the patches' normalization and the prompt's token embedding,
`image` the vision tower and the pointer head's image side (the checkpoint read without its
language-model layers). The worker waits for them before the first step that uses their kernels,
and moves what they built into its cache. Only a load into an empty cache starts them: where MLX
has built kernels before, they would mostly rebuild what is there while the worker waited for them.
A helper that fails costs only its time (the worker builds what is missing itself, as before).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

STAGES = ("inputs", "image")
IMAGE_GRID = (32, 32)            # patches of the helper's screenshot (448 x 448 px): every kernel, little work
WAIT_S = 180.0                   # a helper still running after this is stopped (the worker builds the rest)
HELPER_MEMORY = 8 << 30          # device memory the helpers may take beside the weights (~2-4 GB measured)


def needed(folder: str | None, cuda: bool, weights_bytes: int, device_bytes: int) -> bool:
    """Whether a load would build every kernel and the helpers fit: MLX on CUDA, its kernel cache
    folder known (`MLX_PTX_CACHE_DIR`; the worker sets it) and holding none of MLX's kernels, and
    room on the device beside the weights."""
    return (bool(folder) and cuda and device_bytes >= weights_bytes + HELPER_MEMORY
            and not any(Path(folder).glob("*.ptx")))


class Prebuild:
    """The helpers of one load: `start`, then `wait` before the first step that uses their kernels
    (`stop` ends them early)."""

    def __init__(self, cache: Path, procs: list[tuple[str, subprocess.Popen, Path]], t0: float):
        self.cache, self.procs, self.t0 = cache, procs, t0

    @classmethod
    def start(cls, path: Path, dtype: str, quantize: int | None, weights_bytes: int,
              device_bytes: int) -> "Prebuild | None":
        """The helpers, started where `needed`; else None."""
        from workers.mlx.cuda_rotary import on_cuda

        folder = os.environ.get("MLX_PTX_CACHE_DIR")
        if not needed(folder, on_cuda(), weights_bytes, device_bytes):
            return None
        return cls.launch(Path(folder), path, dtype, quantize)

    @classmethod
    def launch(cls, cache: Path, path: Path, dtype: str, quantize: int | None) -> "Prebuild":
        """A helper per stage, each building into its own folder under `cache`."""
        _remove_orphans(cache)
        procs = []
        for stage in STAGES:
            own = cache / f".prebuild-{os.getpid()}-{stage}"
            try:
                shutil.rmtree(own, ignore_errors=True)
                own.mkdir(parents=True)
                cmd = [sys.executable, "-m", "workers.mlx.prebuild", "--stage", stage, "--path", str(path),
                       "--dtype", dtype, *(["--quantize", str(quantize)] if quantize else [])]
                with open(own / "stderr.txt", "wb") as err:      # a file: a pipe left unread could fill
                    procs.append((stage, subprocess.Popen(cmd, env={**os.environ, "MLX_PTX_CACHE_DIR": str(own)},
                                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                          stderr=err), own))
            except OSError as exc:
                log.warning("kernel prebuild helper %s not started: %s", stage, exc)
        log.info("building GPU kernels beside the load (%s)", ", ".join(s for s, _, _ in procs))
        return cls(cache, procs, time.perf_counter())

    def wait(self) -> None:
        """Wait for the helpers (each at most until WAIT_S after the start), and move what they
        built into the worker's cache."""
        for stage, proc, own in self.procs:
            try:
                proc.wait(timeout=max(0.0, WAIT_S - (time.perf_counter() - self.t0)))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.returncode == 0:
                moved = _move_kernels(own, self.cache)
                log.info("kernel prebuild %s: %d kernels in %.1fs", stage, moved, time.perf_counter() - self.t0)
            else:
                try:
                    err = (own / "stderr.txt").read_text(errors="replace").strip()[-500:]
                except OSError:
                    err = ""
                log.warning("kernel prebuild %s failed (exit %s): %s", stage, proc.returncode, err)
            shutil.rmtree(own, ignore_errors=True)
        self.procs = []

    def stop(self) -> None:
        for _, proc, own in self.procs:
            proc.kill()
            proc.wait()
            shutil.rmtree(own, ignore_errors=True)
        self.procs = []


def _remove_orphans(cache: Path) -> None:
    """Helper folders left by a worker that was killed during its load (their pid is gone)."""
    for own in cache.glob(".prebuild-*-*"):
        try:
            os.kill(int(own.name.split("-")[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(own, ignore_errors=True)
        except (ValueError, OSError):
            pass


def _move_kernels(own: Path, cache: Path) -> int:
    """A helper's kernels into the shared cache, each module's `.ptx` last: MLX takes a module as
    cached once its `.ptx` exists, and then reads its `.txt`. A module already there is kept."""
    moved = 0
    for ptx in sorted(own.glob("*.ptx")):
        if (cache / ptx.name).exists():
            continue
        try:
            for part in sorted(own.glob(f"{ptx.stem}.*"), key=lambda p: p.suffix == ".ptx"):
                os.replace(part, cache / part.name)
            moved += 1
        except OSError as exc:
            log.warning("kernel %s not moved: %s", ptx.stem, exc)
    return moved


def run_stage(stage: str, path: Path, dtype_name: str, quantize: int | None) -> None:
    """One helper's work: the stage's part of a forward on small inputs, which builds its kernels."""
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from workers.mlx import resize
    from workers.mlx.backbone import resolve_dtype
    from workers.mlx.vision import normalized_patches

    dtype = resolve_dtype(dtype_name)
    gh, gw = IMAGE_GRID
    if stage == "inputs":                   # no model code to import, no weights to read
        resize.matches_pil_here()           # the device resize, as the worker checks it at load
        mx.eval(normalized_patches(mx.zeros((gh * 14, gw * 14, 3), mx.uint8), dtype))
        # the prompt's embedding lookup as pointer_states_batch makes it (MLX names a gather's
        # kernel by its dtypes and number of indices alone: the table's size does not matter)
        table = nn.Embedding(16, 8)
        table.set_dtype(dtype)
        mx.eval(table(mx.array(np.arange(4, dtype=np.int32))))
        return
    from workers.mlx.backbone import load_backbone
    from workers.mlx.checkpoint import read_checkpoint
    from workers.mlx.engine import RUN_AHEAD, fast_vision
    from workers.mlx.head import head_from_tensors
    from workers.mlx.run_ahead import RunAhead

    ckpt = read_checkpoint(path)
    model, head_tensors = load_backbone(ckpt, dtype, quantize, lm_layers=0)
    vision = fast_vision(ckpt.model_type, model.vision_tower)
    patches = normalized_patches(mx.zeros((gh * 14, gw * 14, 3), mx.uint8), vision.dtype)
    enc = vision([patches], [IMAGE_GRID], RunAhead(RUN_AHEAD))
    hidden = model.language_model.model.embed_tokens.weight.shape[1]
    head = head_from_tensors(head_tensors, hidden)
    side = head.encode_image(enc)
    mx.eval(side, head.point(side, mx.zeros((1, hidden), dtype)))


def main() -> int:
    from workers.torchless import keep_torch_and_transformers_out
    keep_torch_and_transformers_out()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--path", type=Path, required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--quantize", type=int)
    a = p.parse_args()
    run_stage(a.stage, a.path, a.dtype, a.quantize)
    return 0


if __name__ == "__main__":
    sys.exit(main())
