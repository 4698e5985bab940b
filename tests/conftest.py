"""Shared fixtures: a fixed seed for every test and the float dtypes under test."""

import pytest
import torch


def pytest_configure(config):
    # The tensors here are tiny; a second intra-op thread gains nothing and, when another
    # process (a cargo build) holds the cores, OpenMP spin-waiting makes runs 50x slower.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state and default dtype."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(params=[torch.float64, torch.float32], ids=["f64", "f32"])
def dtype(request) -> torch.dtype:
    return request.param
