"""Which path each state takes (``MobileOneBlock.forward_path``): the fast paths serve the states
they model, and every state or tool they do not model takes the module path, with a reason.
The numbers of those paths are checked against the oracle elsewhere (test_harness,
test_module_states, test_pytorch_tools, test_native_boundary); this file guards against a fast path
silently lost or silently widened."""

from __future__ import annotations

import mobileone_rs
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests._util import SEED_STAGES

DW = {
    "in_channels": 8,
    "out_channels": 8,
    "kernel_size": 3,
    "padding": 1,
    "groups": 8,
    "num_conv_branches": 2,
}
PW = {"in_channels": 8, "out_channels": 16, "kernel_size": 1, "num_conv_branches": 2}
DENSE = {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 1, "num_conv_branches": 2}


def _x(dtype=torch.float32):
    return torch.randn(2, 8, 6, 6, dtype=dtype)


def _path(block, x=None, explain=False):
    return block.forward_path(_x() if x is None else x, explain=explain)


@pytest.mark.parametrize(
    "kwargs, train, no_grad, dtype, expected",
    [
        (DW, True, False, torch.float32, "train_depthwise_cpu"),
        (DW, True, True, torch.float64, "train_depthwise_cpu"),
        (PW, True, False, torch.float32, "train_gram"),
        (DW, False, False, torch.float32, "folded"),
        (DW, False, True, torch.float32, "folded_cpu"),
        (DW, False, True, torch.float64, "folded"),
        (PW, False, True, torch.float32, "folded"),
        (DENSE, False, True, torch.float32, "folded"),
        (DENSE, True, False, torch.float32, "module"),
    ],
)
def test_standard_states_take_their_paths(kwargs, train, no_grad, dtype, expected):
    block = mobileone_rs.MobileOneBlock(**kwargs).to(dtype).train(train)
    with torch.no_grad() if no_grad else torch.enable_grad():
        assert _path(block, _x(dtype)) == expected


def test_fused_blocks_take_the_fused_paths():
    block = mobileone_rs.MobileOneBlock(**DW)
    block.reparameterize()
    assert _path(block) == "fused"  # the fused weights are trainable: a gradient may be wanted
    with torch.no_grad():
        assert _path(block) == "fused_cpu"
        assert _path(block.double(), _x(torch.float64)) == "fused"
        assert _path(block.half(), _x(torch.float16)) == "fused"


def test_options_select_the_paths():
    block = mobileone_rs.MobileOneBlock(**DW)
    with mobileone_rs.fast_paths(cpu_kernel=False, low_memory=True):
        assert _path(block) == "train_depthwise"
    assert _path(mobileone_rs.MobileOneBlock(**DW, cpu_kernel=False, low_memory=True)) == "train_depthwise"
    # Off the CPU kernel, only an explicit low_memory=True trades time for memory.
    name, reason = _path(mobileone_rs.MobileOneBlock(**DW, cpu_kernel=False), explain=True)
    assert name == "module" and "low_memory=True trades time for memory" in reason
    assert _path(mobileone_rs.MobileOneBlock(**DW, low_memory=True)) == "train_depthwise_cpu"
    assert _path(mobileone_rs.MobileOneBlock(**DW, fast=False)) == "module"
    with mobileone_rs.module_path():
        assert _path(block) == "module"
    assert _path(block) == "train_depthwise_cpu"  # scopes end
    stage = mobileone_rs.MobileOne(8, 16, 1, 2, cpu_kernel=False)
    assert {b.cpu_kernel for b in stage.stage} == {False}


def _frozen_some(block):
    block.rbr_conv[0].bn.eval()


def _frozen_all(block):
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


STATES = {
    "some BNs frozen": (_frozen_some, "module", "some BNs train"),
    "every BN frozen": (_frozen_all, "folded", "eval mode"),
    "untracked BN": (
        lambda b: setattr(b.rbr_skip, "track_running_stats", False),
        "module",
        "track_running_stats",
    ),
    "cumulative momentum": (lambda b: setattr(b.rbr_skip, "momentum", None), "train_depthwise_cpu", ""),
    "tensor momentum": (lambda b: setattr(b.rbr_skip, "momentum", torch.tensor(0.1)), "module", "momentum"),
    "zero eps": (lambda b: setattr(b.rbr_conv[1].bn, "eps", 0.0), "module", "rbr_conv.1.bn.eps"),
    "hook on a BN": (lambda b: b.rbr_conv[0].bn.register_forward_hook(lambda *a: None), "module", "hooks"),
    "hook on a conv": (
        lambda b: b.rbr_scale.conv.register_forward_pre_hook(lambda *a: None),
        "module",
        "hooks",
    ),
    "BN subclass": (
        lambda b: setattr(b.rbr_conv[0], "bn", type("Norm", (nn.BatchNorm2d,), {})(8)),
        "module",
        "not torch's nn.BatchNorm2d",
    ),
    "reflect padding": (
        lambda b: setattr(b.rbr_conv[0].conv, "padding_mode", "reflect"),
        "module",
        "padding_mode",
    ),
    "conv bias": (
        lambda b: setattr(b.rbr_conv[0].conv, "bias", nn.Parameter(torch.zeros(8))),
        "module",
        "bias",
    ),
    "other activation": (lambda b: setattr(b, "activation", nn.SiLU()), "module", "activation"),
    "no skip": (lambda b: setattr(b, "rbr_skip", None), "module", "skip branch differs"),
    "running stats need grad": (lambda b: b.rbr_skip.running_var.requires_grad_(True), "module", "in place"),
    "double BN stats": (
        lambda b: setattr(b.rbr_skip, "running_var", b.rbr_skip.running_var.double()),
        "module",
        "dtype",
    ),
}


@pytest.mark.parametrize("state", list(STATES))
def test_module_states_take_the_module_path_with_a_reason(state):
    apply, expected, why = STATES[state]
    block = mobileone_rs.MobileOneBlock(**DW)
    apply(block)
    name, reason = _path(block, explain=True)
    assert name == expected, reason
    assert why in reason


class _Counting(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _under(context, observe):
    with context:
        return observe()


CALLS = {
    "autocast": (lambda: torch.autocast("cpu", dtype=torch.bfloat16), "autocast"),
    "saved-tensor hooks": (
        lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
        "saved",
    ),
    "forward AD": (lambda: torch.autograd.forward_ad.dual_level(), "forward-mode"),
    "dispatch mode": (lambda: _Counting(), "TorchDispatchMode"),
    "function mode": (lambda: torch.device("cpu"), "TorchFunctionMode"),
    "module path scope": (lambda: mobileone_rs.module_path(), "fast paths are off"),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_calls_the_fast_paths_do_not_model_take_the_module_path(call):
    make, why = CALLS[call]
    block = mobileone_rs.MobileOneBlock(**DW)
    name, reason = _under(make(), lambda: _path(block, explain=True))
    assert name == "module" and why in reason, reason


def test_inputs_the_fast_paths_do_not_model_take_the_module_path():
    block = mobileone_rs.MobileOneBlock(**DW)
    with torch.inference_mode():
        inference_x = _x()
    assert _path(block, inference_x) == "module"
    assert _path(block, torch.zeros(0, 8, 6, 6)) == "module"
    assert _path(block, torch.zeros(1, 8, 1, 1)) == "module"  # one value per channel
    assert _path(block, _x().as_subclass(type("Sub", (torch.Tensor,), {}))) == "module"
    # The CPU kernel reads and writes NCHW: on a channels_last input the cost rule keeps the layout.
    name, reason = _path(block, _x().to(memory_format=torch.channels_last), explain=True)
    assert name == "module" and "channels_last" in reason, reason
    assert _path(block, _x()[:, :, ::1, :]) == "train_depthwise_cpu"


def test_jit_trace_and_functorch_take_the_module_path():
    block = mobileone_rs.MobileOneBlock(**DW).eval()
    seen = []
    # A hook on the block itself runs outside its forward: it does not change the path.
    block.register_forward_pre_hook(lambda module, args: seen.append(module.forward_path(args[0])))
    block(_x())
    torch.jit.trace(block, (_x(),), check_trace=False)
    torch.vmap(block)(torch.randn(3, 2, 8, 6, 6))
    torch.func.grad(lambda x: block(x).sum())(_x())
    assert seen == ["folded", "module", "module", "module"]


@pytest.mark.parametrize("scale", [1, 10], ids=["small-maps", "yolov9-640"])
@pytest.mark.parametrize("mode", ["train", "eval", "fused"])
def test_the_seed_stages_take_the_paths_the_cost_rule_expects_faster(mode, scale):
    """The user's yaml's stages at small maps (32x32 down to 2x2, batch 2) and at YOLOv9's 640
    (320x320 down to 40x40): every block takes a fast path or is refused by the cost rule alone."""
    blocks = []
    for args, _, channels, size in SEED_STAGES.values():
        stage = mobileone_rs.MobileOne(*args)
        if mode == "fused":
            stage = mobileone_rs.reparameterize_model(stage)
        stage.train(mode == "train")
        h = size * scale
        for block in stage.stage:
            # forward_path reads the input's sizes only: zeros of each block's input size stand in
            x = torch.zeros(2, block.spec.in_channels, h, h)
            with torch.no_grad():
                name, reason = block.forward_path(x, explain=True)
            blocks.append("slower" if "expected slower" in reason else name)
            h = (h - 1) // block.spec.stride + 1
    # Small maps: the depthwise kernel is expected slower than the module path on planes of 16x16
    # and below (the module path's convs run from cache), and so is the inference kernel with
    # 128+ planes; train_gram is refused where a block's values per channel are few (the last
    # stage's 2x4x4). At 640 the kernels run on the large early maps.
    expected = {
        ("train", 1): {"train_gram", "slower"},
        ("eval", 1): {"folded"},
        ("fused", 1): {"fused"},
        ("train", 10): {"train_depthwise_cpu", "train_gram", "slower"},
        ("eval", 10): {"folded_cpu", "folded"},
        ("fused", 10): {"fused_cpu", "fused"},
    }[mode, scale]
    assert set(blocks) == expected, blocks
