"""What the tests of the optional native parts share: the C extensions (setup.py) and NVRTC."""
import shutil
import sysconfig

import pytest


def skip_without_c_compiler() -> None:
    """Skip where the install had no C compiler to build the extensions with (setup.py then leaves
    them out, and their Python or NumPy twins run)."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) here")


def skip_without_nvrtc() -> None:
    """Skip where NVRTC is not installed: the test extra installs nvidia-cuda-nvrtc on x86-64
    Linux; NVIDIA ships none for macOS."""
    from workers.mlx import nvrtc
    try:
        nvrtc._library()
    except nvrtc.NvrtcError:
        pytest.skip("NVRTC is not installed on this platform")
