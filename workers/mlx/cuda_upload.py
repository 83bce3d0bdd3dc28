"""A decoded screenshot to the GPU in one DMA copy (MLX CUDA backend only).

Why: `mx.array(rgb)` puts the bytes in CUDA managed memory, written page by page by the host, and
the first kernel that reads them migrates the pages to the device, fault by fault: for a 1080p
screenshot (6.2 MB) 2.2-3.5 ms of host time, and the resized image is on the device 3-4.6 ms later
than from an image born there, all inside the forward (`python3 -m bench.upload`, bench/RESULTS.md).

How: MLX allocates a device buffer (`mx.zeros`), a one-thread kernel reads its address (MLX's
Python API gives addresses only through the buffer protocol, for memory the host can read), and
one `cuMemcpyHtoD` fills it. MLX's Python API has no upload that avoids managed memory, so this
calls the CUDA driver (libcuda, which MLX itself uses; workers/mlx/cuda_driver.py). The copy runs
at the bus's speed from page-locked host memory, and at about a third of it from ordinary memory,
which the driver first copies into its own page-locked buffers: `host_buffer` hands the image
decoders page-locked buffers to decode into (a pool, each buffer back in it once no array uses it).
On H200s, 1080p: 0.46-0.58 ms of host time from such a buffer, 1.2-1.5 ms from an ordinary array.

Where the driver or any call is missing or fails, or the probe at load does not get the same bytes
back, `load` returns None and the engine keeps `mx.array` and ordinary buffers.
"""
from __future__ import annotations

import ctypes
import logging
import math
import threading
import weakref

import mlx.core as mx
import numpy as np

from workers.mlx.cuda_driver import CudaError, Driver
from workers.mlx.cuda_kernel import Kernel
from workers.mlx.cuda_rotary import on_cuda

log = logging.getLogger(__name__)

POOL_FREE_BYTES = 256 << 20      # page-locked buffers kept for reuse beyond this are released

class Addresses:
    """The device addresses of MLX arrays' buffers, read by a kernel on the device, `width` at a
    time (the screenshot upload takes one; a checkpoint's read, workers/mlx/cuda_weights.py, many)."""

    def __init__(self, width: int = 1):
        self.width = width
        source = "\n".join(f"    if (blockIdx.x == 0 && threadIdx.x == 0) addr[{i}] = "
                           f"reinterpret_cast<unsigned long long>(buf{i});" for i in range(width))
        self.kernel = Kernel(f"buffer_addresses_{width}", [f"buf{i}" for i in range(width)], ["addr"], source)

    def __call__(self, arrays: list[mx.array]) -> list[int]:
        """Waits for the kernels, and so for the arrays (their zeros, say)."""
        out = []
        for i in range(0, len(arrays), self.width):
            group = arrays[i:i + self.width]
            (addr,) = self.kernel(inputs=group + group[-1:] * (self.width - len(group)), grid=(1, 1, 1),
                                  threadgroup=(1, 1, 1), output_shapes=[(self.width,)], output_dtypes=[mx.uint64])
            out.append((len(group), addr))
        mx.eval([addr for _, addr in out])
        return [int(a) for n, addr in out for a in np.array(addr)[:n]]


class PinnedPool:
    """Page-locked host buffers by byte size. A buffer goes back to the pool when the last array
    viewing it is gone (a weakref finalizer), so a job that fails or is cancelled returns its
    buffer as any other; free buffers past POOL_FREE_BYTES are released. Any thread may take one:
    the driver's context is made current there first (it is the process's primary context, which
    MLX uses too)."""

    def __init__(self, driver: Driver, context: int):
        self._driver, self._context = driver, context
        self._free: dict[int, list[int]] = {}
        self._free_bytes = 0
        # re-entrant: a garbage collection inside the lock may run a buffer's finalizer right there
        self._lock = threading.RLock()

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        """An uninitialised uint8 array of `shape` in page-locked memory."""
        nbytes = max(1, math.prod(shape))
        with self._lock:
            ptrs = self._free.get(nbytes)
            ptr = ptrs.pop() if ptrs else None
            if ptr is not None:
                self._free_bytes -= nbytes
        if ptr is None:
            try:
                self._driver.cuCtxSetCurrent(self._context)
                p = ctypes.c_void_p()
                self._driver.cuMemHostAlloc(ctypes.byref(p), nbytes, 0)
                ptr = p.value
            except CudaError as exc:     # out of page-lockable memory, say: an ordinary buffer does too
                log.warning("no page-locked buffer of %d bytes (%s); decoding into ordinary memory", nbytes, exc)
                return np.empty(shape, np.uint8)
        owner = (ctypes.c_uint8 * nbytes).from_address(ptr)
        weakref.finalize(owner, self._give_back, ptr, nbytes).atexit = False
        return np.ctypeslib.as_array(owner)[:math.prod(shape)].reshape(shape)

    def _give_back(self, ptr: int, nbytes: int) -> None:
        with self._lock:
            if self._free_bytes + nbytes <= POOL_FREE_BYTES:
                self._free.setdefault(nbytes, []).append(ptr)
                self._free_bytes += nbytes
                return
        try:
            self._driver.cuCtxSetCurrent(self._context)
            self._driver.cuMemFreeHost(ptr)
        except CudaError as exc:
            log.warning("releasing a page-locked buffer failed: %s", exc)


class CudaUpload:
    """uint8 numpy array -> MLX array with the same shape and bytes, on the device, by one DMA
    copy. Call it on the thread that runs MLX (its CUDA context is current there); `host_buffer`
    gives arrays from which the copy runs fastest, on any thread."""

    def __init__(self, driver: Driver):
        self._driver = driver
        self._address = Addresses()
        self.host_buffer = PinnedPool(driver, driver.context())

    def __call__(self, host: np.ndarray) -> mx.array:
        if host.dtype != np.uint8:
            raise TypeError(f"uploads take uint8 arrays, not {host.dtype}")
        host = np.ascontiguousarray(host)
        buf = mx.zeros((max(1, host.nbytes),), mx.uint8)
        (addr,) = self._address([buf])
        self._driver.cuMemcpyHtoD_v2(addr, host.ctypes.data, host.nbytes)
        self._driver.cuStreamSynchronize(None)        # the copy has landed before MLX reads it
        return buf[:host.nbytes].reshape(host.shape)


def load() -> CudaUpload | None:
    """The upload if MLX runs on CUDA, the driver calls work and a probe comes back byte for byte
    (from an ordinary and from a page-locked buffer); else None (the caller keeps `mx.array`)."""
    if not on_cuda():
        return None
    try:
        mx.eval(mx.zeros(1) + 1)                   # MLX's context is current on this thread from here
        up = CudaUpload(Driver())
        probe = np.random.default_rng(0).integers(0, 256, (37, 1001, 3), dtype=np.uint8)
        pinned = up.host_buffer(probe.shape)
        pinned[...] = probe[::-1]
        for host in (probe, pinned):
            got = up(host)
            if got.dtype != mx.uint8 or tuple(got.shape) != host.shape or not np.array_equal(np.array(got), host):
                # (a kernel handed a copy of the buffer, not the buffer itself, would show as zeros)
                log.warning("CUDA upload probe got other bytes back; using mx.array")
                return None
        return up
    except Exception as exc:       # no libcuda, no NVRTC, an old driver, ...
        log.warning("CUDA upload unavailable (%s: %s); using mx.array", type(exc).__name__, exc)
        return None
