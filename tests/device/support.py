"""Device-aware pieces of the device tests: pairs moved to a device, a training step whose upstream
gradient lives on the output's device, and the float64-truth comparison the CPU tests use."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tests._util import GRAD_TOLERANCE, TOLERANCE, assert_close, build_pair, random_input, rel_err
from tests.block.grid import BlockCase

# The paths a CUDA input may take (the *_cpu paths are the CPU kernels).
CUDA_PATHS = {"module", "train_gram", "train_depthwise", "folded", "fused"}


def device_pair(case: BlockCase, dtype: torch.dtype, device: str) -> tuple[nn.Module, nn.Module]:
    """(ours, oracle) on `device` in `dtype`, with the same weights and random BN statistics."""
    ours, reference = build_pair("MobileOneBlock", dtype=dtype, **case.kwargs())
    return ours.to(device), reference.to(device)


def device_input(case: BlockCase, dtype: torch.dtype, device: str, seed: int = 1) -> torch.Tensor:
    return case.input(dtype, seed).to(device)


def train_step(model: nn.Module, x: torch.Tensor, seed: int = 2) -> dict[str, torch.Tensor]:
    """One train-mode forward/backward: output, input grad and parameter grads by name."""
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    upstream = random_input(out.shape, out.dtype, seed).to(out.device)
    (out * upstream).sum().backward()
    result = {"output": out.detach(), "input.grad": x.grad}
    for name, param in model.named_parameters():
        result[f"{name}.grad"] = param.grad
    return result


def assert_matches_truth(got: dict, expected: dict, truth: dict | None, dtype: torch.dtype) -> None:
    """float64: ours against the oracle at the float64 bounds. float32: ours against a float64 run of
    the oracle, within the float32 bound or 4x the float32 oracle's own error, as on the CPU."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        bound = TOLERANCE[dtype] if key == "output" else GRAD_TOLERANCE[dtype]
        assert got[key] is not None, f"{key} is None"
        assert got[key].device == value.device, f"{key} on {got[key].device}, not {value.device}"
        if truth is None:
            assert_close(got[key], value, bound, key)
        else:
            own = rel_err(value, truth[key])
            assert_close(got[key], truth[key], max(bound, 4 * own), f"{key} (oracle's own error {own:.1e})")


def float64_twin(reference: nn.Module, dtype: torch.dtype) -> nn.Module | None:
    """The float64 copy of a float32 oracle (the truth), None for a float64 one."""
    return copy.deepcopy(reference).double() if dtype == torch.float32 else None


def assert_buffers_match(ours: nn.Module, reference: nn.Module, dtype: torch.dtype, truth=None) -> None:
    """Running statistics against the oracle's; with a float64 `truth` twin (float32 runs) against its,
    within the bound or 4x the float32 oracle's own error."""
    got, expected = dict(ours.named_buffers()), dict(reference.named_buffers())
    exact = dict(truth.named_buffers()) if truth is not None else None
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].device == value.device, key
        if key.endswith("num_batches_tracked"):
            assert torch.equal(got[key], value), f"{key}: {got[key]} != {value}"
        elif exact is None:
            assert_close(got[key], value, TOLERANCE[dtype], key)
        else:
            own = rel_err(value, exact[key])
            assert_close(
                got[key], exact[key], max(TOLERANCE[dtype], 4 * own), f"{key} (oracle's own {own:.1e})"
            )
