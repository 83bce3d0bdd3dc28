"""The one compiled part, which pyproject.toml cannot yet declare without an experimental table.

workers/png_unfilter.c undoes PNG row filters on several threads (workers/png_inflate.py says why),
built against Python's stable ABI, so one build serves every Python from 3.11 on. Optional: without
a C compiler the install goes on, and libpng unfilters PNGs as before.
"""
import sys

from setuptools import Extension, setup

setup(ext_modules=[Extension("workers._png_unfilter", ["workers/png_unfilter.c"],
                             define_macros=[("Py_LIMITED_API", "0x030B0000")], py_limited_api=True,
                             extra_compile_args=["-O3", "-std=gnu11"], optional=True,
                             # dlopen, to bind imagecodecs' zlib-ng (in libc itself from glibc 2.34)
                             libraries=["dl"] if sys.platform.startswith("linux") else [])])
