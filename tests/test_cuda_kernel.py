"""Our CUDA kernels' builds (workers/mlx/cuda_kernel.py, workers/mlx/nvrtc.py).

Running them needs MLX's CUDA backend (bench/RESULTS.md, fortieth session: every kernel gave the
same bits as MLX's own build of the same body, on an H200). NVRTC itself runs anywhere the test
extra installs it, so here: the text each kernel is built from, that every one of them compiles
for the GPUs it serves, and that a build is made once and read back after.
"""
import pytest

mx = pytest.importorskip("mlx.core")

from tests.native import skip_without_nvrtc  # noqa: E402
from workers.mlx import cuda_flash_attention as cfa  # noqa: E402
from workers.mlx import cuda_head_attention as cha  # noqa: E402
from workers.mlx import cuda_prefix_join as cpj  # noqa: E402
from workers.mlx import cuda_rotary, cuda_upload, nvrtc  # noqa: E402
from workers.mlx import cuda_window_attention as cwa  # noqa: E402
from workers.mlx.cuda_kernel import Kernel  # noqa: E402


def test_the_text_declares_what_mlx_would_for_the_same_body():
    k = Kernel("k", ["x", "idx"], ["out"], "out[0] = static_cast<T>(x_shape[1] * N + FLAG);", "// helpers")
    text = k.text((("T", mx.bfloat16), ("N", 3), ("FLAG", True)), (mx.float32, mx.int32), (2, 0), (mx.bfloat16,))
    # inputs, then outputs, then the shapes the body reads (x's, not idx's), as int scalars
    assert "const float* x,\n    const int32_t* idx,\n    bf16* out,\n    int x_shape_0,\n    int x_shape_1)" in text
    assert "const int x_shape[2] = {x_shape_0, x_shape_1};" in text
    assert "using T = bf16;" in text and "constexpr int N = 3;" in text and "constexpr bool FLAG = true;" in text
    assert "// helpers" in text and 'extern "C" __global__ void KNAME(' in text
    assert "#include" not in text                  # compiles without a CUDA toolkit's headers


def test_strides_and_ranks_are_refused():
    # precompiled kernels take pointers and scalars only; shapes are passed, strides are not
    with pytest.raises(ValueError):
        Kernel("k", ["x"], ["out"], "out[0] = x[x_strides[0]];")


# every kernel as the worker builds it: (kernel, template, input dtypes, input ranks, output dtypes, archs)
ELEMENTWISE = ("sm_75", "sm_80", "sm_90")
SERVED = [
    *[(cuda_rotary.CudaRotary(16, 80).kernel, (("T", t), ("HEADS", 16), ("HALF", 40)), (t, mx.float32, mx.float32),
       (2, 2, 2), (t,), ELEMENTWISE) for t in (mx.bfloat16, mx.float16, mx.float32)],
    (cfa.TILER, (("T", mx.bfloat16), ("HEADS", 16), ("HALF", 40), ("ROWS", 128)), (mx.bfloat16, mx.float32, mx.float32),
     (2, 2, 2), (mx.bfloat16,), ("sm_90",)),
    *[(cha.TILER, (("PART", part), ("ROWS", 64), ("COLS", 64), ("HEADS", 8)), (mx.float32,), (2,), (mx.float32,), ("sm_90",))
      for part in (0, 1, 2)],
    *[(cpj.CudaPrefixJoin(12, 2, 128).kernel, (("T", t), ("HEADS", 12), ("KV", 2), ("HALF", 64)), (t,) * 5,
       (3, 3, 3, 4, 4), (t,) * 3, ELEMENTWISE) for t in (mx.bfloat16, mx.float32)],
    (cwa.CudaWindowAttention(16, 80, 0.1).kernel, (("T", mx.bfloat16), ("HEADS", 16), ("HALF", 40), ("WMAX", 64)),
     (mx.bfloat16, mx.float32, mx.float32, mx.int32, mx.int32, mx.float32), (2, 2, 2, 1, 1, 1), (mx.bfloat16,),
     ("sm_80", "sm_90")),
    *[(cuda_upload.Addresses(w).kernel, (), (mx.uint8,) * w, (1,) * w, (mx.uint64,), ELEMENTWISE) for w in (1, 32)],
]


@pytest.mark.parametrize("kernel, template, dtypes, ndims, outs, archs", SERVED,
                         ids=lambda v: v.name if isinstance(v, Kernel) else None)
def test_every_kernel_compiles_for_the_gpus_it_serves(kernel, template, dtypes, ndims, outs, archs):
    skip_without_nvrtc()
    text = kernel.text(template, dtypes, tuple(n if s else 0 for n, s in zip(ndims, kernel.shaped)), outs)
    for arch in archs:
        cubin, log = nvrtc.compile_cubin(text.replace("KNAME", "k"), arch, ["--ptxas-options=-v"])
        assert cubin[:4] == b"\x7fELF"
        assert "0 bytes spill stores, 0 bytes spill loads" in log


def test_a_build_is_made_once_and_read_back(tmp_path, monkeypatch):
    skip_without_nvrtc()
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "kernels"))
    builds = []
    compile_cubin = nvrtc.compile_cubin

    def counted(*args):
        builds.append(args)
        return compile_cubin(*args)
    monkeypatch.setattr(nvrtc, "compile_cubin", counted)
    src = 'extern "C" __global__ void k(float* out) { out[0] = 1.0f; }'
    first, log = nvrtc.cached_cubin(src, "sm_90", ["--ptxas-options=-v"])
    again, log_again = nvrtc.cached_cubin(src, "sm_90", ["--ptxas-options=-v"])
    assert len(builds) == 1 and again == first and log_again == log and "registers" in log
    # another source, architecture or option set is another build
    nvrtc.cached_cubin(src.replace("1.0f", "2.0f"), "sm_90", ["--ptxas-options=-v"])
    nvrtc.cached_cubin(src, "sm_80", ["--ptxas-options=-v"])
    nvrtc.cached_cubin(src, "sm_90")
    assert len(builds) == 4
    # a damaged file is built again
    for cubin in (tmp_path / "kernels").glob("*.cubin"):
        cubin.write_bytes(b"not a cubin")
    assert nvrtc.cached_cubin(src, "sm_90", ["--ptxas-options=-v"])[0] == first and len(builds) == 5


def test_a_folder_that_cannot_be_written_still_gives_the_build(tmp_path, monkeypatch):
    skip_without_nvrtc()
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(blocker / "kernels"))     # under a file: mkdir fails
    cubin, _ = nvrtc.cached_cubin('extern "C" __global__ void k(float* out) { out[0] = 1.0f; }', "sm_90")
    assert cubin[:4] == b"\x7fELF"
