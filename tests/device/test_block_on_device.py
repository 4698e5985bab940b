"""MobileOneBlock on a device (``--device cuda``; cpu by default) against the oracle: training steps
(output, gradients, running statistics), eval and fused forwards, fused == unfused, and the path each
takes, in float64 and float32 against the float64 oracle, by the same rules as the CPU tests."""

from __future__ import annotations

import pytest
import torch

from tests._util import TOLERANCE, assert_close, rel_err
from tests.block.grid import DILATED, GRID
from tests.device.support import (
    CUDA_PATHS,
    assert_buffers_match,
    assert_matches_truth,
    device_input,
    device_pair,
    float64_twin,
    train_step,
)

CASES = GRID + DILATED


def _eval(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _check_path(model, x, device, record_property, state):
    path = model.forward_path(x)
    record_property(f"forward_path[{state}]", path)
    if device.startswith("cuda"):
        assert path in CUDA_PATHS, f"{state}: a CUDA input took {path!r}"
    return path


@pytest.mark.parametrize("case", CASES, ids=str)
def test_training_steps_match_oracle(case, dtype, device, record_property):
    """Two steps: output, input and parameter gradients, then the running statistics they updated."""
    ours, reference = device_pair(case, dtype, device)
    truth = float64_twin(reference, dtype)
    x = device_input(case, dtype, device)
    ours.train()
    _check_path(ours, x, device, record_property, "train")
    for _ in range(2):
        got, expected = train_step(ours, x), train_step(reference, x)
        exact = train_step(truth, x.double()) if truth is not None else None
        assert_matches_truth(got, expected, exact, dtype)
    assert_buffers_match(ours, reference, dtype, truth)


@pytest.mark.parametrize("state", ["eval", "fused"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_inference_matches_oracle(case, state, dtype, device, record_property):
    ours, reference = device_pair(case, dtype, device)
    if state == "fused":
        ours.reparameterize()
        reference.reparameterize()
    x = device_input(case, dtype, device, seed=3)
    ours.eval()
    _check_path(ours, x, device, record_property, state)
    got, expected = _eval(ours, x), _eval(reference, x)
    assert got.device == x.device and got.dtype == dtype
    truth = float64_twin(reference, dtype)
    if truth is None:
        assert_close(got, expected, TOLERANCE[dtype], state)
    else:
        exact = _eval(truth, x.double())
        own = rel_err(expected, exact)
        assert_close(got, exact, max(TOLERANCE[dtype], 4 * own), f"{state} (oracle's own error {own:.1e})")


@pytest.mark.parametrize("case", CASES[::3], ids=str)
def test_fused_block_equals_unfused(case, dtype, device):
    ours, _ = device_pair(case, dtype, device)
    x = device_input(case, dtype, device, seed=4)
    unfused = _eval(ours, x)
    ours.reparameterize()
    assert ours.reparam_conv.weight.device == x.device
    assert_close(_eval(ours, x), unfused, TOLERANCE[dtype], "fused vs unfused")
