"""The pointer head's fused attention kernel stays out of the way where it cannot run, compiles as it
must where it can, and the head hands it what it expects.

The kernel runs only on MLX's CUDA backend on an sm_90 GPU (checked on the GPU machine by
bench.head_attention against float64 and, at every model load, by cuda_head_attention.load's
probe). Here, on the CPU: load() declines, the tile of keys fits shared memory for the heads it
serves (GUI-Actor-2B's 192, 3B's 256) and not for the 7B's 448, the source compiles for sm_90a
without spilling or serializing its wgmma, and the head's contract with the kernel (q;k;v in,
token-major heads out) holds against a float64 attention in its place.
"""
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from bench.head_attention import float64_attention
from common.config import ModelSpec
from tests.native import skip_without_nvrtc
from workers.engine import EngineOptions
from workers.mlx import cuda_head_attention as cha
from workers.mlx import nvrtc
from workers.mlx.engine import MlxEngine
from workers.mlx.head import PointerHead


def test_load_declines_without_cuda(tmp_path):
    if not mx.cuda.is_available():
        assert not cha.supported(192)
        assert cha.load(8, 192) is None
    eng = MlxEngine(ModelSpec(path="tiny:qwen2_vl", dtype="float32"), EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    assert eng._head.self_attention.fused is None                      # the head's MLX ops run


@pytest.mark.parametrize("head_dim, keys", [(192, 32), (256, 16), (64, 32), (448, None), (100, None), (264, None)])
def test_a_tile_of_keys_fits_shared_memory_for_the_heads_it_serves(head_dim, keys):
    # 192: GUI-Actor-2B; 256: 3B; 448: 7B (its 64 x 448 float32 outputs would not fit in registers);
    # 100: not a multiple of TF32's K of 8
    assert cha.key_tile(head_dim) == keys
    if keys is not None:
        assert cha.smem_bytes(head_dim, keys) <= cha.SMEM_MAX
    if keys == 16:                                                     # 32 would not fit
        assert cha.smem_bytes(head_dim, 32) > cha.SMEM_MAX


def test_the_head_hands_the_kernel_qkv_and_takes_token_major_heads():
    # A float64 attention stands in for the kernel, with the kernel's signature: the head's output
    # must equal the head's own (MLX ops), so q;k;v go in and [n, heads * D] comes out as the
    # out-projection takes it. Heads of 8 differ from one another: a head-major output would not pass.
    dim, n = 64, 130
    head = PointerHead(dim)
    head.update(tree_map(lambda p: mx.random.normal(p.shape, key=mx.random.key(3)) * 0.3, head.parameters()))
    enc = mx.random.normal((n, dim), key=mx.random.key(4))
    dec = mx.random.normal((2, dim), key=mx.random.key(5))
    want = np.array(head(enc, dec))
    calls = []

    def stand_in(qkv):
        calls.append(qkv.shape)
        return mx.array(float64_attention(np.array(qkv), head.self_attention.heads, n).astype(np.float32))

    head.self_attention.fused = stand_in
    got = np.array(head(enc, dec))
    assert calls == [(n, 3 * dim)]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("head_dim", [192, 256])
def test_kernel_compiles_for_sm90a_without_spills_or_serialized_wgmma(head_dim):
    # What a worker on an H100/H200 compiles at load (C7513/C7514: wgmma serialized because a product
    # stayed in flight where ptxas cannot follow it)
    skip_without_nvrtc()
    bkv = cha.key_tile(head_dim)
    src = cha.source(8, head_dim, bkv)
    assert f"m64n{bkv}k8.f32.tf32.tf32" in src and f"m64n{head_dim}k8.f32.tf32.tf32" in src
    cubin, log = nvrtc.compile_cubin(src, "sm_90a", ["-DKNAME=k", "--ptxas-options=-v"])
    assert cubin[:4] == b"\x7fELF"
    assert "0 bytes spill stores, 0 bytes spill loads" in log
    assert "C7513" not in log and "C7514" not in log and "serialized" not in log
