"""Import boundaries (style.md): each package is imported in a fresh interpreter and the modules it
pulled in are checked. Only workers/mlx may load MLX, only frontend loads Sanic, nobody but workers
loads PIL, and the three processes share nothing but common/."""
import json
import pkgutil
import subprocess
import sys

import pytest

from tests.stackutil import ROOT

FORBIDDEN = {
    "common": {"broker", "workers", "frontend", "mlx", "mlx_vlm", "PIL", "sanic", "torch", "transformers"},
    "broker": {"workers", "frontend", "mlx", "mlx_vlm", "PIL", "sanic", "torch", "transformers"},
    "workers": {"broker", "frontend", "sanic", "mlx", "mlx_vlm", "torch", "transformers"},
    "frontend": {"broker", "workers", "mlx", "mlx_vlm", "PIL", "torch", "transformers"},
}


def _modules(package: str) -> list[str]:
    names = [package]
    for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
        if info.name.startswith("workers.mlx") or info.name.endswith("__main__"):
            continue  # workers/mlx is the one place MLX lives; __main__ runs the process
        names.append(info.name)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_boundaries(package):
    modules = _modules(package)
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not (loaded & FORBIDDEN[package]), f"{package} pulled in {sorted(loaded & FORBIDDEN[package])}"
