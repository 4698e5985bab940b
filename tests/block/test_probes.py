"""Each probe of torch's state (mobileone_rs.probes, the one module reading torch internals) on the
installed torch: False in a plain call, True under the condition it names. Private torch APIs can
change between releases; this file is what tells.
"""

from __future__ import annotations

import contextlib
import typing
from unittest import mock

import mobileone_rs
import pytest
import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from mobileone_rs import probes
from mobileone_rs.state import CallEnv
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _seen(probe, *args):
    """The probe's answer inside a function that torch.func, FX or tracing runs."""
    seen = []

    def run(x):
        seen.append(probe(x, *args))
        return x * 2

    return seen, run


def test_plain_call_answers_false_to_every_probe():
    x = torch.randn(1, 2, 3, 3)
    assert not probes.torch_patched()
    assert not probes.global_hooks()
    assert not probes.autocast(x)
    assert not probes.functorch(x)
    assert not probes.symbolic(x)
    assert not probes.capturing(x)
    assert not probes.dispatch_mode()
    assert not probes.function_mode()
    assert not probes.saved_tensor_hooks()
    assert not probes.forward_ad()


def test_call_env_has_exactly_the_named_fields():
    env = probes.call_env(torch.randn(1, 2, 3, 3), mobileone_rs.Options())
    assert set(env) == set(typing.get_type_hints(CallEnv))
    assert all(type(value) is bool for value in env.values()), env


@pytest.mark.parametrize(
    "owner, name",
    [(o, n) for o, n, _ in probes._CAPTURED],
    ids=[f"{getattr(o, '__name__', o)}.{n}" for o, n, _ in probes._CAPTURED],
)
def test_every_watched_function_replaced_is_seen(owner, name):
    original = getattr(owner, name)
    with mock.patch.object(owner, name, lambda *a, **k: original(*a, **k)):
        assert probes.torch_patched()
    assert not probes.torch_patched()


def test_the_functions_the_module_path_calls_are_watched():
    watched = {(o, n) for o, n, _ in probes._CAPTURED}
    for owner, name in [(F, "relu"), (torch, "relu"), (torch, "sigmoid"), (F, "batch_norm"), (F, "conv2d")]:
        assert (owner, name) in watched, name


@pytest.mark.parametrize("cls", [nn.Conv2d, nn.BatchNorm2d, nn.ReLU])
def test_stock_sees_instance_replacements_and_compiled_calls(cls):
    def make():
        return cls(2, 2, 1) if cls is nn.Conv2d else cls(2) if cls is nn.BatchNorm2d else cls()

    assert probes.stock(make(), cls)
    for name in ("forward", "_call_impl", "_compiled_call_impl"):
        module = make()
        setattr(module, name, lambda x: x)
        assert not probes.stock(module, cls), name

    class Sub(cls):
        pass

    assert not probes.stock(Sub.__new__(Sub), cls)


def test_hooked_and_global_hooks():
    conv = nn.Conv2d(2, 2, 1)
    assert not probes.hooked(conv)
    handle = conv.register_forward_pre_hook(lambda m, a: None)
    assert probes.hooked(conv)
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        assert probes.global_hooks()
    finally:
        handle.remove()
    assert not probes.global_hooks()


def test_autocast_for_the_inputs_device_type():
    x = torch.randn(1, 2, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert probes.autocast(x)
    assert not probes.autocast(torch.empty(1, device="meta"))


def test_functorch_transforms():
    for transform in (torch.func.vmap, lambda f: torch.func.grad(lambda x: f(x).sum())):
        seen, run = _seen(probes.functorch)
        transform(run)(torch.randn(3))
        assert seen == [True]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace on newer torch
def test_symbolic_and_capturing_under_fx_and_jit_trace():
    seen, run = _seen(probes.symbolic)
    torch.fx.symbolic_trace(run)
    assert seen == [True]
    seen, run = _seen(probes.capturing)
    torch.jit.trace(run, torch.randn(3), check_trace=False)
    assert seen == [True]
    seen, run = _seen(probes.symbolic)
    torch.jit.trace(run, torch.randn(3), check_trace=False)
    assert seen == [False]  # jit.trace records real calls: only capturing() says so


@pytest.mark.parametrize(
    "probe, context",
    [
        (probes.dispatch_mode, _Dispatch),
        (probes.function_mode, _Function),
        (
            probes.saved_tensor_hooks,
            lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
        ),
        (probes.forward_ad, fwad.dual_level),
    ],
    ids=["dispatch_mode", "function_mode", "saved_tensor_hooks", "forward_ad"],
)
def test_modes_and_hooks(probe, context):
    with context():
        assert probe()
    assert not probe()


def test_non_reentrant_checkpoint_is_seen_as_saved_tensor_hooks():
    seen = []

    def run(x):
        seen.append(probes.saved_tensor_hooks())
        return x * 2

    torch.utils.checkpoint.checkpoint(run, torch.randn(3, requires_grad=True), use_reentrant=False)
    assert True in seen


def test_plain_contexts_do_not_trigger_probes():
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(torch.inference_mode())
        assert not probes.dispatch_mode() and not probes.function_mode()
