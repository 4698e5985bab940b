"""MobileOneBlock and SEBlock against the oracle: eval, fused, SE, state_dict keys (the training
step is in tests/train)."""

import mobileone_rs
import pytest
import torch

from tests import oracle
from tests._util import (
    GRAD_TOLERANCE,
    TOLERANCE,
    assert_close,
    build_pair,
    eval_output,
    fused_copy_of,
    random_input,
    train_step,
)
from tests.block.grid import BN_CASES, DILATED, GRID, assert_train_step_matches, pair


@pytest.mark.parametrize("case", GRID, ids=str)
def test_eval_output_matches_oracle(case, dtype):
    ours, reference = pair(case, dtype)
    x = case.input(dtype)
    assert_close(eval_output(ours, x), eval_output(reference, x), TOLERANCE[dtype], "eval")


@pytest.mark.parametrize("case", GRID, ids=str)
def test_fused_output_matches_unfused_oracle(case, dtype):
    ours, reference = pair(case, dtype)
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
    ours, reference = pair(case, dtype)
    train_step(ours, case.input(dtype))
    train_step(reference, case.input(dtype))
    x = case.input(dtype, seed=5)
    expected = eval_output(reference, x)
    ours.reparameterize()
    assert_close(eval_output(ours, x), expected, TOLERANCE[dtype], "fused after step")


@pytest.mark.parametrize("case", DILATED, ids=str)
def test_dilated_block_matches_oracle(case, dtype):
    ours, reference = pair(case, dtype)
    assert_train_step_matches(ours, reference, case.input(dtype), dtype)
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
    _, reference = pair(case, dtype)
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
    # k=1 with padding 1 only works in the reference when there is no skip branch to mismatch.
    case = {"in_channels": 4, "out_channels": out_channels, "kernel_size": 1, "stride": stride, "padding": 1}
    ours, reference = build_pair("MobileOneBlock", dtype=dtype, num_conv_branches=2, **case)
    x = random_input((2, 4, 7, 6), dtype)
    assert_train_step_matches(ours, reference, x, dtype)
    expected = eval_output(reference, x)
    ours.reparameterize()
    assert_close(eval_output(ours, x), expected, TOLERANCE[dtype], "padded 1x1 fused")


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_eval_forward_with_gradients_matches_oracle(fused):
    # Without no_grad, eval-mode depthwise blocks must stay differentiable (the CPU inference
    # kernel is not, so libtorch's conv runs): input and weight gradients match the oracle's.
    case = next(c for c in GRID if c.groups == c.in_channels == c.out_channels and c.kernel_size == 3)
    ours, reference = pair(case, torch.float32)
    if fused:
        ours, reference = mobileone_rs.reparameterize_model(ours), oracle.reparameterize_model(reference)

    def eval_grads(model):
        model.eval()
        x = case.input(torch.float32).requires_grad_(True)
        out = model(x)
        (out * random_input(out.shape, out.dtype, seed=2)).sum().backward()
        return {
            "output": out.detach(),
            "input.grad": x.grad,
            **{f"{name}.grad": p.grad for name, p in model.named_parameters()},
        }

    got, expected = eval_grads(ours), eval_grads(reference)
    assert got.keys() == expected.keys()
    # The reference's re-parameterization detaches its weights (ours stay trainable): for fused blocks
    # the output and the input gradient are compared.
    compared = [key for key, value in expected.items() if value is not None]
    assert {"output", "input.grad"} <= set(compared) and (fused or len(compared) > 3)
    assert all(value is not None for value in got.values())
    for key in compared:
        assert got[key] is not None, key
        assert_close(got[key], expected[key], GRAD_TOLERANCE[torch.float32], key)
