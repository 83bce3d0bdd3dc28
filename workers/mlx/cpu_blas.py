"""OpenBLAS for MLX's CPU matmuls on Linux. No MLX import here.

MLX's Linux CPU wheel (`mlx-cpu`) calls `cblas_sgemm` (and d/c) from the reference BLAS it
bundles, Netlib's unoptimized libblas: a 1024^3 float32 matmul took 268 ms on the 2-core CI box
against 8.5 ms through OpenBLAS (bench/RESULTS.md). `scipy-openblas32` (the OpenBLAS build that
numpy and scipy ship, in the `cpu` extra) has the fast routines, with the same C signatures, under
a `scipy_` prefix.

libmlx.so reaches the three routines through its PLT: each call jumps through a pointer in its
GOT, which the dynamic linker fills with the bundled library's function. This module reads the
slots' offsets from libmlx.so's dynamic relocations (R_X86_64_JUMP_SLOT / R_AARCH64_JUMP_SLOT),
checks that each slot holds what the linker put there, and writes the OpenBLAS function's address
instead. Nothing is compiled and the order of imports does not matter (mlx.core may already be
loaded). Where anything is unexpected (no scipy-openblas32, another ELF layout, a slot holding
something else), nothing is written and the bundled BLAS answers, with the reason in the log;
GROUNDING_REFERENCE_BLAS=1 keeps it on purpose. (An earlier version compiled a forwarding shim with
the system's C compiler, so that installs without one, such as slim container images, stayed
~30x slower.)
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import mmap
import os
import struct
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ROUTINES = ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm")
_JUMP_SLOT = {62: 7, 183: 1026}        # e_machine -> its JUMP_SLOT relocation type (x86-64, AArch64)
_RTLD_DI_LINKMAP = 2

_loaded: str | None = None


def loaded() -> str | None:
    """The OpenBLAS library's path where MLX's CPU gemm calls go to it in this process, else None."""
    return _loaded


def use_openblas() -> str | None:
    """Route MLX's CPU gemm calls to OpenBLAS -> the OpenBLAS library's path, or None where they
    stay on the bundled reference BLAS (the reason logged). Idempotent."""
    global _loaded
    if _loaded or sys.platform != "linux" or os.environ.get("GROUNDING_REFERENCE_BLAS") == "1":
        return _loaded
    try:
        import scipy_openblas32
    except ImportError:
        return None                    # not a CPU install (the `cpu` extra brings it)
    libmlx = mlx_library()
    if libmlx is None:
        return None
    try:
        openblas_path = str(Path(scipy_openblas32.get_lib_dir()) / f"lib{scipy_openblas32.get_library()}.so")
        openblas = ctypes.CDLL(openblas_path)
        mlx = ctypes.CDLL(str(libmlx))      # the same copy mlx.core uses, loaded now or later
        base = load_base(mlx)
        plt = (base, base + libmlx.stat().st_size)
        # every slot checked before any is written: all three routed, or none
        writes = [(*_checked_slot(base + offset, _address(mlx, name), plt), _address(openblas, f"scipy_{name}"))
                  for name, offset in jump_slots(libmlx, ROUTINES).items()]
        for slot, perms, target in writes:
            _write(slot, perms, target)
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("MLX's CPU matmuls stay on its bundled reference BLAS, ~30x slower than OpenBLAS "
                    "(%s: %s)", type(exc).__name__, exc)
        return None
    _loaded = openblas_path
    return _loaded


def mlx_library() -> Path | None:
    """libmlx.so of the installed mlx package, found without importing it (None: not there)."""
    spec = importlib.util.find_spec("mlx")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "lib" / "libmlx.so"
        if path.is_file():
            return path
    return None


def jump_slots(path: Path, names) -> dict[str, int]:
    """{symbol: offset of its GOT slot from the load base} for the PLT calls of `path` (a 64-bit
    little-endian ELF shared object) to `names`. Raises ValueError for anything else."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
        raise ValueError(f"{path.name} is not a 64-bit little-endian ELF file")
    (machine,) = struct.unpack_from("<H", data, 18)
    if machine not in _JUMP_SLOT:
        raise ValueError(f"{path.name}: ELF machine {machine} is not x86-64 or AArch64")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found: dict[str, int] = {}
    for sec in sections:
        if sec[1] != 4:                                   # SHT_RELA
            continue
        symtab = sections[sec[6]]
        strtab = sections[symtab[6]]
        for at in range(sec[4], sec[4] + sec[5], 24):
            r_offset, r_info, _ = struct.unpack_from("<QQq", data, at)
            if r_info & 0xFFFFFFFF != _JUMP_SLOT[machine]:
                continue
            (st_name,) = struct.unpack_from("<I", data, symtab[4] + (r_info >> 32) * 24)
            start = strtab[4] + st_name
            name = data[start:data.index(b"\0", start)].decode()
            if name in names:
                found[name] = r_offset
    missing = set(names) - set(found)
    if missing:
        raise ValueError(f"{path.name} has no PLT slot for {', '.join(sorted(missing))}")
    return found


class _LinkMap(ctypes.Structure):
    _fields_ = [("l_addr", ctypes.c_size_t), ("l_name", ctypes.c_char_p)]


def load_base(lib: ctypes.CDLL) -> int:
    """The address a loaded shared object's ELF addresses are offsets from (glibc's dlinfo)."""
    link_map = ctypes.POINTER(_LinkMap)()
    if ctypes.CDLL(None).dlinfo(ctypes.c_void_p(lib._handle), _RTLD_DI_LINKMAP, ctypes.byref(link_map)) != 0:
        raise OSError("dlinfo(RTLD_DI_LINKMAP) failed")
    return link_map.contents.l_addr


def _address(lib: ctypes.CDLL, name: str) -> int:
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


def _checked_slot(slot: int, bound: int, plt: tuple[int, int]) -> tuple[int, str]:
    """(`slot`, its page's "rwxp" flags) if the GOT slot there holds what the dynamic linker puts
    in it: the bound function, or, not yet bound (lazy binding), a stub inside the library's own
    PLT (`plt`); else ValueError."""
    perms = _permissions(slot)                           # mapped, or OSError rather than a crash
    now = ctypes.c_void_p.from_address(slot).value or 0
    if now != bound and not plt[0] <= now < plt[1]:
        raise ValueError(f"a GOT slot holds {now:#x}, neither the bound function nor a PLT stub")
    return slot, perms


def _write(slot: int, perms: str, target: int) -> None:
    """Store `target` in the GOT slot, through a read-only page (`perms`, as _checked_slot read
    them) if the library's RELRO made it one."""
    page = slot & ~(mmap.PAGESIZE - 1)
    read_only = perms[1] != "w"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if read_only and libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect of a read-only GOT page failed")
    ctypes.c_void_p.from_address(slot).value = target    # one aligned 8-byte store: a call sees old or new
    if read_only:
        libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ)


def _permissions(address: int) -> str:
    """The "rwxp" flags of the mapping that holds `address` in this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            lo, hi = (int(v, 16) for v in span.split("-"))
            if lo <= address < hi:
                return perms
    raise OSError(f"{address:#x} is not mapped")
