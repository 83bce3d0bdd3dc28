"""The ViT norms: the MLX-ops path is the reference's arithmetic, and the CUDA kernels compile.

The kernels run only on MLX's CUDA backend (checked on the GPU machine by bench.vit_ops and, at
every model load, by cuda_norms.load's probe against the MLX-ops path). Here, on the CPU: that
path computes transformers' LayerNorm and Qwen2RMSNorm, the residual sum comes back with the norm,
load() gives that path where there is no CUDA, and NVRTC compiles each kernel as MLX would wrap it.
"""
import struct

import mlx.core as mx
import numpy as np
import pytest

from workers.mlx import cuda_norms, nvrtc
from workers.mlx.cuda_norms import EPS, MLX_NORMS


def _data(n=29, c=48, seed=5):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, c)) * 3 + 1, rng.normal(size=(n, c)), rng.normal(size=c) + 1, rng.normal(size=c))


def _layer_norm(s, w, b):
    mean = s.mean(-1, keepdims=True)
    return (s - mean) / np.sqrt(((s - mean) ** 2).mean(-1, keepdims=True) + EPS) * w + b


def _rms_norm(s, w):
    return s / np.sqrt((s ** 2).mean(-1, keepdims=True) + EPS) * w


def test_mlx_norms_are_transformers_layer_and_rms_norms():
    x, p, w, b = _data()
    f = lambda t: mx.array(t.astype(np.float32))
    np.testing.assert_allclose(np.array(MLX_NORMS.layer(f(x), f(w), f(b))), _layer_norm(x, w, b), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(MLX_NORMS.rms(f(x), f(w))), _rms_norm(x, w), rtol=1e-4, atol=1e-4)


def test_residual_variants_return_the_sum_and_its_norm():
    x, p, w, b = _data()
    f = lambda t: mx.array(t.astype(np.float32))
    s, y = MLX_NORMS.add_layer(f(x), f(p), f(w), f(b))
    np.testing.assert_allclose(np.array(s), x + p, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(y), _layer_norm(x + p, w, b), rtol=1e-4, atol=1e-4)
    s, y = MLX_NORMS.add_rms(f(x), f(p), f(w))
    np.testing.assert_allclose(np.array(s), x + p, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(y), _rms_norm(x + p, w), rtol=1e-4, atol=1e-4)


def test_load_gives_the_mlx_path_without_cuda():
    if not mx.cuda.is_available():
        assert cuda_norms.load(1280, mx.bfloat16) is MLX_NORMS


def _as_mlx_wraps_it(rms: int, add: int, dtype: str, width: int) -> str:
    """The kernel source as MLX's `cuda_kernel` builds it (a `__global__` function over the inputs,
    their `_shape` where the source uses it, and the outputs, the template arguments as constants
    at the top of the body), with stand-ins for the two MLX device headers it relies on."""
    src = f"#define RMS {rms}\n#define ADD {add}\n" + cuda_norms._SOURCE
    params = []
    for name in ["x"] + (["p"] if add else []) + ["w"] + ([] if rms else ["b"]):
        params.append(f"const T* {name}")
        if f"{name}_shape" in src:
            params.append(f"const Shape {name}_shape")
    params += [f"T* {name}" for name in (["s"] if add else []) + ["y"]]
    eps_bits = struct.unpack("<i", struct.pack("<f", EPS))[0]
    return ("typedef long long int64_t;\n"
            "struct Shape { int d[8]; __device__ int operator[](int i) const { return d[i]; } };\n"
            f"#define EPS_BITS {eps_bits}\nusing T = {dtype};\n"
            f"extern \"C\" __global__ void k({', '.join(params)}) {{\nconstexpr int C = {width};\n{src}\n}}\n")


@pytest.mark.parametrize("rms,add", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_kernels_compile_without_spills(rms, add):
    # float stands in for bf16 (whose header the NVRTC wheel does not ship): the same code, 4 values
    # per 16-byte load instead of 8; 1300 leaves part of a lane's last load past the row's end
    try:
        nvrtc._library()
    except nvrtc.NvrtcError:
        pytest.skip("NVRTC is not installed on this platform")
    for width in (1280, 1300):
        cubin, log = nvrtc.compile_cubin(_as_mlx_wraps_it(rms, add, "float", width), "sm_80", ["--ptxas-options=-v"])
        assert cubin[:4] == b"\x7fELF"
        assert "0 bytes spill stores, 0 bytes spill loads" in log
