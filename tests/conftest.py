"""Loaded before the test modules.

- Importing workers.mlx routes MLX's CPU matmuls to OpenBLAS for every test, including those that
  use mlx.core alone, as in a Linux CPU install (workers/mlx/cpu_blas.py; the routing works
  whatever was imported before).
- Hypothesis's too_slow health check is off, as Hypothesis's own "ci" profile (taken when CI is
  set) has it: in a fresh clone, Hypothesis's first run scans the project's modules for literal
  constants and caches them in .hypothesis/, and that second or so lands in the first draw of
  whichever property test comes first, failing `make test` once per clone. The suite's time
  bounds are pytest-timeout's; every other setting stays as loaded (the "ci" profile's under CI).
"""
from hypothesis import HealthCheck, settings

import workers.mlx  # noqa: F401

settings.register_profile("suite", parent=settings.default, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")
