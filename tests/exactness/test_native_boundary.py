"""The native boundary: inputs and grads the kernels cannot read directly, spec and plan
checks, unsafe-code rules, and no panic or Rust backtrace from any native entry.
Each test reproduces a case that once differed from the reference (or crashed); float64 unless the case
is about another dtype.
"""

from __future__ import annotations

import os
import re

import mobileone_rs
import pytest
import torch
from mobileone_rs import _native, observe, probes

from tests import oracle
from tests._util import TOLERANCE, assert_close, build_pair, random_input
from tests.exactness._regression_helpers import (
    DEPTHWISE,
    POINTWISE,
    SRC,
    _error_of,
    _no_panic,
)

# Inputs and grads the kernels cannot read directly; the native boundary


@pytest.mark.parametrize("state", ["train", "eval", "fused"])
def test_misaligned_input_memory(state):
    ours, reference = build_pair("MobileOneBlock", dtype=torch.float32, **DEPTHWISE)
    if state == "fused":
        ours, reference = mobileone_rs.reparameterize_model(ours), oracle.reparameterize_model(reference)
    x = random_input((2, 8, 7, 6), torch.float32)
    raw = bytearray(x.numel() * 4 + 1)
    misaligned = torch.frombuffer(raw, dtype=torch.float32, offset=1, count=x.numel()).view(x.shape)
    misaligned.copy_(x)
    assert misaligned.data_ptr() % 4 != 0
    for model in (ours, reference):
        model.train(state == "train")
    with torch.no_grad():
        assert_close(ours(misaligned), reference(x), TOLERANCE[torch.float32], "misaligned")


def _plan_of(block, x):
    return block._plan(x, probes.call_env(x, block.options))


def test_backward_with_a_grad_the_kernel_cannot_read():
    block = mobileone_rs.MobileOneBlock(**DEPTHWISE).double()
    x = random_input((2, 8, 7, 6))
    plan = _plan_of(block, x)
    assert plan.name == "train_depthwise_cpu"
    out, saved = plan.train_forward(x)
    for grad in (
        torch.zeros(2, 8, 7, 6, device="meta", dtype=torch.float64),
        torch.zeros(3, 8, 7, 6).double(),
        torch.zeros(2, 8, 7, 6, dtype=torch.float32),
    ):
        assert plan.train_backward(grad, x, saved) is None
    garbage = [torch.zeros(1)] * len(saved)
    assert plan.train_backward(torch.zeros_like(out), x, garbage) is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("stride", 0),
        ("kernel_size", 0),
        ("dilation", 0),
        ("num_conv_branches", 0),
        ("in_channels", -1),
        ("groups", 10**30),
        ("use_se", "False"),
        ("padding", 1.0),
        ("stride", True),
    ],
)
def test_native_spec_extraction_validates(field, value):
    fields = {**mobileone_rs.MobileOneBlock(**DEPTHWISE).spec.as_dict(), field: value}
    with pytest.raises(mobileone_rs.ConfigError, match=field):
        _native.BlockSpec(**fields)


def test_a_plan_runs_only_the_input_and_path_it_was_made_for():
    block = mobileone_rs.MobileOneBlock(**DEPTHWISE).eval()
    x = random_input((2, 8, 7, 6), torch.float32)
    plan = _plan_of(block, x)
    with pytest.raises(mobileone_rs.ConfigError, match="size"):
        plan.run(random_input((2, 8, 9, 6), torch.float32))
    for call in (
        lambda: plan.train_forward(x),
        lambda: plan.parameters(),
        lambda: plan.train_backward(x, x, []),
    ):
        with pytest.raises(mobileone_rs.ConfigError, match="not a training path"):
            call()


def test_unsafe_code_states_its_invariants():
    """Structural: SIMD kernels behind a proof token, OS-specific dlopen behind cfg(linux) with
    libc's constants; unsafe_op_in_unsafe_fn denied and every unsafe block documented (clippy's
    undocumented_unsafe_blocks, denied crate-wide: `make lint` runs clippy with -D warnings)."""
    lib = (SRC / "lib.rs").read_text()
    assert "#![deny(unsafe_op_in_unsafe_fn)]" in lib
    assert "#![deny(clippy::undocumented_unsafe_blocks)]" in lib
    threads = (SRC / "cpu" / "threads.rs").read_text()
    assert '#[cfg(target_os = "linux")]' in threads and "libc::RTLD_NOLOAD" in threads
    assert not re.search(r"const RTLD_\w+", threads)
    simd = (SRC / "cpu" / "simd.rs").read_text()
    avx = simd[simd.index("mod avx") :]
    assert not re.search(r"\n    pub fn \w+", avx), "an AVX2 kernel is callable from safe code"


def test_no_panic_from_any_native_entry_on_garbage():
    x = torch.randn(2, 8, 7, 6)
    nested = torch.nested.nested_tensor([torch.randn(8, 7, 6), torch.randn(8, 5, 6)])
    block = mobileone_rs.MobileOneBlock(**DEPTHWISE)
    env = probes.call_env(x, block.options)
    state = observe.block_state(block, block.spec, mobileone_rs.SEBlock)
    spec = block.spec
    eval_plan = _plan_of(block.eval(), x)
    calls = [
        lambda: _native.plan(nested, state, env),
        lambda: _native.plan(x, {}, env),
        lambda: _native.plan(x, state, {"fast": 1}),
        lambda: _native.plan(x, {**state, "spec": (8, 8, 3)}, env),
        lambda: _native.plan(
            x, {**state, "body": {"kind": "branches", "convs": [1], "scale": None, "skip": None}}, env
        ),
        lambda: _native.plan(x, {**state, "body": {"kind": "fused", "conv": {"weight": x}}}, env),
        lambda: _native.plan(x, {**state, "body": {"kind": "nope"}}, env),
        lambda: _native.se_forward(x, {"kind": "se", "reduce": 1, "expand": 2, "plain": True}, 8, env),
        lambda: _native.se_forward(nested, {"kind": "none", "plain": True}, 8, env),
        lambda: _native.fuse_block(spec, [], None, None),
        lambda: _native.fuse_block(
            spec,
            [{"weight": x, "bn": {"weight": x, "bias": x, "running_mean": x, "running_var": x, "eps": 1e-5}}]
            * 3,
            None,
            None,
        ),
        lambda: _native.fuse_block(spec, [{"weight": x}], None, None),
        lambda: eval_plan.run(nested),
        lambda: eval_plan.activate(nested),
        lambda: _native.check_input(x.to(torch.complex64), spec, x, False),
        lambda: _native.yaml_mobileone_layers("backbone: [[-1, 1, MobileOne, [0, 0, 0]]]"),
    ]
    for call in calls:
        error = _error_of(call)
        assert error is not None
        _no_panic(error)
        assert isinstance(error, (TypeError, ValueError, RuntimeError, OverflowError, KeyError)), repr(error)


def test_panic_hook_is_silent_only_inside_native_calls(capfd):
    # A native call that fails must print nothing (no "thread panicked", no backtrace).
    os.environ.pop("RUST_BACKTRACE", None)
    with pytest.raises(mobileone_rs.MobileOneError):
        _native.fuse_block(mobileone_rs.MobileOneBlock(**DEPTHWISE).spec, [], None, None)
    assert "panicked" not in capfd.readouterr().err


class _Raised(Exception):
    """A Python exception raised from code libtorch calls back into."""


def _raise(*_args, **_kwargs):
    raise _Raised("from a callback")


@pytest.mark.parametrize("kwargs", [DEPTHWISE, POINTWISE], ids=["dw", "pw"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_python_exceptions_from_callbacks_come_back_as_themselves(kwargs, train):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Raising(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                _raise()
            return func(*args, **(kwargs or {}))

    block = mobileone_rs.MobileOneBlock(**kwargs).double().train(train)
    x = random_input((2, 8, 7, 6)).requires_grad_(True)
    with pytest.raises(_Raised), torch.autograd.graph.saved_tensors_hooks(_raise, lambda t: t):
        block(x)
    with pytest.raises(_Raised), Raising():
        block(x)


# Devices tch does not name (meta): tch reports them as MPS; messages must not


def test_meta_device_is_not_called_mps_and_a_meta_model_fuses():
    block = mobileone_rs.MobileOneBlock(16, 16, 3, padding=1, groups=16, use_se=True)
    with pytest.raises(mobileone_rs.InputTypeError, match="weights are on cpu") as raised:
        block(torch.zeros(2, 16, 5, 5, device="meta"))
    assert "Mps" not in str(raised.value)
    block = block.to("meta")  # shape inference on meta: forward and fuse as the reference does
    x = torch.zeros(2, 16, 5, 5, device="meta")
    assert block(x).shape == (2, 16, 5, 5)
    fused = mobileone_rs.reparameterize_model(block)
    assert fused.reparam_conv.weight.device.type == "meta"
    assert fused(x).shape == (2, 16, 5, 5)
