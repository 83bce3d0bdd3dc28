"""What the tests of the optional C extensions (setup.py) share."""
import shutil
import sysconfig

import pytest


def skip_without_c_compiler() -> None:
    """Skip where the install had no C compiler to build the extensions with (setup.py then leaves
    them out, and their Python or NumPy twins run)."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) here")
