"""The compiled parts, which pyproject.toml cannot yet declare without an experimental table.

workers/png_unfilter.c undoes PNG row filters on several threads (workers/png_inflate.py says why);
workers/keep_awake.c spins at idle priority to keep CPUs awake (workers/keep_awake.py), on Linux
only; workers/regions.c finds GUI-Actor's regions in an attention map (workers/families/gui_actor.py
says why). All are built against Python's stable ABI, so one build serves every Python from 3.11 on.
Optional: without a C compiler the install goes on, libpng unfilters PNGs as before, NumPy finds
the regions, and a model's `keep_cpus_awake_ms` stays off, with a warning in its worker's log.
"""
import sys

from setuptools import Extension, setup

LINUX = sys.platform.startswith("linux")


def extension(name: str, source: str, flags: tuple[str, ...] = (), **kw) -> Extension:
    return Extension(name, [source], define_macros=[("Py_LIMITED_API", "0x030B0000")], py_limited_api=True,
                     extra_compile_args=["-O3", "-std=gnu11", *flags], depends=["workers/spin_wait.h", "workers/deflate_blocks.h"], optional=True, **kw)


setup(ext_modules=[
    # dlopen, to bind imagecodecs' zlib-ng and libdeflate (in libc itself from glibc 2.34)
    extension("workers._png_unfilter", "workers/png_unfilter.c", libraries=["dl"] if LINUX else []),
    # its sums as NumPy rounds them: no product fused into its sum (aarch64 compilers would)
    extension("workers._regions", "workers/regions.c", flags=("-ffp-contract=off",)),
    *([extension("workers._keep_awake", "workers/keep_awake.c")] if LINUX else []),
])
