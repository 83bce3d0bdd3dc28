"""MLX's CPU matmuls on Linux go to OpenBLAS (workers/mlx/cpu_blas.py rewrites libmlx's GOT slots),
and where that cannot be, MLX's own bundled BLAS still answers. Each case is a fresh interpreter, so
that it sees the process as a worker starts it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.mlx,
              pytest.mark.skipif(sys.platform != "linux", reason="MLX's bundled reference BLAS is Linux's")]

# Which library multiplied: OpenBLAS and the reference BLAS sum a long row in different orders, so
# their float32 results differ in the last bits; MLX's result equals the bits of exactly one of them.
PROBE = textwrap.dedent("""
    import ctypes, json
    {before}
    import workers.mlx.cpu_blas as cpu_blas
    import mlx.core as mx
    import numpy as np
    import scipy_openblas32
    a = mx.random.normal((64, 3000), key=mx.random.key(0))
    b = mx.random.normal((3000, 48), key=mx.random.key(1))
    got = np.array(a @ b)

    def direct(lib, name):
        fn = getattr(lib, name)
        p = ctypes.POINTER(ctypes.c_float)
        fn.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, p, ctypes.c_int, p, ctypes.c_int, ctypes.c_float, p, ctypes.c_int]
        A, B, C = np.array(a), np.array(b), np.zeros((64, 48), np.float32)
        fn(101, 111, 111, 64, 48, 3000, 1.0, A.ctypes.data_as(p), 3000, B.ctypes.data_as(p), 48, 0.0, C.ctypes.data_as(p), 48)
        return C

    libmlx = cpu_blas.mlx_library()
    openblas = ctypes.CDLL(scipy_openblas32.get_lib_dir() + "/lib" + scipy_openblas32.get_library() + ".so")
    reference = ctypes.CDLL(str(libmlx))                  # dlsym through libmlx finds its bundled BLAS
    mlx = ctypes.CDLL(str(libmlx))
    base = cpu_blas.load_base(mlx)
    slots = {{n: ctypes.c_void_p.from_address(base + o).value for n, o in cpu_blas.jump_slots(libmlx, cpu_blas.ROUTINES).items()}}
    print(json.dumps({{
        "loaded": cpu_blas.loaded(),
        "openblas_bits": bool(np.array_equal(got, direct(openblas, "scipy_cblas_sgemm"))),
        "reference_bits": bool(np.array_equal(got, direct(reference, "cblas_sgemm"))),
        "slots_to_openblas": [slots[n] == ctypes.cast(getattr(openblas, "scipy_" + n), ctypes.c_void_p).value
                              for n in cpu_blas.ROUTINES],
        "f64_err": float(np.abs(np.array(a.astype(mx.float64, stream=mx.cpu) @ b.astype(mx.float64, stream=mx.cpu),
                                         copy=False) - np.array(a, np.float64) @ np.array(b, np.float64)).max()),
    }}))
""")


def _probe(before: str = "import workers.mlx", **env) -> dict:
    pytest.importorskip("scipy_openblas32")
    out = subprocess.run([sys.executable, "-c", PROBE.format(before=before)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("before", ["import workers.mlx", "import mlx.core as mx; mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8))); import workers.mlx"])
def test_mlx_cpu_matmuls_run_on_openblas(before):
    # also when mlx.core was loaded, and its gemm slots bound, before the routing
    got = _probe(before)
    assert got["loaded"] and got["slots_to_openblas"] == [True, True, True]
    assert got["openblas_bits"] and not got["reference_bits"]
    assert got["f64_err"] < 1e-9


def test_opted_out_mlx_s_own_blas_answers():
    got = _probe(GROUNDING_REFERENCE_BLAS="1")
    assert got["loaded"] is None and got["slots_to_openblas"] == [False, False, False]
    assert got["reference_bits"] and not got["openblas_bits"]


def test_a_library_without_the_slots_is_refused(tmp_path):
    import workers.mlx.cpu_blas as cpu_blas
    not_elf = tmp_path / "libmlx.so"
    not_elf.write_bytes(b"MZ" + bytes(200))
    with pytest.raises(ValueError, match="not a 64-bit"):
        cpu_blas.jump_slots(not_elf, cpu_blas.ROUTINES)
    libm = Path("/lib/x86_64-linux-gnu/libm.so.6")
    if libm.is_file():                       # an ELF library that calls no gemm
        with pytest.raises(ValueError, match="no PLT slot for cblas_cgemm, cblas_dgemm, cblas_sgemm"):
            cpu_blas.jump_slots(libm, cpu_blas.ROUTINES)
