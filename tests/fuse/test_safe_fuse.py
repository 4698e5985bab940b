"""Fusing half/bfloat16 models computes in float32 and refuses kernels that overflow."""

import mobileone_rs
import pytest
import torch
from torch import nn

from tests import oracle
from tests._util import rel_err


def _tiny_var_block(dtype):
    block = mobileone_rs.MobileOneBlock(16, 16, 3, padding=1, groups=16, num_conv_branches=2)
    block.rbr_conv[0].bn.running_var.fill_(1e-12)
    block.rbr_conv[0].bn.eps = 1e-12
    return block.to(dtype)


def test_half_overflow_names_the_block():
    model = nn.Sequential(nn.Identity(), _tiny_var_block(torch.float16))
    with pytest.raises(mobileone_rs.FuseOverflowError, match=r"block '1'.*does not fit"):
        mobileone_rs.reparameterize_model(model)
    assert not model[1].inference_mode  # the original is untouched


def test_half_overflow_in_place_reparameterize_raises_and_keeps_branches():
    block = _tiny_var_block(torch.float16)
    with pytest.raises(OverflowError, match="kernel"):
        block.reparameterize()
    assert hasattr(block, "rbr_conv") and not block.inference_mode


def test_float32_fuse_of_the_same_block_is_finite():
    block = _tiny_var_block(torch.float32)
    block.reparameterize()
    assert torch.isfinite(block.reparam_conv.weight).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_fuse_is_computed_in_float32(dtype):
    # gamma / std = 1000 / 0.01 = 1e5 overflows float16, but times the 0.5 kernel it is 5e4,
    # which fits: only a computation wider than float16 gets it right.
    reference = oracle.MobileOneBlock(16, 16, 1, num_conv_branches=1)
    with torch.no_grad():
        reference.rbr_conv[0].conv.weight.fill_(0.5)
        reference.rbr_conv[0].bn.weight.fill_(1000.0)
    reference.rbr_conv[0].bn.running_var.fill_(1e-4)
    reference.rbr_conv[0].bn.eps = 0.0
    ours = mobileone_rs.MobileOneBlock(16, 16, 1, num_conv_branches=1)
    oracle.copy_weights(reference, ours)
    ours.rbr_conv[0].bn.eps = 0.0
    expected = oracle.reparameterize_model(reference.double()).reparam_conv.weight
    ours.to(dtype).reparameterize()
    assert ours.reparam_conv.weight.dtype == dtype
    assert torch.isfinite(ours.reparam_conv.weight).all()
    assert rel_err(ours.reparam_conv.weight, expected.to(dtype)) < 1e-2
