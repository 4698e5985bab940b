"""States, configs and assertions shared by the regression tests (test_module_states,
test_pytorch_tools, test_native_boundary): each case reproduces a state or call in which a fast path
once differed from the reference's module path, or crashed, and checks ours against the oracle."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tests._util import TOLERANCE, assert_close, random_input

F64 = TOLERANCE[torch.float64]
DEPTHWISE = {
    "in_channels": 8,
    "out_channels": 8,
    "kernel_size": 3,
    "padding": 1,
    "groups": 8,
    "num_conv_branches": 3,
}
DEPTHWISE_S2 = dict(DEPTHWISE, stride=2)
POINTWISE = {"in_channels": 8, "out_channels": 8, "kernel_size": 1, "num_conv_branches": 2}
SRC = Path(__file__).resolve().parents[2] / "src"


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _assert_same_buffers(ours, reference, what=""):
    got, expected = dict(ours.named_buffers()), dict(reference.named_buffers())
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        torch.testing.assert_close(
            got[key],
            want,
            rtol=0,
            atol=F64 * max(1.0, want.abs().nan_to_num().max().item()) if want.is_floating_point() else 0,
            equal_nan=True,
            msg=f"{what} {key}",
        )


def _step(model, x, seed=2):
    """``train_step`` without ``model.train()``: the modules keep the modes the test gave them."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    (out * random_input(out.shape, out.dtype, seed)).sum().backward()
    return {
        "output": out.detach(),
        "input.grad": x.grad,
        **{f"{name}.grad": p.grad for name, p in model.named_parameters()},
    }


def _assert_same_step(ours, reference, x, what):
    got, expected = _step(ours, x), _step(reference, x)
    for key, value in expected.items():
        if value is None:
            assert got[key] is None, key
            continue
        assert_close(got[key], value, F64, f"{what} {key}")
    _assert_same_buffers(ours, reference, what)


def _no_panic(error: BaseException) -> None:
    assert type(error).__name__ != "PanicException", repr(error)
    assert "panicked" not in str(error) and "RUST_BACKTRACE" not in str(error), str(error)


def _error_of(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the kind is what is compared
        return error
    return None
