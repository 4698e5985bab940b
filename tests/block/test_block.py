"""MobileOneBlock and SEBlock against the oracle: train step, running stats, eval, fused."""

import copy
import itertools
from dataclasses import dataclass

import mobileone_rs
import pytest
import torch
from torch import nn

from tests import oracle
from tests._util import (
    GRAD_TOLERANCE,
    TOLERANCE,
    assert_close,
    build_pair,
    eval_output,
    fused_copy_of,
    random_input,
    rel_err,
    train_step,
)


@dataclass(frozen=True)
class BlockCase:
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    groups: int
    use_se: bool
    num_conv_branches: int
    input_shape: tuple  # (batch, height, width)
    dilation: int = 1

    def kwargs(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.dilation * (self.kernel_size // 2),
            "dilation": self.dilation,
            "groups": self.groups,
            "use_se": self.use_se,
            "num_conv_branches": self.num_conv_branches,
        }

    def input(self, dtype, seed: int = 1) -> torch.Tensor:
        batch, height, width = self.input_shape
        return random_input((batch, self.in_channels, height, width), dtype, seed)

    def __str__(self) -> str:
        b, h, w = self.input_shape
        return (
            f"{self.in_channels}to{self.out_channels}-k{self.kernel_size}-s{self.stride}"
            f"-g{self.groups}-br{self.num_conv_branches}{'-se' if self.use_se else ''}"
            f"{f'-d{self.dilation}' if self.dilation > 1 else ''}-{b}x{h}x{w}"
        )


# (in, out, groups, use_se): in == out, in != out, dense, grouped, depthwise; SE needs out >= 16.
CHANNEL_VARIANTS = [
    (4, 4, 1, False),
    (4, 6, 1, False),
    (4, 4, 2, False),
    (4, 4, 4, False),
    (16, 16, 1, True),
    (16, 32, 2, True),
    (16, 16, 16, True),
]
INPUT_SHAPES = [(1, 7, 10), (2, 9, 9)]


def _grid() -> list[BlockCase]:
    cases = []
    axes = itertools.product([1, 3, 5], [1, 2], [1, 4], CHANNEL_VARIANTS)
    # Seven channel variants (odd) alternate with two shapes, so every variant meets both.
    for index, (kernel, stride, branches, (cin, cout, groups, se)) in enumerate(axes):
        shape = INPUT_SHAPES[index % 2]
        cases.append(BlockCase(cin, cout, kernel, stride, groups, se, branches, shape))
    return cases


GRID = _grid()
# Small subsets for the BN-hyperparameter variants and dilation.
BN_CASES = [c for c in GRID if c.kernel_size == 3 and c.num_conv_branches == 4][::2]
DILATED = [
    BlockCase(4, 4, 3, 1, 1, False, 2, (2, 9, 9), dilation=2),
    BlockCase(4, 6, 5, 1, 2, False, 1, (1, 11, 10), dilation=2),
    BlockCase(16, 16, 3, 2, 16, True, 4, (2, 13, 12), dilation=2),
    BlockCase(16, 16, 5, 1, 4, True, 3, (1, 12, 11), dilation=3),
]


def _pair(case: BlockCase, dtype):
    return build_pair("MobileOneBlock", dtype=dtype, **case.kwargs())


def _assert_train_step_matches(ours, reference, x, dtype, steps: int = 1) -> None:
    # float32 gradients of nearly cancelling sums (e.g. a 1x1 scale kernel) carry rounding that
    # the seed's own float32 math shares, so in float32 both are measured against a float64 run
    # of the oracle: ours must stay within the bound, or within 4x the oracle's own error.
    truth = copy.deepcopy(reference).double() if dtype == torch.float32 else None
    for _ in range(steps):
        got, expected = train_step(ours, x), train_step(reference, x)
        exact = train_step(truth, x.double()) if truth is not None else None
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            bound = TOLERANCE[dtype] if key == "output" else GRAD_TOLERANCE[dtype]
            assert got[key] is not None, f"{key} is None"
            if exact is None:
                assert_close(got[key], value, bound, key)
            else:
                own = rel_err(value, exact[key])
                assert_close(got[key], exact[key], max(bound, 4 * own), f"{key} (oracle's own error {own:.1e})")
    _assert_buffers_match(ours, reference, dtype)


def _assert_buffers_match(ours, reference, dtype) -> None:
    got = dict(ours.named_buffers())
    expected = dict(reference.named_buffers())
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(got[key], value), f"{key}: {got[key]} != {value}"
        else:
            assert_close(got[key], value, TOLERANCE[dtype], key)


@pytest.mark.parametrize("case", GRID, ids=str)
def test_train_step_matches_oracle(case, dtype):
    ours, reference = _pair(case, dtype)
    _assert_train_step_matches(ours, reference, case.input(dtype), dtype)


@pytest.mark.parametrize("case", BN_CASES, ids=str)
@pytest.mark.parametrize("eps, momentum", [(1e-5, None), (1e-3, 0.03)], ids=["cumulative", "yolov9"])
def test_train_steps_with_bn_hyperparameters_match_oracle(case, dtype, eps, momentum):
    ours, reference = _pair(case, dtype)
    for model in (ours, reference):
        oracle.set_bn_hyperparameters(model, eps, momentum)
    _assert_train_step_matches(ours, reference, case.input(dtype), dtype, steps=2)
    assert_close(
        eval_output(ours, case.input(dtype, 3)),
        eval_output(reference, case.input(dtype, 3)),
        TOLERANCE[dtype],
        "eval output after steps",
    )


@pytest.mark.parametrize("case", GRID, ids=str)
def test_eval_output_matches_oracle(case, dtype):
    ours, reference = _pair(case, dtype)
    x = case.input(dtype)
    assert_close(eval_output(ours, x), eval_output(reference, x), TOLERANCE[dtype], "eval")


@pytest.mark.parametrize("case", GRID, ids=str)
def test_fused_output_matches_unfused_oracle(case, dtype):
    ours, reference = _pair(case, dtype)
    x = case.input(dtype)
    expected = eval_output(reference, x)
    ours.reparameterize()
    assert_close(eval_output(ours, x), expected, TOLERANCE[dtype], "fused vs oracle unfused")
    _assert_fused_tensors_match(ours, fused_copy_of(reference), dtype)


def _assert_fused_tensors_match(ours, fused_reference, dtype) -> None:
    got, expected = ours.state_dict(), fused_reference.state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert_close(got[key], value, TOLERANCE[dtype], key)


@pytest.mark.parametrize("case", BN_CASES, ids=str)
def test_fused_after_train_step_matches_oracle(case, dtype):
    ours, reference = _pair(case, dtype)
    train_step(ours, case.input(dtype))
    train_step(reference, case.input(dtype))
    x = case.input(dtype, seed=5)
    expected = eval_output(reference, x)
    ours.reparameterize()
    assert_close(eval_output(ours, x), expected, TOLERANCE[dtype], "fused after step")


@pytest.mark.parametrize("case", DILATED, ids=str)
def test_dilated_block_matches_oracle(case, dtype):
    ours, reference = _pair(case, dtype)
    _assert_train_step_matches(ours, reference, case.input(dtype), dtype)
    x = case.input(dtype, seed=4)
    expected = eval_output(reference, x)
    assert_close(eval_output(ours, x), expected, TOLERANCE[dtype], "dilated eval")
    ours.reparameterize()
    assert ours.reparam_conv.dilation == (case.dilation, case.dilation)
    assert_close(eval_output(ours, x), expected, TOLERANCE[dtype], "dilated fused")
    _assert_fused_tensors_match(ours, fused_copy_of(reference), dtype)


@pytest.mark.parametrize("channels, rd_ratio", [(16, 0.0625), (32, 0.0625), (24, 0.25)])
def test_se_block_matches_oracle(channels, rd_ratio, dtype):
    ours, reference = build_pair("SEBlock", channels, rd_ratio, dtype=dtype)
    assert list(ours.state_dict()) == list(reference.state_dict())
    x = random_input((2, channels, 5, 7), dtype)
    got, expected = train_step(ours, x), train_step(reference, x)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert_close(got[key], value, GRAD_TOLERANCE[dtype], key)


@pytest.mark.parametrize("case", GRID[::9], ids=str)
def test_inference_mode_block_loads_oracle_fused_weights(case, dtype):
    _, reference = _pair(case, dtype)
    fused_reference = fused_copy_of(reference)
    ours = mobileone_rs.MobileOneBlock(**case.kwargs(), inference_mode=True).to(dtype)
    assert ours.inference_mode is True
    oracle.copy_weights(fused_reference, ours)
    x = case.input(dtype)
    assert_close(eval_output(ours, x), eval_output(fused_reference, x), TOLERANCE[dtype], "fused")


@pytest.mark.parametrize("case", GRID[::5], ids=str)
def test_state_dict_keys_match_oracle(case):
    ours = mobileone_rs.MobileOneBlock(**case.kwargs())
    reference = oracle.MobileOneBlock(**case.kwargs())
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in reference.named_parameters()]
    ours.reparameterize()
    reference.reparameterize()
    assert list(ours.state_dict()) == list(reference.state_dict())


@pytest.mark.parametrize("stride, out_channels", [(1, 8), (2, 4)], ids=["wider", "stride2"])
def test_padded_pointwise_block_without_skip_matches_oracle(stride, out_channels, dtype):
    # k=1 with padding 1 only works in the seed when there is no skip branch to mismatch.
    case = {"in_channels": 4, "out_channels": out_channels, "kernel_size": 1, "stride": stride, "padding": 1}
    ours, reference = build_pair("MobileOneBlock", dtype=dtype, num_conv_branches=2, **case)
    x = random_input((2, 4, 7, 6), dtype)
    _assert_train_step_matches(ours, reference, x, dtype)
    expected = eval_output(reference, x)
    ours.reparameterize()
    assert_close(eval_output(ours, x), expected, TOLERANCE[dtype], "padded 1x1 fused")


@pytest.mark.parametrize("case", BN_CASES, ids=str)
def test_train_step_storing_branch_outputs_matches_oracle(case, dtype):
    # low_memory=False: depthwise blocks run their branches (and store their outputs) instead of
    # recomputing them in the backward.
    ours, reference = _pair(case, dtype)
    ours.low_memory = False
    _assert_train_step_matches(ours, reference, case.input(dtype), dtype, steps=2)


@pytest.fixture
def branch_path_on_cpu():
    """Depthwise training steps run the branch-recomputing path CUDA tensors take, instead of
    the CPU patch-moment kernel."""
    with mobileone_rs.fast_paths(cpu_kernel=False):
        yield


@pytest.mark.parametrize("case", BN_CASES, ids=str)
def test_train_step_on_the_cuda_path_matches_oracle(case, dtype, branch_path_on_cpu):
    ours, reference = _pair(case, dtype)
    if case.groups == case.in_channels == case.out_channels and case.groups > 1:
        ours.train()
        assert ours.forward_path(case.input(dtype)) == "train_depthwise"
    _assert_train_step_matches(ours, reference, case.input(dtype), dtype, steps=2)


class _Subclass(torch.Tensor):
    """A tensor subclass: only the module path models it (its ops may be overridden)."""


def test_train_step_on_a_tensor_subclass_matches_oracle():
    case = next(c for c in BN_CASES if c.groups == c.in_channels and c.kernel_size > 1)
    ours, reference = _pair(case, torch.float64)
    x = case.input(torch.float64)
    ours.train()
    assert ours.forward_path(x.as_subclass(_Subclass)) == "module"
    got, expected = train_step(ours, x.as_subclass(_Subclass)), train_step(reference, x)
    for key, value in expected.items():
        assert_close(got[key], value, TOLERANCE[torch.float64], key)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_eval_forward_with_gradients_matches_oracle(fused):
    # Without no_grad, eval-mode depthwise blocks must stay differentiable (the CPU inference
    # kernel is not, so libtorch's conv runs): input and weight gradients match the oracle's.
    case = next(c for c in GRID if c.groups == c.in_channels == c.out_channels and c.kernel_size == 3)
    ours, reference = _pair(case, torch.float32)
    if fused:
        ours, reference = mobileone_rs.reparameterize_model(ours), oracle.reparameterize_model(reference)

    def eval_grads(model):
        model.eval()
        x = case.input(torch.float32).requires_grad_(True)
        out = model(x)
        (out * random_input(out.shape, out.dtype, seed=2)).sum().backward()
        return {"output": out.detach(), "input.grad": x.grad,
                **{f"{name}.grad": p.grad for name, p in model.named_parameters()}}

    got, expected = eval_grads(ours), eval_grads(reference)
    assert got.keys() == expected.keys()
    # The seed's re-parameterization detaches its weights (ours stay trainable): for fused blocks
    # the output and the input gradient are compared.
    compared = [key for key, value in expected.items() if value is not None]
    assert {"output", "input.grad"} <= set(compared) and (fused or len(compared) > 3)
    assert all(value is not None for value in got.values())
    for key in compared:
        assert got[key] is not None, key
        assert_close(got[key], expected[key], GRAD_TOLERANCE[torch.float32], key)


class _CustomNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass: not the plain class, so the block must call it as a module."""


@pytest.mark.parametrize("make_norm", [
    lambda c: nn.BatchNorm2d(c, track_running_stats=False),
    lambda c: _CustomNorm(c),
], ids=["no-running-stats", "subclass"])
@pytest.mark.parametrize("kernel_size, groups", [(3, 16), (1, 1)], ids=["depthwise", "pointwise"])
def test_non_plain_batchnorm_runs_the_module_path(make_norm, kernel_size, groups):
    ours, reference = build_pair("MobileOneBlock", 16, 16, kernel_size, padding=kernel_size // 2,
                                 groups=groups, num_conv_branches=2)
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
    ours, reference = build_pair("MobileOneBlock", 8, 8, kernel_size, padding=kernel_size // 2,
                                 groups=groups, num_conv_branches=3)
    for model in (ours, reference):
        for i, bn in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.eps = 10.0 ** -(i + 1)
    _assert_train_step_matches(ours, reference, random_input((2, 8, 7, 9)), torch.float64, steps=2)
