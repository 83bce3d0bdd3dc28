"""The libcuda wrapper checks every call, and what asks it for the GPU's architecture falls back
where it fails.

libcuda exists only on machines with an NVIDIA driver; here it is stood in for by Python functions
that answer as the driver API does (0 for success, an error code otherwise).
"""
import ctypes

import mlx.core as mx
import pytest

from workers.mlx import cuda_driver
from workers.mlx import cuda_flash_attention as cfa
from workers.mlx import cuda_head_attention as cha
from workers.mlx import cuda_sm90


class FakeLibcuda:
    """libcuda's device queries for one device of compute capability 9.0; `fail` names a call
    that returns CUDA_ERROR_NO_DEVICE (100)."""

    def __init__(self, fail: str = ""):
        self.fail = fail
        for name in ("cuCtxGetCurrent", "cuCtxSetCurrent", "cuMemHostAlloc", "cuMemFreeHost",
                     "cuMemcpyHtoD_v2", "cuStreamSynchronize"):
            setattr(self, name, self._answer(name, lambda *args: None))
        self.cuInit = self._answer("cuInit", lambda flags: None)
        self.cuDeviceGet = self._answer("cuDeviceGet", self._device_get)
        self.cuDeviceGetAttribute = self._answer("cuDeviceGetAttribute", self._attribute)

    def _answer(self, name, effect):
        def call(*args):
            if name == self.fail:
                return 100
            effect(*args)
            return 0
        return call

    def _device_get(self, dev, ordinal):
        assert ordinal == 0
        dev._obj.value = 0

    def _attribute(self, value, attribute, dev):
        value._obj.value = {75: 9, 76: 0}[attribute]


def test_compute_capability_through_checked_calls(monkeypatch):
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibcuda())
    assert cuda_driver.Driver().compute_capability() == (9, 0)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibcuda(fail="cuDeviceGet"))
    with pytest.raises(cuda_driver.CudaError, match="cuDeviceGet returned CUDA error 100"):
        cuda_driver.Driver().compute_capability()


@pytest.mark.parametrize("fail", ["no libcuda", "cuInit"])
def test_hopper_kernels_are_unsupported_where_the_driver_fails(monkeypatch, fail):
    # the ViT's flash attention and the pointer head's attention ask the same check (cuda_sm90.on_hopper)
    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", missing if fail == "no libcuda" else lambda name: FakeLibcuda(fail))
    monkeypatch.setattr(cuda_sm90, "on_cuda", lambda: True)
    monkeypatch.delenv("GROUNDING_FLASH_ATTENTION", raising=False)
    monkeypatch.delenv(cha.ENV_SWITCH, raising=False)
    assert cfa.supported(80, mx.bfloat16) is False
    assert cha.supported(192) is False
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibcuda())
    assert cfa.supported(80, mx.bfloat16) is True                      # the same on a working sm_90
    assert cha.supported(192) is True
    assert cha.supported(448) is False                                 # but not for heads it cannot fit
