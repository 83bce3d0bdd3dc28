"""The Hopper flash-attention kernels' probe compares against the right thing, and they stay out
of the way where they cannot run.

The kernels run only on MLX's CUDA backend on an sm_90 GPU (checked on the GPU machine by
bench.flash_attention and, at every model load, by cuda_flash_attention.load's probe). Here, on
the CPU: the probe's reference is the tower's own path for one image (rotary, then attention over
all its tokens); load() declines without CUDA, for other dtypes and head sizes, and the tower then
runs that path; the NVRTC wrapper reports a missing library or a failed compile as NvrtcError.
"""
import mlx.core as mx
import numpy as np
import pytest

from common.config import ModelSpec
from tests.native import skip_without_nvrtc
from workers.engine import EngineOptions
from workers.mlx import cuda_flash_attention as cfa
from workers.mlx import nvrtc
from workers.mlx.cuda_rotary import rotate_qk
from workers.mlx.engine import MlxEngine
from workers.mlx.vision import attend


def test_reference_is_the_towers_rotary_then_attention_over_the_image():
    n, heads, hd, scale = 150, 2, 16, 0.25
    qkv = mx.random.normal((n, 3 * heads * hd), key=mx.random.key(4))
    ang = mx.random.uniform(0, 30, (n, hd // 2), key=mx.random.key(5))
    cos, sin = mx.cos(ang), mx.sin(ang)
    q, k = rotate_qk(qkv.reshape(n, 3, heads, hd), cos, sin)
    want = attend(q, k, qkv.reshape(n, 3, heads, hd)[:, 2], [(0, 1, n)], scale)
    got = cfa.reference(qkv, cos, sin, heads, scale)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)
    # every token sees every other: changing the last token's key moves the first token's output
    other = mx.concatenate([qkv[:-1], qkv[-1:] * 4], axis=0)
    assert not np.allclose(np.array(cfa.reference(other, cos, sin, heads, scale)[0]), np.array(got[0]))


def test_load_declines_without_cuda_other_dtypes_or_head_sizes(tmp_path):
    if not mx.cuda.is_available():
        assert not cfa.supported(80, mx.bfloat16)
        assert cfa.load(16, 80, 80 ** -0.5, mx.bfloat16) is None
    assert cfa.load(16, 80, 80 ** -0.5, mx.float16) is None           # bf16 only
    assert cfa.load(16, 64, 64 ** -0.5, mx.bfloat16) is None          # written and measured for 80
    eng = MlxEngine(ModelSpec(path="tiny:qwen2_vl", dtype="float32"), EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    assert eng._vision.flash is None                                    # the tower's own path runs


def test_source_is_written_for_the_heads_and_head_size():
    src = cfa.source(12, 80)
    assert "#define HEADS 12" in src and "#define HD 80" in src
    assert "m64n128k16" in src and "m64n80k16" in src                   # scores 64 x 128, outputs 64 x 80
    assert cfa.smem_bytes(80, 3) <= 227 * 1024                          # fits an H100's shared memory


def test_nvrtc_failures_are_nvrtc_errors():
    # with NVRTC installed the source fails to compile and the log comes back; without, the library
    # is reported missing; either way the caller gets one exception type to fall back on
    with pytest.raises(nvrtc.NvrtcError) as err:
        nvrtc.compile_cubin("this is not CUDA", "sm_90a")
    assert "compile failed" in str(err.value) or "not found" in str(err.value)


@pytest.mark.parametrize("heads", [16, 8])                # a whole ViT, and half its heads (a split)
def test_attention_kernel_compiles_for_sm90a_without_spills_or_serialized_wgmma(heads):
    # What a worker on an H100 compiles at load. ptxas reports two silent slowdowns: registers
    # spilled to memory, and wgmma serialized because a product stayed in flight where ptxas
    # cannot follow it (C7513/C7514: an edit to the loop's order brings them back).
    skip_without_nvrtc()
    cubin, log = nvrtc.compile_cubin(cfa.source(heads, 80), "sm_90a", ["-DKNAME=k", "--ptxas-options=-v"])
    assert cubin[:4] == b"\x7fELF"
    assert "0 bytes spill stores, 0 bytes spill loads" in log
    assert "C7513" not in log and "C7514" not in log and "serialized" not in log
    regs = int(log.split("Used ")[1].split(" registers")[0])
    assert regs <= 65536 // (128 * cfa.WARPGROUPS)                  # one block of three warpgroups per SM
