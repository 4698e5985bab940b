"""Differential harness, overridden-forward family: a child whose forward is not its class's stock
one must run as it would on the module path, whichever way it was replaced.

- an instance attribute (``bn.forward = ...``: the idiom YOLOv9 uses with ``m.forward = m.forward_fuse``);
- a class-level patch (``nn.BatchNorm2d.forward = ...``, ``F.conv2d = ...``);
- a class swapped into ``torch.nn`` before the model is built, so that ``type(conv) is nn.Conv2d``
  still holds (NVIDIA pytorch-quantization's ``quant_modules.initialize()`` does this for QAT).

Each override is applied identically to ours and the oracle (the reference's math in plain
PyTorch); both then train for STEPS optimizer steps and are compared after each (float64,
1e-10), and ours must report the module path.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import mobileone_rs
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests._util import build_pair, random_input
from tests.exactness.test_harness import CONFIGS, _run

_STOCK_BN_FORWARD = nn.BatchNorm2d.forward
_STOCK_CONV2D = nn.Conv2d
_STOCK_F_CONV2D = F.conv2d


def _scaled_bn_forward(self, x):
    return _STOCK_BN_FORWARD(self, x) * 0.75 + 0.125


def _shifted_conv2d(*args, **kwargs):
    return _STOCK_F_CONV2D(*args, **kwargs) + 0.0625


class FakeQuantConv2d(_STOCK_CONV2D):
    """A QAT-style conv: the weight fake-quantized to 8 bits per tensor in every forward."""

    def forward(self, x):
        scale = self.weight.detach().abs().max().clamp_min(1e-12) / 127
        weight = torch.fake_quantize_per_tensor_affine(self.weight.float(), scale.item(), 0, -128, 127)
        return self._conv_forward(x, weight.to(self.weight.dtype), self.bias)


def _first_bn(model):
    return next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def _instance_bn_forward(model):
    bn = _first_bn(model)
    bn.forward = lambda x, bn=bn: _scaled_bn_forward(bn, x)


def _instance_relu_forward(model):
    model.activation.forward = lambda x: torch.nn.functional.leaky_relu(x, 0.25)


def _instance_bn_call_impl(model):
    bn = _first_bn(model)
    bn._call_impl = lambda x, bn=bn: _scaled_bn_forward(bn, x)


def _compiled_bn_call(model):
    """What ``bn.compile()`` sets (a compiled graph of a replaced forward, without compiling)."""
    bn = _first_bn(model)
    bn._compiled_call_impl = lambda x, bn=bn: _scaled_bn_forward(bn, x)


def _leaky_torch_relu(x):
    return torch.nn.functional.leaky_relu(x, 0.25)


def _instance_se_forward(model):
    se = model.se
    se.forward = lambda x, se=se: type(se).forward(se, x) * 0.5


# name -> (context around building and running both models, applied to both models after building)
OVERRIDES = {
    "instance-bn-forward": (None, _instance_bn_forward),
    "instance-relu-forward": (None, _instance_relu_forward),
    "instance-se-forward": (None, _instance_se_forward),
    "instance-bn-call-impl": (None, _instance_bn_call_impl),
    "compiled-bn-call": (None, _compiled_bn_call),
    "torch-relu": (lambda: mock.patch.object(torch, "relu", _leaky_torch_relu), None),
    "class-bn-forward": (lambda: mock.patch.object(nn.BatchNorm2d, "forward", _scaled_bn_forward), None),
    "functional-conv2d": (lambda: mock.patch.object(F, "conv2d", _shifted_conv2d), None),
    "qat-conv-swap": (lambda: mock.patch.object(torch.nn, "Conv2d", FakeQuantConv2d), None),
}


def _check(ours, reference, shape, override, where):
    context, apply = OVERRIDES[override]
    if apply is not None:
        apply(ours), apply(reference)
    with context() if context else contextlib.nullcontext():
        x = random_input(shape)
        assert ours.forward_path(x) == "module", f"{where}: {ours.forward_path(x, explain=True)}"
        _run(ours, reference, shape, "plain", where)


@pytest.mark.parametrize("override", list(OVERRIDES))
@pytest.mark.parametrize(
    "config", ["depthwise-s1", "depthwise-s2-se", "pointwise-skip", "pointwise-wider-se"]
)
def test_overridden_forward_runs_as_on_the_module_path(config, override):
    kwargs, shape = CONFIGS[config]
    context, _ = OVERRIDES[override]
    with context() if context else contextlib.nullcontext():
        ours, reference = build_pair("MobileOneBlock", **kwargs)
    ours.train(), reference.train()
    _check(ours, reference, shape, override, config)


@pytest.mark.parametrize(
    "override",
    ["instance-relu-forward", "class-bn-forward", "functional-conv2d", "qat-conv-swap", "torch-relu"],
)
@pytest.mark.parametrize("config", ["depthwise-s1", "pointwise-skip"])
def test_overridden_forward_of_a_fused_block(config, override):
    from tests import oracle

    kwargs, shape = CONFIGS[config]
    context, _ = OVERRIDES[override]
    with context() if context else contextlib.nullcontext():
        ours, reference = build_pair("MobileOneBlock", **kwargs)
        ours, reference = mobileone_rs.reparameterize_model(ours), oracle.reparameterize_model(reference)
    for p in reference.parameters():
        p.requires_grad_(True)
    _check(ours, reference, shape, override, f"fused {config}")


def test_qat_swap_trains_and_evaluates_the_quantized_convs():
    """A MobileOne stage built after a QAT-style swap of ``torch.nn.Conv2d`` quantizes its weights
    in training and in eval, as the module path does, and says why it runs that path."""
    with mock.patch.object(torch.nn, "Conv2d", FakeQuantConv2d):
        stage = mobileone_rs.MobileOne(8, 16, 1, 2).double()
        block = stage.stage[0]
        assert type(block.rbr_conv[0].conv) is FakeQuantConv2d
        x = random_input((2, 8, 8, 8))
        name, reason = block.forward_path(x, explain=True)
        assert name == "module" and "FakeQuantConv2d" in reason
        for train in (True, False):
            stage.train(train)
            with torch.no_grad():
                got = stage(x)
                with mobileone_rs.module_path():
                    expected = stage(x)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
