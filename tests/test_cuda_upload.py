"""The one-copy screenshot upload declines off CUDA, and the engine then uploads with mx.array.

The copy itself runs only on MLX's CUDA backend: checked on the GPU machine by bench.upload and by
bench.gpu_ground (whose "device resize = PIL" column reads the image through the engine's upload),
and at every model load by cuda_upload.load's probe, which must get its bytes back exactly.
"""
import ctypes

import mlx.core as mx
import numpy as np

from common.config import ModelSpec
from workers.engine import EngineOptions
from workers.images import PreparedImage
from workers.mlx import cuda_upload
from workers.mlx.cuda_driver import CudaError
from workers.mlx.engine import MlxEngine


def test_load_declines_without_cuda(tmp_path):
    if mx.cuda.is_available():
        return
    assert cuda_upload.load() is None
    eng = MlxEngine(ModelSpec(path="tiny:qwen2_vl", dtype="float32"), EngineOptions("t", str(tmp_path), 1 << 30))
    eng.load()
    assert eng._upload is None
    rgb = np.random.default_rng(1).integers(0, 256, (28, 56, 3), dtype=np.uint8)
    got = eng._resized(PreparedImage(None, (1, 2, 4), (56, 28), (56, 28), rgb))
    np.testing.assert_array_equal(np.array(got), rgb)


class HostMemoryDriver:
    """libcuda's page-locked allocation calls, stood in for by ordinary host memory (no GPU
    here); counts what the pool asks of the driver."""

    def __init__(self):
        self.buffers, self.allocs, self.frees, self.limit = {}, 0, 0, 1 << 20

    def cuCtxSetCurrent(self, ctx):
        assert ctx == 1234

    def cuMemHostAlloc(self, pp, nbytes, flags):
        if nbytes > self.limit:
            raise CudaError("cuMemHostAlloc returned CUDA error 2")
        buf = ctypes.create_string_buffer(nbytes)
        self.buffers[ctypes.addressof(buf)] = buf
        pp._obj.value = ctypes.addressof(buf)
        self.allocs += 1

    def cuMemFreeHost(self, ptr):
        del self.buffers[ptr]
        self.frees += 1


def test_pinned_buffers_go_back_to_the_pool_when_no_array_uses_them(monkeypatch):
    driver = HostMemoryDriver()
    pool = cuda_upload.PinnedPool(driver, 1234)
    a = pool((4, 5, 3))
    a[...] = 9
    view = a[1:]
    address = a.ctypes.data
    del a
    assert pool((4, 5, 3)).ctypes.data != address                # still in use by `view`: a new one
    assert driver.allocs == 2                                     # ... which went back at once
    del view
    b, c = pool((4, 5, 3)), pool((2, 30))                         # both free ones, one by byte size
    assert address in (b.ctypes.data, c.ctypes.data) and driver.allocs == 2
    del b, c
    monkeypatch.setattr(cuda_upload, "POOL_FREE_BYTES", 100)
    big = pool((10, 10, 3))                                       # 300 bytes: more than the pool keeps
    del big
    assert driver.frees == 1 and len(driver.buffers) == driver.allocs - 1
    assert pool((0, 3)).shape == (0, 3)
    driver.limit = 10                                             # the driver refuses: ordinary memory
    refused = pool((4, 5, 7))
    assert refused.shape == (4, 5, 7) and refused.ctypes.data not in driver.buffers
