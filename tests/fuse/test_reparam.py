"""reparameterize() / reparameterize_model(): idempotence, copies, containers, dtypes, layouts."""

import mobileone_rs
import pytest
import torch
from torch import nn

from tests import oracle
from tests._util import (
    BLOCK_ARGS,
    TOLERANCE,
    assert_close,
    assert_state_dicts_equal,
    build_pair,
    eval_output,
    fused_copy_of,
    random_input,
    tensors_by_name,
)

F64 = TOLERANCE[torch.float64]
STAGE_ARGS = (16, 32, 2, 2, True, 1)


def _block_pair(dtype=torch.float64):
    return build_pair("MobileOneBlock", dtype=dtype, **BLOCK_ARGS)


def _x(dtype=torch.float64, seed=1):
    return random_input((2, 16, 9, 7), dtype, seed)


def _is_train_time(block) -> bool:
    return (
        (not block.inference_mode)
        and hasattr(block, "rbr_conv")
        and not any(name.startswith("reparam_conv") for name, _ in block.named_parameters())
    )


def test_reparameterize_twice_is_a_no_op():
    ours, _ = _block_pair()
    ours.reparameterize()
    once, conv = tensors_by_name(ours), ours.reparam_conv
    out = eval_output(ours, _x())
    ours.reparameterize()
    assert ours.reparam_conv is conv
    assert_state_dicts_equal(tensors_by_name(ours), once)
    assert torch.equal(eval_output(ours, _x()), out)


def test_reparameterize_model_returns_new_model_and_keeps_original():
    ours, reference = build_pair("MobileOne", *STAGE_ARGS)
    before = tensors_by_name(ours)
    fused = mobileone_rs.reparameterize_model(ours)
    assert fused is not ours
    assert_state_dicts_equal(tensors_by_name(ours), before)
    assert all(_is_train_time(block) for block in ours.stage)
    assert all(block.inference_mode for block in fused.stage)
    assert all(p.requires_grad for p in ours.parameters())
    x = random_input((2, 16, 10, 8))
    assert_close(eval_output(ours, x), eval_output(reference, x), F64, "original after copy")
    assert_close(eval_output(fused, x), eval_output(reference, x), F64, "fused copy")


def test_reparameterize_model_inplace_returns_same_object():
    ours, reference = build_pair("MobileOne", *STAGE_ARGS)
    fused = mobileone_rs.reparameterize_model(ours, inplace=True)
    assert fused is ours
    assert all(block.inference_mode for block in ours.stage)
    x = random_input((2, 16, 10, 8))
    assert_close(eval_output(ours, x), eval_output(reference, x), F64, "in-place fused")


def _mixed_sequential(module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        module.MobileOneBlock(16, 16, 3, padding=1, groups=16, num_conv_branches=2),
        nn.BatchNorm2d(16),
        nn.SiLU(),
        module.MobileOne(*STAGE_ARGS),
        nn.Conv2d(32, 4, 1),
    )


def test_reparameterize_model_on_sequential_with_other_layers():
    reference = oracle.randomize_bn_stats(_mixed_sequential(oracle)).double()
    ours = oracle.copy_weights(reference, _mixed_sequential(mobileone_rs).double())
    x = random_input((2, 3, 12, 10))
    expected = eval_output(reference, x)
    fused = mobileone_rs.reparameterize_model(ours)
    fused_reference = oracle.reparameterize_model(reference)
    assert list(fused.state_dict()) == list(fused_reference.state_dict())
    assert isinstance(fused[2], nn.BatchNorm2d)
    assert_close(eval_output(fused, x), expected, F64, "fused sequential")


@pytest.mark.parametrize(
    "convert, dtype, bound",
    [
        (lambda m: m.to(torch.float64), torch.float64, F64),
        (lambda m: m.half(), torch.float16, 1e-2),
        (lambda m: m.to(torch.bfloat16), torch.bfloat16, 5e-2),
    ],
    ids=["float64", "half", "bfloat16"],
)
def test_dtype_conversion_then_reparameterize(convert, dtype, bound):
    ours, reference = build_pair("MobileOneBlock", dtype=torch.float32, **BLOCK_ARGS)
    convert(ours)
    ours.reparameterize()
    fused_reference = fused_copy_of(reference.double())
    for name in ("weight", "bias"):
        got = getattr(ours.reparam_conv, name)
        assert got.dtype == dtype, name
        expected = getattr(fused_reference.reparam_conv, name).to(dtype)
        assert_close(got, expected, bound, f"fused {name} in {dtype}")
    x = _x()
    assert_close(eval_output(ours, x.to(dtype)), eval_output(fused_reference, x), bound, "output")


@pytest.mark.parametrize("fused", [False, True], ids=["train-time", "fused"])
def test_channels_last_input_gives_same_output(fused):
    ours, reference = _block_pair()
    if fused:
        ours.reparameterize()
    x = _x()
    expected = eval_output(reference, x)
    x_cl = x.to(memory_format=torch.channels_last)
    assert_close(eval_output(ours, x_cl), expected, F64, "channels_last input")
    ours.to(memory_format=torch.channels_last)
    assert_close(eval_output(ours, x_cl), expected, F64, "channels_last model and input")


def test_fused_weights_stay_trainable():
    ours, _ = _block_pair()
    ours.reparameterize()
    # Deliberately unlike the reference, whose detach_() freezes every fused parameter.
    assert all(p.requires_grad for p in ours.parameters())
    before = ours.reparam_conv.weight.detach().clone()
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    ours.train()
    loss = ours(_x()).square().mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(ours.reparam_conv.weight.detach(), before)


def test_reparameterize_model_copy_shares_nothing_with_original():
    ours, reference = build_pair("MobileOne", *STAGE_ARGS)
    ours.stage[1].train(False)
    reference.stage[1].train(False)
    fused = mobileone_rs.reparameterize_model(ours)
    fused_reference = oracle.reparameterize_model(reference)
    assert [m.training for m in fused.modules()] == [m.training for m in fused_reference.modules()]
    original = {p.data_ptr() for p in ours.parameters()} | {b.data_ptr() for b in ours.buffers()}
    assert original.isdisjoint(p.data_ptr() for p in fused.parameters())
    assert original.isdisjoint(b.data_ptr() for b in fused.buffers())


def test_reparameterize_model_keeps_a_shared_block_shared():
    block, reference_block = _block_pair()
    ours = nn.Sequential(block, nn.Identity(), block)
    reference = nn.Sequential(reference_block, nn.Identity(), reference_block)
    fused = mobileone_rs.reparameterize_model(ours)
    assert fused[0] is fused[2]
    assert list(fused.state_dict()) == list(oracle.reparameterize_model(reference).state_dict())
    assert_close(eval_output(fused, _x()), eval_output(reference, _x()), F64, "shared block")
