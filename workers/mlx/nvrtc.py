"""CUDA C++ to a cubin for one GPU architecture, with NVRTC through ctypes (MLX CUDA backend only).

Why not `mx.fast.cuda_kernel`: MLX compiles those for `sm_XY`, and Hopper's warpgroup instructions
(`wgmma`) exist only for the architecture-specific target `sm_90a`. `mx.fast.precompiled_cuda_kernel`
runs a cubin built elsewhere; this builds it, with the NVRTC library that MLX's CUDA build itself
loads (the `nvidia-cuda-nvrtc` wheel, or the CUDA toolkit's).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

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
