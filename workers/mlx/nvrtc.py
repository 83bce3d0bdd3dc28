"""CUDA C++ to a cubin for one GPU architecture, with NVRTC through ctypes (MLX CUDA backend only),
kept on disk.

Why not `mx.fast.cuda_kernel`: MLX compiles those for `sm_XY`, and Hopper's warpgroup instructions
(`wgmma`) exist only for the architecture-specific target `sm_90a`; and MLX 0.32.4 builds them again
in every process (workers/mlx/cuda_kernel.py). `mx.fast.precompiled_cuda_kernel` runs a cubin built
elsewhere; this builds it, with the NVRTC library that MLX's CUDA build itself loads (the
`nvidia-cuda-nvrtc` wheel, or the CUDA toolkit's), and keeps it for the next process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

_SONAMES = ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so")


class NvrtcError(RuntimeError):
    """NVRTC is missing, or the source did not compile (the message carries its log)."""


def _library() -> ctypes.CDLL:
    """The loaded NVRTC if the process has one (MLX's), else the first found on the usual paths."""
    names = list(_SONAMES)
    for site in sys.path:                           # pip's nvidia-cuda-nvrtc wheel
        names += sorted(glob.glob(os.path.join(site, "nvidia", "cu1*", "lib", "libnvrtc.so.1*")), reverse=True)
        names += sorted(glob.glob(os.path.join(site, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.1*")), reverse=True)
    found = ctypes.util.find_library("nvrtc")
    if found:
        names.append(found)
    for name in names:
        if "builtins" in name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise NvrtcError("libnvrtc not found")


def cache_dir() -> Path:
    """Where builds are kept: the kernel cache folder, which MLX keeps its own kernels in
    (`MLX_PTX_CACHE_DIR`; the worker points it into `cache_dir`), else one in the temp folder."""
    return Path(os.environ.get("MLX_PTX_CACHE_DIR") or Path(tempfile.gettempdir()) / "gui-grounding-kernels")


@functools.cache
def _version() -> tuple[int, int] | None:
    """NVRTC's (major, minor), for the builds' keys; None where it cannot be had (the build then
    fails with its own error)."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    try:
        if _library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) != 0:
            return None
    except NvrtcError:
        return None
    return major.value, minor.value


def cached_cubin(source: str, arch: str, options: list[str] = ()) -> tuple[bytes, str]:
    """`compile_cubin`, kept on disk under a digest of the source, the architecture, the options
    and NVRTC's version: built once per machine, read back (~1 ms) by every later process. Where
    the folder cannot be written, it is built each time."""
    key = json.dumps([source, arch, list(options), _version()])
    path = cache_dir() / f"nvrtc-{hashlib.sha256(key.encode()).hexdigest()[:32]}.cubin"
    try:
        cubin = path.read_bytes()
        if cubin[:4] == b"\x7fELF":
            return cubin, path.with_suffix(".log").read_text()
    except OSError:
        pass
    cubin, log = compile_cubin(source, arch, options)
    try:                                   # written whole, then renamed: a reader never sees half
        path.parent.mkdir(parents=True, exist_ok=True)
        for suffix, data in ((".log", log.encode()), (".cubin", cubin)):
            tmp = path.with_suffix(f"{suffix}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path.with_suffix(suffix))
    except OSError:
        pass
    return cubin, log


def compile_cubin(source: str, arch: str, options: list[str] = ()) -> tuple[bytes, str]:
    """`source` compiled for `arch` (e.g. "sm_90a") -> (cubin, NVRTC's log); NvrtcError on failure."""
    lib = _library()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None) != 0:
        raise NvrtcError("nvrtcCreateProgram failed")
    try:
        opts = [f"--gpu-architecture={arch}", "-std=c++17", *options]
        argv = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        status = lib.nvrtcCompileProgram(prog, len(opts), argv)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value + 1)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        if status != 0:
            raise NvrtcError(f"compile failed: {log}")
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        if lib.nvrtcGetCUBIN(prog, cubin) != 0:
            raise NvrtcError("nvrtcGetCUBIN failed")
        return cubin.raw, log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
