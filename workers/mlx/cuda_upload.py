"""A decoded screenshot to the GPU in one DMA copy (MLX CUDA backend only).

Why: `mx.array(rgb)` puts the bytes in CUDA managed memory, written page by page by the host, and
the first kernel that reads them migrates the pages to the device, fault by fault: for a 1080p
screenshot (6.2 MB) 2.7 ms of host time, and the resized image is on the device 3.7 ms later than
from an image born there, all inside the forward. One DMA copy takes these to 1.3 and 1.0 ms on an
H200 (`python3 -m bench.upload`, bench/RESULTS.md).

How: a staging buffer per byte size, an MLX array whose managed pages are moved to the device
once and advised to stay there; each upload is one `cuMemcpyHtoD` into it, then one device copy
into a fresh MLX array, evaluated before the call returns, so the staging buffer is free again for
the next image (several images of one size in a batch). MLX's Python API has no upload that
avoids managed memory, so this calls the CUDA driver (libcuda, which MLX itself uses) with ctypes.
Copying from the numpy array as it is was faster than through a pinned buffer (the extra host
copy costs more than the faster DMA saves).

Where the driver or any call is missing or fails, or the probe at load does not get the same bytes
back, `load` returns None and the engine keeps `mx.array`.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from collections import OrderedDict

import mlx.core as mx
import numpy as np

from workers.mlx.cuda_rotary import on_cuda

log = logging.getLogger(__name__)

CU_MEM_ADVISE_SET_PREFERRED_LOCATION = 3
CU_MEM_LOCATION_TYPE_DEVICE = 1
KEPT_SIZES = 4               # staging buffers kept: one per screen size seen last


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CudaError(RuntimeError):
    pass


class _Driver:
    """The few libcuda calls used here, each raising CudaError on a non-zero result."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        self._lib = lib
        u64, size = ctypes.c_uint64, ctypes.c_size_t
        self._sig("cuCtxGetCurrent", ctypes.POINTER(ctypes.c_void_p))
        self._sig("cuCtxGetDevice", ctypes.POINTER(ctypes.c_int))
        self._sig("cuMemcpyHtoD_v2", u64, ctypes.c_void_p, size)
        self._sig("cuMemAdvise_v2", u64, size, ctypes.c_int, _MemLocation)
        self._sig("cuMemPrefetchAsync_v2", u64, size, _MemLocation, ctypes.c_uint, ctypes.c_void_p)
        self._sig("cuStreamSynchronize", ctypes.c_void_p)

    def _sig(self, name: str, *argtypes) -> None:
        fn = getattr(self._lib, name)
        fn.argtypes, fn.restype = list(argtypes), ctypes.c_int

        def call(*args):
            rc = fn(*args)
            if rc != 0:
                raise CudaError(f"{name} returned CUDA error {rc}")
        setattr(self, name, call)

    def device(self) -> int:
        """The device of the calling thread's current context (MLX's; None context is an error)."""
        ctx = ctypes.c_void_p()
        self.cuCtxGetCurrent(ctypes.byref(ctx))
        if not ctx.value:
            raise CudaError("no current CUDA context on this thread")
        dev = ctypes.c_int()
        self.cuCtxGetDevice(ctypes.byref(dev))
        return dev.value


class _Staging:
    """One byte size's device-resident MLX array and its address."""

    def __init__(self, driver: _Driver, nbytes: int, device: int):
        self.array = mx.array(np.zeros(nbytes, np.uint8))
        mx.eval(self.array)
        self.ptr = np.asarray(self.array).ctypes.data     # the managed pointer; the host never touches it again
        here = _MemLocation(CU_MEM_LOCATION_TYPE_DEVICE, device)
        driver.cuMemAdvise_v2(self.ptr, nbytes, CU_MEM_ADVISE_SET_PREFERRED_LOCATION, here)
        driver.cuMemPrefetchAsync_v2(self.ptr, nbytes, here, 0, None)
        driver.cuStreamSynchronize(None)


class CudaUpload:
    """uint8 numpy array -> MLX array with the same shape and bytes, on the device. Call it on the
    thread that runs MLX (its CUDA context must be current there)."""

    def __init__(self, driver: _Driver):
        self._driver = driver
        self._device = driver.device()
        self._staging: OrderedDict[int, _Staging] = OrderedDict()
        self._lock = threading.Lock()

    def _buffers(self, nbytes: int) -> _Staging:
        st = self._staging.get(nbytes)
        if st is None:
            st = self._staging[nbytes] = _Staging(self._driver, nbytes, self._device)
            while len(self._staging) > KEPT_SIZES:
                self._staging.popitem(last=False)
        self._staging.move_to_end(nbytes)
        return st

    def __call__(self, host: np.ndarray) -> mx.array:
        if host.dtype != np.uint8:
            raise TypeError(f"uploads take uint8 arrays, not {host.dtype}")
        with self._lock:
            st = self._buffers(host.nbytes)
            host = np.ascontiguousarray(host)
            self._driver.cuMemcpyHtoD_v2(st.ptr, host.ctypes.data, host.nbytes)
            self._driver.cuStreamSynchronize(None)        # the copy has landed before MLX reads it
            out = mx.add(st.array.reshape(host.shape), 0)  # a fresh array: the staging is free again
            mx.eval(out)
            return out


def load() -> CudaUpload | None:
    """The upload if MLX runs on CUDA, the driver calls work and a probe comes back byte for byte;
    else None (the caller keeps `mx.array`)."""
    if not on_cuda():
        return None
    try:
        mx.eval(mx.zeros(1) + 1)                   # MLX's context is current on this thread from here
        up = CudaUpload(_Driver())
        probe = np.random.default_rng(0).integers(0, 256, (37, 1001, 3), dtype=np.uint8)
        for _ in range(2):                         # the second goes through the same staging buffer
            got = up(probe)
            if got.dtype != mx.uint8 or tuple(got.shape) != probe.shape or not np.array_equal(np.array(got), probe):
                log.warning("CUDA upload probe got other bytes back; using mx.array")
                return None
            probe = probe[::-1].copy()
        return up
    except Exception as exc:       # no libcuda, an old driver without the _v2 calls, ...
        log.warning("CUDA upload unavailable (%s: %s); using mx.array", type(exc).__name__, exc)
        return None
