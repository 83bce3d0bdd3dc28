"""OpenBLAS for MLX's CPU matmuls on Linux. No MLX here: this must run before `mlx.core` loads.

MLX's Linux CPU wheel (`mlx-cpu`) calls `cblas_sgemm` (and d/c) from the reference BLAS it
bundles, Netlib's unoptimized libblas: a 1024^3 float32 matmul took 268 ms on the 2-core CI box
against 8.5 ms through OpenBLAS (bench/RESULTS.md). `scipy-openblas32` (the OpenBLAS build that
numpy and scipy ship, in the `cpu` extra) has the fast routines, but under a `scipy_` prefix. So a
few-line C shim that forwards the three gemm entry points is compiled once with the system's C
compiler into the cache folder, and loaded RTLD_GLOBAL: libmlx's own lookups then find it before
the bundled library (which is only in libmlx's local scope). Once `mlx.core` is loaded this can no
longer change anything. Without scipy-openblas32 (macOS, CUDA installs), a compiler, or with
GROUNDING_REFERENCE_BLAS=1, nothing changes; a Linux CPU install says so in its log.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# CBLAS's enums are ints, and scipy-openblas32's blasint is a 32-bit int, as in MLX's cblas.h.
# The call count lets a test see MLX's matmuls arrive here.
_SHIM = """
static long calls;
long grounding_blas_shim_calls(void) { return __atomic_load_n(&calls, __ATOMIC_RELAXED); }
#define FORWARD(T, name, alpha_t, beta_t) \\
  void scipy_cblas_##name(int, int, int, int, int, int, alpha_t, const T*, int, const T*, int, beta_t, T*, int); \\
  void cblas_##name(int o, int ta, int tb, int m, int n, int k, alpha_t alpha, const T* a, int lda, \\
                    const T* b, int ldb, beta_t beta, T* c, int ldc) { \\
    __atomic_fetch_add(&calls, 1, __ATOMIC_RELAXED); \\
    scipy_cblas_##name(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc); \\
  }
FORWARD(float, sgemm, float, float)
FORWARD(double, dgemm, double, double)
FORWARD(void, cgemm, const void*, const void*)
"""

_loaded: str | None = None


def cache_root() -> Path:
    """Where the shim is kept: the default `cache_dir`'s place (the worker's config is not read
    yet when the first module of workers.mlx is imported)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gui-grounding"


def loaded() -> str | None:
    """The shim's path where MLX's CPU gemm calls go to OpenBLAS in this process, else None."""
    return _loaded


def use_openblas(cache: Path | None = None) -> str | None:
    """Route MLX's CPU gemm calls to OpenBLAS -> the shim's path, or None where they stay on the
    bundled reference BLAS (the reason logged). Idempotent."""
    global _loaded
    if _loaded or sys.platform != "linux" or os.environ.get("GROUNDING_REFERENCE_BLAS") == "1":
        return _loaded
    try:
        import scipy_openblas32
    except ImportError:
        return None                    # not a CPU install (the `cpu` extra brings it)
    if "mlx.core" in sys.modules:
        log.warning("mlx.core was imported before workers.mlx: its CPU matmuls stay on the reference BLAS")
        return None
    lib_dir = scipy_openblas32.get_lib_dir()
    try:
        shim = _compiled(cache or cache_root(), lib_dir, scipy_openblas32.get_library())
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("MLX's CPU matmuls stay on its bundled reference BLAS, ~30x slower than OpenBLAS "
                    "(%s: %s); a C compiler (cc) lets this server use scipy-openblas32", type(exc).__name__, exc)
        return None
    _loaded = str(shim)
    return _loaded


def _compiled(cache: Path, lib_dir: str, library: str) -> Path:
    """The shim for this OpenBLAS, compiled into `cache` once (atomically: workers start together)."""
    key = hashlib.sha256(f"{_SHIM}\0{lib_dir}\0{library}".encode()).hexdigest()[:16]
    out = cache / f"openblas-shim-{key}.so"
    if out.is_file():
        return out
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler found")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = Path(tmp) / "shim.c"
        src.write_text(_SHIM)
        built = Path(tmp) / out.name
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(src), "-o", str(built), f"-L{lib_dir}",
                        f"-l{library}", f"-Wl,-rpath,{lib_dir}"], check=True, capture_output=True, timeout=120)
        os.replace(built, out)
    return out
