"""``import mobileone_rs`` accepts the torch versions its build serves and refuses any other, naming the
build for it; the build's torch facts come from torch-versions.txt through build.rs.

The torch version is faked in a subprocess (``torch.__version__`` set before the import), so the
check runs without installing another torch. Every assertion holds for whichever build is installed
(the matrix runs this suite under each).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mobileone_rs
import pytest
import torch
from mobileone_rs import _native

PROBE = "import torch; torch.__version__ = {version!r}; import mobileone_rs; print('imported')"
TABLE = Path(__file__).resolve().parents[2] / "torch-versions.txt"


def table() -> dict[str, str]:
    """torch minor -> the torch whose build serves it, read from torch-versions.txt."""
    rows = [line.split() for line in TABLE.read_text().splitlines() if line[:1].isdigit()]
    return {row[0]: row[1] for row in rows}


def import_under(version: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE.format(version=version)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def refusal(version: str, hint: str = "") -> str:
    supported = ", ".join(mobileone_rs.TORCH_SUPPORTED)
    return (
        f"ImportError: mobileone_rs supports torch {supported} (its extension is built against libtorch "
        f"{mobileone_rs.TORCH_BUILT_FOR}) but torch {version} is installed: pip install "
        f"'{mobileone_rs.TORCH_REQUIREMENT}'{hint}"
    )


def last_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("version", ["2.16.0", "2.8.0+cu126", "3.0.0.dev20270101"])
def test_a_torch_without_a_build_is_refused_with_the_supported_set(version):
    assert last_line(import_under(version)) == refusal(version)


def test_a_torch_another_build_serves_is_refused_naming_that_build():
    minor, build = next((t, b) for t, b in table().items() if t not in mobileone_rs.TORCH_SUPPORTED)
    version = f"{minor}.1+cu128"
    serves = f", which serves torch {minor}" if build != minor else ""
    hint = f", or install mobileone-rs built for torch {build}{serves} (make wheel TORCH={build})"
    assert last_line(import_under(version)) == refusal(version, hint)


def test_every_supported_torch_imports():
    for minor in mobileone_rs.TORCH_SUPPORTED:
        assert import_under(f"{minor}.0+cu130").stdout.strip() == "imported", minor


def test_the_build_facts_are_the_table_rows():
    builds = table()
    built_for = ".".join(mobileone_rs.TORCH_BUILT_FOR.split(".")[:2])
    assert builds[built_for] == built_for, "the libtorch built against is a build row"
    assert mobileone_rs.TORCH_SUPPORTED == tuple(t for t, b in builds.items() if b == built_for)
    assert _native.TORCH_BUILDS == builds
    first, last = mobileone_rs.TORCH_SUPPORTED[0], mobileone_rs.TORCH_SUPPORTED[-1]
    major, minor = last.split(".")
    assert mobileone_rs.TORCH_REQUIREMENT == f"torch>={first},<{major}.{int(minor) + 1}"
    assert ".".join(torch.__version__.split(".")[:2]) in mobileone_rs.TORCH_SUPPORTED


def test_the_wheel_requires_the_torch_range_its_build_serves():
    """The installed distribution's requirement is the build's tested range (pyproject.toml, rewritten
    per torch by tools/torch_build.sh), so pip never pairs a build with a torch it was not tested with."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        torch_requirements = [r for r in requires("mobileone-rs") or [] if r.startswith("torch")]
    except PackageNotFoundError:
        pytest.skip("mobileone-rs is not installed as a distribution")
    assert [r.replace(" ", "") for r in torch_requirements] == [mobileone_rs.TORCH_REQUIREMENT]


LINK_PROBE = """
import importlib, torch
real = importlib.import_module
def fake(name, *a):
    if name == "mobileone_rs._native":
        raise ImportError("/x/_native.abi3.so: undefined symbol: {symbol}")
    return real(name, *a)
importlib.import_module = fake
import mobileone_rs
"""


@pytest.mark.parametrize(
    "symbol, says",
    [
        ("_PyThreadState_UncheckedGet", "needs _PyThreadState_UncheckedGet from CPython, which Python"),
        ("_ZN2at4_ops3addEv", "does not link against torch"),
    ],
    ids=["cpython-symbol", "libtorch-symbol"],
)
def test_a_missing_symbol_names_python_or_torch_as_what_differs(symbol, says):
    # CPython 3.13 removed _PyThreadState_UncheckedGet, which the torch bindings use: not a torch mismatch
    result = subprocess.run(
        [sys.executable, "-c", LINK_PROBE.format(symbol=symbol)], check=False, capture_output=True, text=True
    )
    assert says in last_line(result), last_line(result)
