"""Forward hooks on children fire as they do on the oracle: the children really run."""

import operator

import pytest
import torch

from tests._util import BLOCK_ARGS, TOLERANCE, assert_close, build_pair, random_input

TRAIN_TIME_CHILDREN = [
    "",
    "rbr_conv.0.conv",
    "rbr_conv.2.bn",
    "rbr_scale.conv",
    "rbr_skip",
    "se",
    "se.reduce",
    "se.expand",
    "activation",
]
FUSED_CHILDREN = ["", "reparam_conv", "se", "se.reduce", "activation"]


class HookLog:
    """Records the tensor shapes every pre-hook and hook sees."""

    def __init__(self, module):
        self.calls = []
        self.handles = [
            module.register_forward_pre_hook(self._pre_hook),
            module.register_forward_hook(self._hook),
        ]

    def _pre_hook(self, module, args):
        self.calls.append(("pre", _shapes(args)))

    def _hook(self, module, args, output):
        self.calls.append(("post", _shapes(args), _shapes((output,))))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _shapes(values) -> tuple:
    return tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else type(v) for v in values)


def _child(model, name: str):
    return model if name == "" else operator.attrgetter(name)(model)


def _run_with_hooks(model, name, x, train: bool):
    log = HookLog(_child(model, name))
    model.train(train)
    with torch.no_grad():
        out = model(x)
    log.remove()
    return log.calls, out


def _check_child(ours, reference, name, train):
    x = random_input((2, 16, 9, 7))
    got_calls, got = _run_with_hooks(ours, name, x, train)
    expected_calls, expected = _run_with_hooks(reference, name, x, train)
    assert got_calls == expected_calls, f"hooks on {name!r}: {got_calls} != {expected_calls}"
    assert_close(got, expected, TOLERANCE[torch.float64], f"output with hooks on {name!r}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", TRAIN_TIME_CHILDREN)
def test_hooks_on_train_time_children_fire_like_oracle(name, train):
    ours, reference = build_pair("MobileOneBlock", **BLOCK_ARGS)
    _check_child(ours, reference, name, train)


@pytest.mark.parametrize("name", FUSED_CHILDREN)
def test_hooks_on_fused_children_fire_like_oracle(name):
    ours, reference = build_pair("MobileOneBlock", **BLOCK_ARGS)
    ours.reparameterize()
    reference.reparameterize()
    _check_child(ours, reference, name, train=False)


def test_hooks_on_stage_blocks_fire_like_oracle():
    ours, reference = build_pair("MobileOne", 16, 16, 2, 2, True, 1)
    for name in ("stage.0", "stage.3.se.expand", "stage.2.rbr_conv.1.conv"):
        _check_child(ours, reference, name, train=True)


def test_global_module_forward_hook_fires_like_oracle():
    ours, reference = build_pair("MobileOneBlock", **BLOCK_ARGS)
    x = random_input((2, 16, 9, 7))
    calls = {"ours": [], "reference": []}
    for key, model in (("ours", ours), ("reference", reference)):
        log = calls[key]
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, args, out, log=log: log.append((type(m).__name__, _shapes(args)))
        )
        try:
            out = model.train()(x)
        finally:
            handle.remove()
        calls[f"{key}.out"] = out.detach()
    assert calls["ours"] == calls["reference"]
    assert_close(calls["ours.out"], calls["reference.out"], TOLERANCE[torch.float64], "output")


@pytest.mark.parametrize("name", ["rbr_conv.1.conv", "rbr_skip", "se.expand", "activation"])
def test_full_backward_hook_on_child_fires_like_oracle(name):
    ours, reference = build_pair("MobileOneBlock", **BLOCK_ARGS)
    grads = {}
    for key, model in (("ours", ours), ("reference", reference)):
        seen = grads.setdefault(key, [])
        _child(model, name).register_full_backward_hook(
            lambda m, gin, gout, seen=seen: seen.append(gout[0].detach().clone())
        )
        x = random_input((2, 16, 9, 7)).requires_grad_(True)
        model.train()(x).square().sum().backward()
    assert len(grads["ours"]) == len(grads["reference"]) == 1
    assert_close(grads["ours"][0], grads["reference"][0], TOLERANCE[torch.float64], "grad_output")


@pytest.mark.parametrize("fused", [False, True], ids=["train-time", "fused"])
def test_replaced_activation_is_used_like_oracle(fused):
    ours, reference = build_pair("MobileOneBlock", **BLOCK_ARGS)
    for model in (ours, reference):
        if fused:
            model.reparameterize()
        model.activation = torch.nn.Hardswish()
    x = random_input((2, 16, 9, 7))
    assert_close(ours.eval()(x), reference.eval()(x), TOLERANCE[torch.float64], "Hardswish")
