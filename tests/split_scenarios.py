"""The worker's side of tests/test_vision_split.py, one scenario per process (MLX joins one
distributed group per process): `python -m tests.split_scenarios SCENARIO [ARGS]` prints a JSON line."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from workers.torchless import keep_torch_and_transformers_out

keep_torch_and_transformers_out()   # before mlx_vlm comes in below: this process is a worker, as `python -m workers` is

from bench.screens import png_bytes  # noqa: E402
from common.config import ModelSpec  # noqa: E402
from workers.engine import EngineOptions, GroundingRequest, GroundingResult  # noqa: E402
from workers.mlx import language  # noqa: E402
from workers.mlx.engine import MlxEngine  # noqa: E402
from workers.mlx.split import Helpers  # noqa: E402


def _engine(path: str, cache_dir: str, **spec) -> MlxEngine:
    # by default the screenshot cache off, so every question runs the whole forward
    spec = {"screenshot_cache_mb": 0, **spec}
    return MlxEngine(ModelSpec(path=path, max_pixels=150_000, **spec), EngineOptions("tiny", cache_dir, 4096 * 4096))


def _run(engine: MlxEngine, jobs) -> list[GroundingResult]:
    out = engine.run([engine.prepare(GroundingRequest(f"j{i}", png, text, return_attention=True))
                      for i, (png, text) in enumerate(jobs)])
    assert all(isinstance(r, GroundingResult) for r in out), out
    return out


def compare(backbone: str, cache_dir: str) -> dict:
    whole = _engine(f"tiny:{backbone}", cache_dir)
    whole.load()
    split = _engine(f"tiny:{backbone}", cache_dir, gpus_per_replica=2)
    split.load()
    jobs = [(png_bytes(517, 333, 1), "click the search box"), (png_bytes(300, 420, 2), "open the menu")]
    same = []
    default = language.SPLIT_MIN_SAVED_FLOP
    for threshold in (0, default):        # the language model split too, then (too small to pay) not
        language.SPLIT_MIN_SAVED_FLOP = threshold
        for batch in ([jobs[0]], jobs):
            same.append([a.attention == b.attention and a.points == b.points
                         for a, b in zip(_run(whole, batch), _run(split, batch))])
    language.SPLIT_MIN_SAVED_FLOP = 0
    pid = split._helpers.procs[0].pid
    alive = split._helpers.procs[0].poll() is None
    before = _run(split, [jobs[1]])[0]
    split.unload()
    split.load()
    after = _run(split, [jobs[1]])[0]
    result = {"helper_alive": alive, "language_split": split._helpers.language, "same": same, "weights": [whole._weights_bytes, split._weights_bytes], "same_helper_after_reload": split._helpers.procs[0].pid == pid,
              "same_after_reload": after.attention == before.attention}
    split._helpers.close()
    return result


def cached(cache_dir: str) -> dict:
    """The screenshot cache over a split, of a 4-bit model: the first question's split forward
    keeps the screen's prefix, the next ones run from it on the worker alone; both as in one process."""
    language.SPLIT_MIN_SAVED_FLOP = 0
    whole = _engine("tiny:qwen2_vl", cache_dir, screenshot_cache_mb=64, quantize=4)
    split = _engine("tiny:qwen2_vl", cache_dir, screenshot_cache_mb=64, quantize=4, gpus_per_replica=2)
    screen = png_bytes(517, 333, 5)
    questions = [(screen, "click the search box"), (screen, "open the menu"), (screen, "close the dialog")]
    answers = []
    for engine in (whole, split):
        engine.load()
        answers.append(_run(engine, questions[:1]) + _run(engine, questions[1:]))
    split._helpers.close()
    return {"cached_tokens": [[r.cached_tokens for r in a] for a in answers],
            "same": [a.attention == b.attention and a.points == b.points for a, b in zip(*answers)]}


def memory(cache_dir: str) -> dict:
    """What the worker reports of its helper's GPU: after the load, after a forward, after unload."""
    from mlx.utils import tree_flatten
    engine = _engine("tiny:qwen2_vl", cache_dir, gpus_per_replica=2)
    engine.load()
    model = engine._model
    unused = [model.language_model.model.embed_tokens.parameters(), model.vision_tower.merger.parameters()]
    backbone = sum(v.nbytes for _, v in tree_flatten(model.parameters())) - \
        sum(v.nbytes for p in unused for _, v in tree_flatten(p))
    loaded = engine.memory().helpers
    engine.reset_peak()
    _run(engine, [(png_bytes(517, 333, 1), "click the search box")])
    engine._helpers.memory(wait_s=20)       # the helper's answer to the forward, however loaded this box
    ran = engine.memory()
    engine.unload()
    unloaded = engine.memory().helpers
    engine._helpers.close()
    return {"own_backbone": backbone, "loaded": loaded, "ran": ran.helpers, "wire": ran.to_wire()["helpers"],
            "unloaded": unloaded}


def forward_fails(cache_dir: str) -> dict:
    """A forward that fails once the helper is in it: this process must exit (status 70)."""
    engine = _engine("tiny:qwen2_vl", cache_dir, gpus_per_replica=2)
    engine.load()
    print(json.dumps({"helper_pid": engine._helpers.procs[0].pid}), flush=True)

    def broken(*args):
        raise RuntimeError("out of memory, say")
    engine._forward_from = broken
    engine.run([engine.prepare(GroundingRequest("j", png_bytes(300, 200, 4), "click"))])
    return {"still_running": True}


def orphan(cache_dir: str) -> None:
    """The worker dies while its helper waits in a collective: told to run a forward, never joining it."""
    engine = _engine("tiny:qwen2_vl", cache_dir, gpus_per_replica=2)
    engine.load()
    engine._helpers._send({"op": "forward", "grids": [[4, 4]]})
    print(json.dumps({"helper_pid": engine._helpers.procs[0].pid}), flush=True)
    os._exit(0)


def three_ranks(cache_dir: str) -> dict:
    """A tower of 3 heads over 3 ranks: screenshots whose patch counts 3 does not divide, so the
    last rank's share of the rows is shorter and padded for the gather; the same bits as one process."""
    from workers.tiny_checkpoint import Dims, write_tiny_checkpoint
    path = str(write_tiny_checkpoint(Path(cache_dir) / "tiny-3-heads", "qwen2_vl", dims=Dims(vis_embed=48, vis_heads=3)))
    whole, split = _engine(path, cache_dir), _engine(path, cache_dir, gpus_per_replica=3)
    whole.load()
    split.load()
    jobs = [(png_bytes(308, 280, 3), "click the search box"), (png_bytes(300, 420, 2), "open the menu")]
    patches = [int(np.prod(whole.prepare(GroundingRequest("p", png, text)).image.grid_thw)) for png, text in jobs]
    same = [[a.attention == b.attention and a.points == b.points for a, b in zip(_run(whole, batch), _run(split, batch))]
            for batch in ([jobs[0]], jobs)]
    split._helpers.close()
    return {"patches": patches, "same": same}


def uneven(cache_dir: str) -> dict:
    engine = _engine("tiny:qwen2_vl", cache_dir, gpus_per_replica=3)
    try:
        engine.load()
        return {"error": None}
    except Exception as exc:
        return {"error": str(exc)}
    finally:
        engine._helpers.close()


def death() -> dict:
    died, reasons = threading.Event(), []
    helpers = Helpers(2, None, on_death=lambda why: (reasons.append(why), died.set()))
    os.kill(helpers.procs[0].pid, signal.SIGKILL)
    died.wait(20)
    helpers.close()
    return {"reason": reasons[0] if reasons else None}


def sigterm() -> dict:
    died = threading.Event()
    helpers = Helpers(2, None, on_death=lambda why: died.set())
    os.kill(helpers.procs[0].pid, signal.SIGTERM)          # as when the worker's process group is signalled
    alive = not died.wait(1.0)
    helpers.close()                                         # its stdin closes: it ends
    return {"alive_after_sigterm": alive, "exit_status": helpers.procs[0].returncode, "reported_dead": died.is_set()}


if __name__ == "__main__":
    scenario, *args = sys.argv[1:]
    print(json.dumps({"compare": compare, "cached": cached, "memory": memory, "forward_fails": forward_fails, "orphan": orphan, "three_ranks": three_ranks, "uneven": uneven, "death": death, "sigterm": sigterm}[scenario](*args)))
