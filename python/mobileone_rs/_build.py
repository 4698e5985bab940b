"""Loads the native extension and refuses a torch its build does not serve.

The extension links the installed torch's libtorch at import. Each build is compiled against one
libtorch (tch binds one) and serves the torch versions its build was tested with (torch-versions.txt,
README "Supported torch versions"); the native module says which, so nothing here is hand-edited.
"""

from __future__ import annotations

import importlib
import re
import sys
from types import ModuleType

import torch


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _other_build(native: ModuleType, minor: str) -> str:
    """', or the wheel built for ...' when another build serves torch `minor`, else ''."""
    build = native.TORCH_BUILDS.get(minor)
    if build is None:
        return ""
    serves = f", which serves torch {minor}" if build != minor else ""
    return f", or install mobileone-rs built for torch {build}{serves} (make wheel TORCH={build})"


def load_native() -> ModuleType:
    """mobileone_rs._native, after checking that the installed torch is one this build serves."""
    try:
        native = importlib.import_module("mobileone_rs._native")  # torch, imported above, loads libtorch
    except ImportError as err:
        if "undefined symbol" not in str(err):
            raise
        symbol = re.search(r"undefined symbol: (\S+)", str(err))
        if symbol and re.match(r"_?Py", symbol.group(1)):
            raise ImportError(
                f"mobileone_rs's extension needs {symbol.group(1)} from CPython, which Python "
                f"{sys.version.split()[0]} does not have: the torch bindings it links (torch-sys) use "
                "CPython internals beyond the stable ABI; use Python 3.10 to 3.12 (the versions it is "
                "tested with)"
            ) from err
        raise ImportError(
            f"mobileone_rs's extension does not link against torch {torch.__version__}'s libtorch ({err}): "
            "it was built for another torch; install mobileone-rs built for torch "
            f"{_minor(torch.__version__)} "
            f"(make wheel TORCH={_minor(torch.__version__)})"
        ) from err
    if _minor(torch.__version__) not in native.TORCH_SUPPORTED:
        raise ImportError(
            f"mobileone_rs supports torch {', '.join(native.TORCH_SUPPORTED)} (its extension is "
            "built against "
            f"libtorch {native.TORCH_BUILT_FOR}) but torch {torch.__version__} is installed: pip install "
            f"'{native.TORCH_REQUIREMENT}'{_other_build(native, _minor(torch.__version__))}"
        )
    return native


_native = load_native()  # the checked extension module, which __init__ takes from here
TORCH_BUILT_FOR: str = _native.TORCH_BUILT_FOR
TORCH_SUPPORTED: tuple[str, ...] = _native.TORCH_SUPPORTED
TORCH_REQUIREMENT: str = _native.TORCH_REQUIREMENT
