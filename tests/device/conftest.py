"""The device the device-generic tests run on: ``pytest tests/device --device cuda`` (default cpu;
``--device cpu,cuda`` runs both). Every test taking a ``device`` argument is parametrized over them."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device(s) for tests/device, comma-separated: cpu, cuda")


def _devices(config) -> list[str]:
    try:
        value = config.getoption("--device")
    except ValueError:  # the option is registered only when tests/device is named on the command line
        value = "cpu"
    return [d.strip() for d in value.split(",") if d.strip()]


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", _devices(metafunc.config))


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 convolutions and matmuls in true float32 (no TF32 on CUDA), on both sides: the bounds
    are float32's. Restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def pytest_collection_modifyitems(config, items):
    if "cuda" in ",".join(_devices(config)) and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="--device cuda but torch.cuda.is_available() is False")
        for item in items:
            if "cuda" in item.name:
                item.add_marker(skip)
