"""``import mobileone_rs`` accepts the tested torch versions and refuses any other with a message.

The torch version is faked in a subprocess (``torch.__version__`` set before the import), so the
check runs without installing another torch.
"""

from __future__ import annotations

import subprocess
import sys

import mobileone_rs
import pytest

PROBE = "import torch; torch.__version__ = {version!r}; import mobileone_rs; print('imported')"


def import_under(version: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE.format(version=version)], check=False, capture_output=True, text=True,
        timeout=300,
    )


@pytest.mark.parametrize("version", ["2.16.0", "2.12.1+cu128", "3.0.0.dev20270101"])
def test_an_untested_torch_is_refused_with_the_supported_set(version):
    result = import_under(version)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"ImportError: mobileone_rs supports torch 2.13, 2.14, 2.15 (its extension is built against libtorch "
        f"2.13.0) but torch {version} is installed: pip install 'torch>=2.13,<2.16'"
    )


def test_a_tested_torch_imports():
    assert import_under("2.15.0+cu130").stdout.strip() == "imported"


def test_the_wheel_metadata_never_forces_a_torch_downgrade():
    """No upper bound on torch in the requirement: pip would meet it by downgrading a newer torch."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        torch_requirements = [r for r in requires("mobileone-rs") or [] if r.startswith("torch")]
    except PackageNotFoundError:
        pytest.skip("mobileone-rs is not installed as a distribution")
    assert torch_requirements == ["torch>=2.13"]
    assert mobileone_rs.TORCH_SUPPORTED[0] == "2.13"
