"""MLX's CPU matmuls on Linux go to OpenBLAS through the compiled shim (workers/mlx/cpu_blas.py),
and where that cannot be, MLX's own bundled BLAS still answers. Each case is a fresh interpreter:
the routing is settled when mlx.core loads."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.mlx,
              pytest.mark.skipif(sys.platform != "linux", reason="MLX's bundled reference BLAS is Linux's"),
              pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")]

PROBE = textwrap.dedent("""
    import ctypes, json, sys
    {before}
    import workers.mlx.cpu_blas as cpu_blas
    import mlx.core as mx
    import numpy as np
    a = mx.random.normal((300, 200), key=mx.random.key(0))
    b = mx.random.normal((200, 100), key=mx.random.key(1))
    got = np.array(a @ b)
    want = np.array(a).astype(np.float64) @ np.array(b).astype(np.float64)
    shim = cpu_blas.loaded()
    calls = ctypes.CDLL(shim).grounding_blas_shim_calls() if shim else None
    print(json.dumps({{"shim": shim, "calls": calls, "err": float(np.abs(got - want).max())}}))
""")


def _probe(tmp_path, before: str = "import workers.mlx", **env) -> dict:
    pytest.importorskip("scipy_openblas32")
    out = subprocess.run([sys.executable, "-c", PROBE.format(before=before)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_mlx_cpu_matmuls_run_on_openblas(tmp_path):
    first = _probe(tmp_path)
    assert first["shim"] and Path(first["shim"]).parent == tmp_path / "gui-grounding"
    assert first["calls"] >= 1 and first["err"] < 1e-3          # MLX's matmul went through the shim
    again = _probe(tmp_path)                                     # compiled once, then reused
    assert again["shim"] == first["shim"] and again["calls"] >= 1
    assert len(list((tmp_path / "gui-grounding").iterdir())) == 1   # no temporary folder left


@pytest.mark.parametrize("case,env,before", [
    ("opted out", {"GROUNDING_REFERENCE_BLAS": "1"}, "import workers.mlx"),
    ("no compiler", {"CC": "/nonexistent/cc"}, "import workers.mlx"),
    ("too late", {}, "import mlx.core; import workers.mlx"),
])
def test_where_the_shim_cannot_be_mlx_s_own_blas_still_answers(tmp_path, case, env, before):
    got = _probe(tmp_path, before=before, **env)
    assert got["shim"] is None and got["calls"] is None and got["err"] < 1e-3, case
