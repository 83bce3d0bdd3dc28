"""The few CUDA driver calls the workers make through ctypes (MLX CUDA backend only), each checked.

Why the driver: MLX's Python API gives neither the GPU's compute capability nor a copy to the
device that avoids managed memory; libcuda, which MLX itself loads, gives both. Only `Driver()`
opens it, so nothing here may run at import: CPU-only machines and macOS have no libcuda, and
there `Driver()` raises OSError.
"""
from __future__ import annotations

import ctypes

_COMPUTE_CAPABILITY_MAJOR, _COMPUTE_CAPABILITY_MINOR = 75, 76      # CUdevice_attribute values


class CudaError(RuntimeError):
    pass


class Driver:
    """libcuda's calls used by the workers, each raising CudaError on a non-zero result."""

    def __init__(self) -> None:
        self._lib = ctypes.CDLL("libcuda.so.1")
        ptr, size, cint = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        self._sig("cuInit", ctypes.c_uint)
        self._sig("cuDeviceGet", ctypes.POINTER(cint), cint)
        self._sig("cuDeviceGetAttribute", ctypes.POINTER(cint), cint, cint)
        self._sig("cuCtxGetCurrent", ctypes.POINTER(ptr))
        self._sig("cuCtxSetCurrent", ptr)
        self._sig("cuMemHostAlloc", ctypes.POINTER(ptr), size, ctypes.c_uint)
        self._sig("cuMemFreeHost", ptr)
        self._sig("cuMemcpyHtoD_v2", ctypes.c_uint64, ptr, size)
        self._sig("cuStreamSynchronize", ptr)

    def _sig(self, name: str, *argtypes) -> None:
        fn = getattr(self._lib, name)
        fn.argtypes, fn.restype = list(argtypes), ctypes.c_int

        def call(*args):
            rc = fn(*args)
            if rc != 0:
                raise CudaError(f"{name} returned CUDA error {rc}")
        setattr(self, name, call)

    def compute_capability(self, device: int = 0) -> tuple[int, int]:
        """(major, minor) of CUDA device `device`."""
        self.cuInit(0)                  # every other call fails before it (a no-op once MLX has made it)
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        self.cuDeviceGet(ctypes.byref(dev), device)
        self.cuDeviceGetAttribute(ctypes.byref(major), _COMPUTE_CAPABILITY_MAJOR, dev.value)
        self.cuDeviceGetAttribute(ctypes.byref(minor), _COMPUTE_CAPABILITY_MINOR, dev.value)
        return major.value, minor.value

    def context(self) -> int:
        """The calling thread's current context (MLX's, on a thread that ran MLX work)."""
        ctx = ctypes.c_void_p()
        self.cuCtxGetCurrent(ctypes.byref(ctx))
        if not ctx.value:
            raise CudaError("no current CUDA context on this thread")
        return ctx.value
