"""The training step of every block kind against the oracle: output, gradients and running
statistics on every path (pointwise Gram, depthwise CPU kernel and recompute, the module path)."""

import mobileone_rs
import pytest
import torch
from torch import nn

from tests import oracle
from tests._util import TOLERANCE, assert_close, build_pair, eval_output, random_input, train_step
from tests.block.grid import BN_CASES, GRID, assert_train_step_matches, pair


@pytest.mark.parametrize("case", GRID, ids=str)
def test_train_step_matches_oracle(case, dtype):
    ours, reference = pair(case, dtype)
    assert_train_step_matches(ours, reference, case.input(dtype), dtype)


@pytest.mark.parametrize("case", BN_CASES, ids=str)
@pytest.mark.parametrize("eps, momentum", [(1e-5, None), (1e-3, 0.03)], ids=["cumulative", "yolov9"])
def test_train_steps_with_bn_hyperparameters_match_oracle(case, dtype, eps, momentum):
    ours, reference = pair(case, dtype)
    for model in (ours, reference):
        oracle.set_bn_hyperparameters(model, eps, momentum)
    assert_train_step_matches(ours, reference, case.input(dtype), dtype, steps=2)
    assert_close(
        eval_output(ours, case.input(dtype, 3)),
        eval_output(reference, case.input(dtype, 3)),
        TOLERANCE[dtype],
        "eval output after steps",
    )


@pytest.mark.parametrize("case", BN_CASES, ids=str)
def test_train_step_storing_branch_outputs_matches_oracle(case, dtype):
    # cpu_kernel=False with low_memory=False (the default): depthwise blocks run their branches (and
    # store their outputs) instead of recomputing them in the backward.
    ours, reference = pair(case, dtype)
    ours.cpu_kernel = False
    assert_train_step_matches(ours, reference, case.input(dtype), dtype, steps=2)


@pytest.fixture
def branch_path_on_cpu():
    """Depthwise training steps run the branch-recomputing path CUDA tensors take, instead of
    the CPU patch-moment kernel."""
    with mobileone_rs.fast_paths(cpu_kernel=False, low_memory=True):
        yield


@pytest.mark.parametrize("case", BN_CASES, ids=str)
def test_train_step_on_the_cuda_path_matches_oracle(case, dtype, branch_path_on_cpu):
    ours, reference = pair(case, dtype)
    if case.groups == case.in_channels == case.out_channels and case.groups > 1:
        ours.train()
        assert ours.forward_path(case.input(dtype)) == "train_depthwise"
    assert_train_step_matches(ours, reference, case.input(dtype), dtype, steps=2)


class _Subclass(torch.Tensor):
    """A tensor subclass: only the module path models it (its ops may be overridden)."""


def test_train_step_on_a_tensor_subclass_matches_oracle():
    case = next(c for c in BN_CASES if c.groups == c.in_channels and c.kernel_size > 1)
    ours, reference = pair(case, torch.float64)
    x = case.input(torch.float64)
    ours.train()
    assert ours.forward_path(x.as_subclass(_Subclass)) == "module"
    got, expected = train_step(ours, x.as_subclass(_Subclass)), train_step(reference, x)
    for key, value in expected.items():
        assert_close(got[key], value, TOLERANCE[torch.float64], key)


class _CustomNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass: not the plain class, so the block must call it as a module."""


@pytest.mark.parametrize(
    "make_norm",
    [
        lambda c: nn.BatchNorm2d(c, track_running_stats=False),
        lambda c: _CustomNorm(c),
    ],
    ids=["no-running-stats", "subclass"],
)
@pytest.mark.parametrize("kernel_size, groups", [(3, 16), (1, 1)], ids=["depthwise", "pointwise"])
def test_non_plain_batchnorm_runs_the_module_path(make_norm, kernel_size, groups):
    ours, reference = build_pair(
        "MobileOneBlock", 16, 16, kernel_size, padding=kernel_size // 2, groups=groups, num_conv_branches=2
    )
    for model in (ours, reference):
        model.rbr_conv[1].bn = make_norm(16).double()
    x = random_input((2, 16, 7, 6))
    got, expected = train_step(ours, x), train_step(reference, x)
    for key, value in expected.items():
        assert_close(got[key], value, TOLERANCE[torch.float64], key)
    for model in (ours, reference):
        model.eval()
    with torch.no_grad():
        assert_close(ours(x), reference(x), TOLERANCE[torch.float64], "eval")


@pytest.mark.parametrize("kernel_size, groups", [(3, 8), (1, 1)], ids=["depthwise", "pointwise"])
def test_train_step_with_a_different_eps_per_branch_matches_oracle(kernel_size, groups):
    ours, reference = build_pair(
        "MobileOneBlock", 8, 8, kernel_size, padding=kernel_size // 2, groups=groups, num_conv_branches=3
    )
    for model in (ours, reference):
        for i, bn in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.eps = 10.0 ** -(i + 1)
    assert_train_step_matches(ours, reference, random_input((2, 8, 7, 9)), torch.float64, steps=2)
