"""Keep PyTorch and transformers out of a worker process.

mlx-vlm's package (`mlx_vlm/__init__.py`, for its generate and convert tools) and its model
packages' processor modules import transformers, for processors the worker never uses (it has its
own preprocessing and reads the checkpoint's tokenizer.json itself). transformers imports PyTorch
whenever it is installed, and on a machine that has it (NVIDIA boxes often do; the test environment
does, for the parity tests) that cost every worker and split helper ~5 s of start-up and ~350 MB of
host memory: importing MLX and both backbones took 7.0 s and 453 MB max RSS, 2.1 s and 102 MB
without PyTorch (this 2-core CI box, bench/RESULTS.md). transformers itself then still took most of
what was left: the MLX engine and both backbones imported in 1.02 s (106 MB max RSS) with it, and in
0.23 s (60 MB) without (medians of seven).

How, with the import system's own means:
- a `sys.modules` entry of None marks a module absent: PyTorch (transformers 5 has no switch for it;
  it asks `importlib.util.find_spec`, which answers None for such a name);
- mlx_vlm's package module is made from its spec without running its `__init__`, so its model
  subpackages import from its folder as before;
- the two processor modules our backbones' packages import for a side effect (registering their
  processors with transformers) are empty modules.
Anything else of mlx_vlm that code imports later still imports for real, transformers with it.
"""
from __future__ import annotations

import atexit
import importlib.util
import sys
import types

PROCESSORS = ("mlx_vlm.models.qwen2_vl.processing_qwen2_vl", "mlx_vlm.models.qwen2_5_vl.processing_qwen2_5_vl")


def keep_torch_and_transformers_out() -> None:
    """Call it first thing in a worker-side entry point, before anything imports mlx_vlm; where
    PyTorch or mlx_vlm is already imported it leaves that one as it is."""
    sys.modules.setdefault("torch", None)
    if "mlx_vlm" in sys.modules:
        return
    spec = importlib.util.find_spec("mlx_vlm")
    if spec is None:
        return
    sys.modules["mlx_vlm"] = importlib.util.module_from_spec(spec)
    for name in PROCESSORS:
        sys.modules.setdefault(name, types.ModuleType(name))
    atexit.register(_release_mlx_streams)


def _release_mlx_streams() -> None:
    """What mlx_vlm's __init__ registers at its import: MLX's thread-local streams released before
    the interpreter's teardown. Only where MLX ran (a fake engine's worker never imports it)."""
    if "mlx.core" in sys.modules:
        from mlx_vlm._stream_cleanup import clear_mlx_streams
        clear_mlx_streams()
