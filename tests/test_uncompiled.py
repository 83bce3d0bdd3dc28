"""Load probes' references run uncompiled (workers/mlx/uncompiled.py), so that a machine's first
load builds only the fused kernels serving uses. The kernels are MLX's CPU JIT's here (a
machine with no C++ compiler builds none, and the tests that count them skip); on CUDA the same
fusions are NVRTC builds, 2.3-7.9 s apart on an H200 (bench/RESULTS.md, thirty-ninth session)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.mlx
mx = pytest.importorskip("mlx.core")

from workers.mlx.uncompiled import uncompiled  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def counting_compiled():
    """A compiled function and how many times its Python body ran (once per trace)."""
    runs = []

    def body(x):
        runs.append(1)
        return mx.exp(x) * 2 + 1
    return mx.compile(body), runs


def test_compiled_functions_run_as_python_inside_and_are_traced_again_after():
    fn, runs = counting_compiled()
    x = mx.ones((4,))
    fn(x), fn(x)
    assert len(runs) == 1                              # traced once
    with uncompiled():
        want = fn(x)
        fn(x)
        with uncompiled():
            fn(x)
        fn(x)                                          # the inner block's end kept it off
    assert len(runs) == 5
    assert mx.array_equal(fn(x), want) and len(runs) == 5   # compiled again, from its trace


def test_the_users_own_switch_stays_as_set(monkeypatch):
    fn, runs = counting_compiled()
    monkeypatch.setenv("MLX_DISABLE_COMPILE", "1")
    mx.disable_compile()
    try:
        with uncompiled():
            fn(mx.ones((2,)))
        fn(mx.ones((2,))), fn(mx.ones((2,)))
        assert len(runs) == 3                          # still off after the block
    finally:
        mx.enable_compile()


PROBE = textwrap.dedent("""
    import sys, tempfile
    from pathlib import Path
    import mlx.core as mx
    from workers.mlx.backbone import load_backbone
    from workers.mlx.checkpoint import read_checkpoint
    from workers.mlx.language import FastLanguageModel
    from workers.tiny_checkpoint import write_tiny_checkpoint

    cache = Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "cpu"
    def kernels():
        return {p.name for p in cache.glob("*")} if cache.exists() else set()

    # the model alone: an engine's load would run the probe before anything is counted
    model, _ = load_backbone(read_checkpoint(write_tiny_checkpoint(sys.argv[1])), mx.bfloat16)
    text = model.language_model.model
    fast = FastLanguageModel(text)
    h = (mx.random.normal((2, 70, text.norm.weight.shape[0]), key=mx.random.key(0)) * 0.5).astype(text.norm.weight.dtype)
    pos = mx.broadcast_to(mx.arange(70)[None, None], (3, 2, 70)).astype(mx.int32)
    mx.eval(fast.pointer_states(h, pos, [69, 40]))      # what serving builds for these shapes
    served = kernels()
    assert fast.agrees_with(text)
    print("SERVED", len(served))
    print("PROBE", *sorted(kernels() - served))
    whole, kept = fast.pointer_states(h[:1], pos[:, :1], [60], keep=[40])
    before = kernels()
    mx.eval(fast.pointer_state_after(kept[0], h[:1, 40:], pos[:, :1, 40:], [20]))
    print("TAIL", *sorted(kernels() - before))
""")


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory) -> dict[str, list[str]]:
    """PROBE's lines by their first word, run with an empty CPU JIT cache; skips where that JIT
    built nothing (no C++ compiler)."""
    tmp = tmp_path_factory.mktemp("jit")
    env = {**os.environ, "TMPDIR": str(tmp)}          # MLX's CPU JIT writes under the temp dir
    env.pop("MLX_DISABLE_COMPILE", None)
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp / "checkpoint")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line.strip()}
    if int(lines["SERVED"][0]) == 0:
        pytest.skip("MLX's CPU JIT built nothing here (no C++ compiler?)")
    return lines


def test_the_language_models_load_probe_builds_no_kernel_serving_does_not(probe_run):
    # before uncompiled(), mlx-vlm's forward built a fused kernel of its own here (its SwiGLU)
    assert probe_run["PROBE"] == []


def test_a_cached_questions_trace_fuses_no_rotary_table_or_mask(probe_run):
    """Inside the tail's `mx.compile` trace, the rotary tables' sin and cos and the pointer rows'
    mask fused into kernels only the tail used (nine NVRTC builds, 31.9 s of a first load on an
    H200); they are computed outside it now."""
    tail = probe_run["TAIL"]
    assert not [k for k in tail if any(op in k for op in ("Sin", "Cos", "LessEqual"))], tail
