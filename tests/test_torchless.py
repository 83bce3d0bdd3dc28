"""A worker-side process grounds with neither PyTorch nor transformers imported (workers/torchless.py),
though this environment has both (the parity tests use them)."""
import subprocess
import sys
import textwrap

import pytest

WORKER_SIDE = textwrap.dedent("""
    import io, sys, tempfile
    from workers.torchless import keep_torch_and_transformers_out
    keep_torch_and_transformers_out()
    import numpy as np
    from PIL import Image
    from common.config import ModelSpec
    from workers.engine import EngineOptions, GroundingRequest
    from workers.mlx.engine import MlxEngine
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(buf, "PNG")
    for backbone in ("qwen2_vl", "qwen2_5_vl"):
        eng = MlxEngine(ModelSpec(path=f"tiny:{backbone}", max_pixels=150_000),
                        EngineOptions("t", sys.argv[1], 4096 * 4096))
        eng.load()
        (res,) = eng.run([eng.prepare(GroundingRequest("j", buf.getvalue(), "click the button"))])
        print(backbone, len(res.points))
    print("imported:", sorted(m for m in ("torch", "transformers") if sys.modules.get(m) is not None))
""")


def test_a_worker_side_process_grounds_without_torch_or_transformers(tmp_path):
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, "-c", WORKER_SIDE, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "imported: []"
    assert [line.split()[0] for line in lines[:2]] == ["qwen2_vl", "qwen2_5_vl"]
    assert all(int(line.split()[1]) > 0 for line in lines[:2])


def test_it_leaves_an_imported_mlx_vlm_as_it_is():
    code = ("import mlx_vlm, sys; from workers.torchless import keep_torch_and_transformers_out; "
            "before = sys.modules['mlx_vlm']; keep_torch_and_transformers_out(); "
            "assert sys.modules['mlx_vlm'] is before and hasattr(before, 'generate'); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_process_that_never_runs_mlx_does_not_import_it_at_exit():
    # a fake engine's worker calls it too: the stream cleanup it registers must not load MLX then
    code = ("import sys\n"
            "sys.addaudithook(lambda ev, args: ev == 'import' and args[0].startswith('mlx')"
            " and print('imported', args[0], file=sys.stderr))\n"
            "from workers.torchless import keep_torch_and_transformers_out\n"
            "keep_torch_and_transformers_out()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "imported" not in proc.stderr, proc.stderr[-2000:]
