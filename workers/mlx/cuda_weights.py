"""A checkpoint's tensors read straight into device memory (MLX CUDA backend only).

Why: `mx.load` reads a safetensors file's tensors one after another on one thread. On an H200 host
the 2B's 4.5 GB took 1.7-1.9 s from the page cache, the 7B's 15.7 GB 5.6 s: over a third of a load
whose kernels are built. Four threads reading 64 MB runs took 0.5 s and 1.2 s, and 2.4-2.6 s
against 4.2-4.4 s for the 2B from the disk (bench/RESULTS.md, forty-first session).

How: MLX allocates each tensor's device buffer (`mx.zeros`), a kernel reads the buffers' addresses
(cuda_upload.Addresses), and THREADS threads take runs of the files' bytes in turn (up to CHUNK
bytes: many small tensors or a part of a large one), each read into a page-locked buffer of the
thread's own. Every tensor's part of it goes to the device with `cuMemcpyHtoD`, which from
page-locked memory runs at the bus's speed and returns when the bytes have landed, so the buffer
can take the next run. Each file's CHECKED smallest tensors are then compared with mx.load's.

Where MLX does not run on CUDA, the driver or a call fails, a tensor's dtype is not one MLX holds,
its size disagrees with its shape, or the comparison fails, `read` returns None and the caller uses
mx.load (which names the file in its error, if there is one).
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from workers.mlx.checkpoint import TensorInfo
from workers.mlx.cuda_driver import Driver
from workers.mlx.cuda_rotary import on_cuda
from workers.mlx.cuda_upload import Addresses

log = logging.getLogger(__name__)

CHUNK = 64 << 20     # bytes a thread reads at a time (its page-locked buffer's size)
THREADS = 4          # on the H200 host 4 read as fast as 8 (bench/RESULTS.md)
GAP = 1 << 20        # unwanted bytes between two wanted tensors are read rather than starting a new run
ADDRESS_WIDTH = 32   # buffers whose addresses one kernel reads
CHECKED = 3          # tensors per file compared with mx.load's

DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32, "I64": mx.int64, "I32": mx.int32,
          "I16": mx.int16, "I8": mx.int8, "U64": mx.uint64, "U32": mx.uint32, "U16": mx.uint16,
          "U8": mx.uint8, "BOOL": mx.bool_}


@dataclass(frozen=True)
class Run:
    """Bytes [start, end) of one file, read at once; `pieces` are (offset in the run, bytes,
    destination address) of the tensors' parts it holds."""
    path: Path
    start: int
    end: int
    pieces: tuple[tuple[int, int, int], ...]


def plan(tensors: Iterable[tuple[Path, int, int, int]], chunk: int = CHUNK, gap: int = GAP) -> list[Run]:
    """(file, start, end, destination address) per tensor -> runs of at most `chunk` bytes that
    hold every tensor's bytes once, in file order. A tensor larger than `chunk` spans runs."""
    by_file: dict[Path, list[tuple[int, int, int]]] = {}
    for path, start, end, dst in tensors:
        if end > start:
            by_file.setdefault(path, []).append((start, end, dst))
    runs = []
    for path, spans in by_file.items():
        start = end = None
        pieces: list[tuple[int, int, int]] = []
        for s, e, dst in sorted(spans):
            pos = s
            while pos < e:
                if start is None or pos > end + gap or pos >= start + chunk:
                    if pieces:
                        runs.append(Run(path, start, end, tuple(pieces)))
                    start, end, pieces = pos, pos, []
                take = min(e, start + chunk) - pos
                pieces.append((pos - start, take, dst + pos - s))
                pos += take
                end = max(end, pos)
        if pieces:
            runs.append(Run(path, start, end, tuple(pieces)))
    return runs


def execute(runs: list[Run], buffers: list[tuple[memoryview, int]], copy: Callable[[int, int, int], None],
            begin: Callable[[], None] = lambda: None) -> None:
    """Read every run on its own thread per buffer ((a writable memoryview, its address), each at
    least as long as the longest run) and `copy(destination, source address, bytes)` its pieces.
    `begin` runs first on each thread. Raises the first error any thread met (the rest stop)."""
    fds: dict[Path, int] = {}
    try:
        for path in {r.path for r in runs}:
            fds[path] = os.open(path, os.O_RDONLY)
        todo, lock, errors = iter(runs), threading.Lock(), []

        def work(view: memoryview, address: int) -> None:
            try:
                begin()
                while not errors:
                    with lock:
                        run = next(todo, None)
                    if run is None:
                        return
                    n, got = run.end - run.start, 0
                    while got < n:
                        k = os.preadv(fds[run.path], [view[got:n]], run.start + got)
                        if k <= 0:
                            raise OSError(f"{run.path.name}: ends before byte {run.start + n}")
                        got += k
                    for offset, size, dst in run.pieces:
                        copy(dst, address + offset, size)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=buf, name=f"weights-{i}") for i, buf in enumerate(buffers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    finally:
        for fd in fds.values():
            os.close(fd)


def read(tensors: dict[str, TensorInfo], threads: int = THREADS, chunk: int = CHUNK) -> dict[str, mx.array] | None:
    """name -> MLX array on the device holding the tensor's bytes as stored, for every tensor of
    `tensors` (header entries, workers/mlx/checkpoint.py); None where this way is unavailable."""
    if not on_cuda() or not tensors or not all(map(readable, tensors.values())):
        return None
    try:
        arrays = {name: mx.zeros(t.shape, DTYPES[t.dtype]) for name, t in tensors.items()}
        mx.eval(list(arrays.values()))          # MLX's context is current on this thread from here
        addresses = dict(zip(arrays, Addresses(ADDRESS_WIDTH)(list(arrays.values()))))
        driver = Driver()
        context = driver.context()
        runs = plan(((t.file, t.start, t.end, addresses[name]) for name, t in tensors.items()), chunk)
        size = max(r.end - r.start for r in runs) if runs else 1
        hosts = []
        try:
            for _ in range(max(1, min(threads, len(runs)))):
                p = ctypes.c_void_p()
                driver.cuMemHostAlloc(ctypes.byref(p), size, 0)
                hosts.append(p.value)
            execute(runs, [(memoryview((ctypes.c_uint8 * size).from_address(p)).cast("B"), p) for p in hosts],
                    driver.cuMemcpyHtoD_v2, lambda: driver.cuCtxSetCurrent(context))
            driver.cuStreamSynchronize(None)
        finally:
            for p in hosts:
                driver.cuMemFreeHost(p)
        if not _agrees_with_mx_load(tensors, arrays):
            log.warning("a checkpoint tensor read to the device differs from mx.load's; using mx.load")
            return None
        return arrays
    except Exception as exc:      # no libcuda, out of page-locked memory, an unreadable file, ...
        log.warning("reading the checkpoint straight to the device failed (%s: %s); using mx.load",
                    type(exc).__name__, exc)
        return None


def readable(t: TensorInfo) -> bool:
    """Whether a tensor's bytes can go into an MLX array as they are: a dtype MLX holds, and as many
    bytes as its shape says (mx.load reports a file where they disagree)."""
    dtype = DTYPES.get(t.dtype)
    return dtype is not None and t.end - t.start == math.prod(t.shape) * dtype.size


def _agrees_with_mx_load(tensors: dict[str, TensorInfo], arrays: dict[str, mx.array]) -> bool:
    """Each file's CHECKED smallest non-empty tensors against mx.load's (which reads only those).
    Several, so that a tensor of zeros cannot hide buffers that were never written."""
    by_file: dict[Path, list[tuple[int, str]]] = {}
    for name, t in tensors.items():
        if t.end > t.start:
            by_file.setdefault(t.file, []).append((t.end - t.start, name))
    for path, sized in by_file.items():
        stored = mx.load(str(path))
        if not all(mx.array_equal(stored[name], arrays[name]).item() for _, name in sorted(sized)[:CHECKED]):
            return False
    return True
