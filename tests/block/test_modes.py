"""Grad modes, frozen parameters and strided inputs give the oracle's numbers (float64)."""

import mobileone_rs
import pytest
import torch

from tests._util import BLOCK_ARGS, TOLERANCE, assert_close, build_pair, random_input, train_step

F64 = TOLERANCE[torch.float64]


def _pair(fused: bool = False):
    ours, reference = build_pair("MobileOneBlock", **BLOCK_ARGS)
    if fused:
        ours.reparameterize()
        reference.reparameterize()
    return ours, reference


def _assert_buffers_close(ours, reference):
    expected = dict(reference.named_buffers())
    for name, value in ours.named_buffers():
        assert_close(value.double(), expected[name].double(), F64, name)


@pytest.mark.parametrize("fused", [False, True], ids=["train-time", "fused"])
def test_non_contiguous_input(fused):
    ours, reference = _pair(fused)
    x = random_input((2, 16, 7, 9)).transpose(2, 3)
    assert not x.is_contiguous()
    got, expected = train_step(ours, x), train_step(reference, x.contiguous())
    # The reference's fused parameters are detached, so only output and input grad compare there.
    names = ["output", "input.grad"] if fused else list(expected)
    for name in names:
        assert_close(got[name], expected[name], F64, name)


def test_frozen_parameters_still_give_input_gradient():
    ours, reference = _pair()
    for model in (ours, reference):
        model.requires_grad_(False)
    got, expected = (
        train_step(ours, random_input((2, 16, 9, 7))),
        train_step(reference, random_input((2, 16, 9, 7))),
    )
    assert_close(got["input.grad"], expected["input.grad"], F64, "input.grad")
    assert all(p.grad is None for p in ours.parameters())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_grad_free_contexts(context, train):
    ours, reference = _pair()
    x = random_input((2, 16, 9, 7))
    with context():
        got, expected = ours.train(train)(x), reference.train(train)(x)
    assert_close(got, expected, F64, "output")
    _assert_buffers_close(ours, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_train_step_and_fused_match_oracle():
    ours, reference = _pair()
    ours.cuda()
    reference.cuda()
    x = random_input((2, 16, 9, 7)).cuda()
    got, expected = train_step(ours, x), train_step(reference, x)
    for name, value in expected.items():
        assert got[name].device == value.device, name
        assert_close(got[name], value, F64, name)
    fused = mobileone_rs.reparameterize_model(ours)
    assert fused.reparam_conv.weight.device == x.device
    assert_close(fused.eval()(x), reference.eval()(x), F64, "fused on cuda")
