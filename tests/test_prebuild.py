"""The kernel prebuild's helpers (workers/mlx/prebuild.py), as real processes on tiny checkpoints.

On the CPU MLX keeps no kernels in MLX_PTX_CACHE_DIR, so here each helper's stage runs through the
same code as on a GPU and the worker's side does its part (wait, move); what the helpers save
on a CUDA machine's first load is in bench/RESULTS.md (fortieth session).
"""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.tiny_checkpoint import write_tiny_checkpoint

pytestmark = pytest.mark.mlx
mx = pytest.importorskip("mlx.core")

from mlx.utils import tree_flatten  # noqa: E402

from workers.mlx import prebuild  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("backbone", ["qwen2_vl", "qwen2_5_vl"])
def test_each_stage_runs_in_its_own_process(backbone, tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", backbone)
    for stage in prebuild.STAGES:
        proc = subprocess.run([sys.executable, "-m", "workers.mlx.prebuild", "--stage", stage, "--path", str(ckpt),
                               "--dtype", "float32"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_image_stage_reads_the_checkpoint_without_its_language_model_layers(tmp_path):
    from workers.mlx.backbone import load_backbone
    from workers.mlx.checkpoint import read_checkpoint
    model, head = load_backbone(read_checkpoint(write_tiny_checkpoint(tmp_path / "ckpt", "qwen2_vl")),
                                mx.float32, lm_layers=0)
    assert len(model.language_model.model.layers) == 0 and head
    names = [name for name, _ in tree_flatten(model.parameters())]
    assert not any("language" in name and ".layers." in name for name in names)
    assert any(name.startswith("vision_tower.blocks.") for name in names)


def test_the_worker_waits_and_moves_their_kernels_into_its_cache(tmp_path, caplog):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", "qwen2_vl")
    cache = tmp_path / "kernels"
    cache.mkdir()
    (cache / "kept.ptx").write_text("the worker's own")
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    (cache / f".prebuild-{dead.pid}-image").mkdir()      # a killed worker's helper left this
    (cache / f".prebuild-{os.getppid()}-image").mkdir()  # a live worker's helper is building here
    with caplog.at_level(logging.INFO, logger=prebuild.__name__):
        pb = prebuild.Prebuild.launch(cache, ckpt, "float32", None)
        assert [stage for stage, _, _ in pb.procs] == list(prebuild.STAGES)
        # what a helper on a GPU leaves in its folder (MLX's three files per kernel), written meanwhile
        own = pb.procs[0][2]
        for name, text in (("new.txt", "names"), ("new.cu", "source"), ("new.ptx", "built"), ("kept.ptx", "again")):
            (own / name).write_text(text)
        pb.wait()
    assert (cache / "new.ptx").read_text() == "built" and (cache / "new.txt").exists() and (cache / "new.cu").exists()
    assert (cache / "kept.ptx").read_text() == "the worker's own"           # a kernel already there is kept
    # the helpers' folders are gone, and the killed worker's; the live one's stays
    assert [p.name for p in cache.iterdir() if p.name.startswith(".prebuild")] == [f".prebuild-{os.getppid()}-image"]
    assert "kernel prebuild inputs: " in caplog.text and "kernel prebuild image: " in caplog.text


def test_a_failing_helper_is_reported_and_costs_the_load_nothing(tmp_path, caplog):
    cache = tmp_path / "kernels"
    pb = prebuild.Prebuild.launch(cache, tmp_path / "no-such-checkpoint", "float32", None)
    with caplog.at_level(logging.WARNING, logger=prebuild.__name__):
        pb.wait()
    assert "kernel prebuild image failed (exit 1)" in caplog.text and "no-such-checkpoint" in caplog.text
    assert list(cache.iterdir()) == []


def test_only_a_load_on_cuda_into_an_empty_kernel_cache_with_room_needs_them(tmp_path):
    room = prebuild.HELPER_MEMORY + (4 << 30)
    assert prebuild.needed(str(tmp_path), True, 4 << 30, room)
    assert not prebuild.needed(str(tmp_path), False, 4 << 30, room)            # not CUDA
    assert not prebuild.needed(None, True, 4 << 30, room)                       # no kernel cache folder known
    assert not prebuild.needed(str(tmp_path), True, 4 << 30, room - 1)          # no room beside the weights
    (tmp_path / "nvrtc-0123.cubin").write_text("")                               # our kernels only: still fresh
    assert prebuild.needed(str(tmp_path), True, 4 << 30, room)
    (tmp_path / "gather_float32_int32_1.ptx").write_text("")                     # MLX has built kernels here
    assert not prebuild.needed(str(tmp_path), True, 4 << 30, room)


def test_a_load_here_starts_none(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path))
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        pytest.skip("MLX runs on CUDA here")
    assert prebuild.Prebuild.start(tmp_path, "auto", None, 1, 1 << 40) is None
    assert os.listdir(tmp_path) == []
