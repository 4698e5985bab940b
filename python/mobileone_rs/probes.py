"""Probes of torch's state: the only module that reads torch internals (``torch._C`` and private
attributes). Each probe answers one question the dispatcher weighs; tests/block/test_probes.py
checks every one of them on the installed torch.

It also captures, at import, torch's own module classes and the functions and methods the
reference's module path calls, so a replacement (``nn.BatchNorm2d.forward = ...``, ``F.conv2d =
...``, or ``torch.nn.Conv2d`` swapped for a quantizing subclass as NVIDIA's pytorch-quantization
does) is seen, and the module path runs what it replaced.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
import torch.nn.modules.activation as _activation
import torch.nn.modules.batchnorm as _batchnorm
import torch.nn.modules.container as _container
import torch.nn.modules.conv as _conv
import torch.nn.modules.linear as _linear
import torch.nn.modules.module as _torch_module

from .options import Options, effective
from .state import CallEnv

# torch's own classes, from the modules that define them: a class swapped into ``torch.nn``
# later does not change these.
CONV2D = _conv.Conv2d
BATCHNORM2D = _batchnorm.BatchNorm2d
SEQUENTIAL = _container.Sequential
MODULELIST = _container.ModuleList
RELU = _activation.ReLU
IDENTITY = _linear.Identity

# Per class: the methods the module path calls on its instances (an instance attribute of the
# same name replaces them too; ``_call_impl`` is what ``module(x)`` runs).
INSTANCE_METHODS: dict[type, tuple[str, ...]] = {
    CONV2D: ("forward", "_conv_forward", "_call_impl"),
    BATCHNORM2D: ("forward", "_check_input_dim", "_call_impl"),
    SEQUENTIAL: ("forward", "_call_impl"),
    RELU: ("forward", "_call_impl"),
    IDENTITY: ("forward", "_call_impl"),
}

_PATCHABLE: list[tuple[Any, str]] = [
    *((cls, name) for cls, names in INSTANCE_METHODS.items() for name in names),
    (MODULELIST, "__getitem__"),
    (_torch_module.Module, "__call__"),
    (_torch_module.Module, "_call_impl"),
    (F, "conv2d"),
    (F, "batch_norm"),
    (F, "relu"),
    (F, "avg_pool2d"),
    (torch, "conv2d"),
    (torch, "batch_norm"),
    (torch, "relu"),  # what F.relu calls
    (torch, "relu_"),
    (torch, "sigmoid"),
]
_CAPTURED: list[tuple[Any, str, Any]] = [(owner, name, getattr(owner, name)) for owner, name in _PATCHABLE]


def capture(owner: Any, name: str) -> None:
    """Adds ``owner.name`` (as it is now) to what :func:`torch_patched` watches."""
    _CAPTURED.append((owner, name, getattr(owner, name)))


def torch_patched() -> bool:
    """Whether a function or method the module path calls was replaced since import."""
    return any(getattr(owner, name, None) is not value for owner, name, value in _CAPTURED)


def stock(module: Any, cls: type) -> bool:
    """Whether ``module`` is exactly torch's ``cls`` with no instance-level method replacement and
    no compiled call (``module.compile()`` makes ``module(x)`` run a compiled graph)."""
    if type(module) is not cls:
        return False
    d = module.__dict__
    if d.get("_compiled_call_impl") is not None:
        return False
    return not any(name in d for name in INSTANCE_METHODS.get(cls, ("forward", "_call_impl")))


def hooked(module: Any) -> bool:
    """Whether ``module`` has forward or backward hooks of its own."""
    d = module.__dict__
    return bool(
        d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
    )


def global_hooks() -> bool:
    """Whether module hooks are registered for every module."""
    return bool(
        _torch_module._global_forward_hooks
        or _torch_module._global_forward_pre_hooks
        or _torch_module._global_backward_hooks
        or _torch_module._global_backward_pre_hooks
    )


def autocast(x: torch.Tensor) -> bool:
    """Whether autocast is enabled for ``x``'s device type."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def functorch(x: torch.Tensor) -> bool:
    """Whether a torch.func transform is active or ``x`` is one's wrapped tensor."""
    return (
        torch._C._functorch.peek_interpreter_stack() is not None
        or torch._C._functorch.is_functorch_wrapped_tensor(x)
    )


def symbolic(x: Any) -> bool:
    """Whether ``x`` is traced symbolically (torch.compile, FX): no native call can run."""
    return (
        isinstance(x, torch.fx.Proxy)
        or torch.compiler.is_compiling()
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
    )


def capturing(x: Any) -> bool:
    """Whether a graph is being captured (jit.trace, ONNX export, torch.compile/export, FX)."""
    return (
        symbolic(x)
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_exporting()
    )


def dispatch_mode() -> bool:
    """Whether a TorchDispatchMode is active."""
    return torch._C._len_torch_dispatch_stack() > 0


def function_mode() -> bool:
    """Whether a TorchFunctionMode is active."""
    return torch._C._len_torch_function_stack() > 0


def saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks are active (checkpointing, offloading)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def forward_ad() -> bool:
    """Whether a forward-mode AD dual level is active."""
    return _forward_ad._current_level >= 0


def call_env(x: torch.Tensor, options: Options) -> CallEnv:
    """Every fact of this call the dispatcher weighs, and the block's effective options."""
    fast, low_memory, cpu_kernel = effective(options)
    return {
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "autocast": autocast(x),
        "jit_tracing": torch.jit.is_tracing(),
        "functorch": functorch(x),
        "dispatch_mode": dispatch_mode(),
        "function_mode": function_mode(),
        "saved_tensor_hooks": saved_tensor_hooks(),
        "forward_ad": forward_ad(),
        "global_hooks": global_hooks(),
        "patched_torch": torch_patched(),
        "input_subclass": type(x) is not torch.Tensor,
        "fast": fast,
        "low_memory": low_memory,
        "cpu_kernel": cpu_kernel,
    }
