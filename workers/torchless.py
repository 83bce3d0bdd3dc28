"""Keep PyTorch out of a worker process.

mlx-vlm's model packages import transformers, for processors the worker never uses (it has its own
preprocessing and reads the checkpoint's tokenizer.json itself). transformers imports PyTorch
whenever it is installed, and on a machine that has it (NVIDIA boxes often do; the test environment
does, for the parity tests) that costs every worker and split helper ~5 s of start-up and ~350 MB of
host memory: importing MLX and both backbones took 7.0 s and 453 MB max RSS, 2.1 s and 102 MB
without PyTorch (this 2-core CI box, bench/RESULTS.md). transformers 5 has no switch for it (v4's
USE_TORCH is gone); it asks `importlib.util.find_spec`, which answers None for a name whose
`sys.modules` entry is None, the import system's own way to mark a module as absent.
"""
from __future__ import annotations

import sys


def keep_torch_out() -> None:
    """Mark PyTorch absent for this process. Call it first thing in a worker-side entry point,
    before anything imports mlx_vlm; where PyTorch is already imported it changes nothing."""
    sys.modules.setdefault("torch", None)
