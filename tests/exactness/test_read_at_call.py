"""What the reference's forward reads at call time, ours reads too: an edited ``num_conv_branches``,
non-finite inputs on the eval paths, and constructor values of the wrong type (a yaml typo).

Expected values come from the oracle (the reference's math in plain PyTorch) given the same edit.
"""

from __future__ import annotations

import mobileone_rs
import pytest
import torch

from tests import oracle
from tests._util import build_pair, random_input

BOUND = 1e-10
DW = {
    "in_channels": 8,
    "out_channels": 8,
    "kernel_size": 3,
    "padding": 1,
    "groups": 8,
    "num_conv_branches": 3,
}
PW = {"in_channels": 8, "out_channels": 8, "kernel_size": 1, "num_conv_branches": 3}


def _close(got, want, what):
    torch.testing.assert_close(
        got, want, rtol=0, atol=BOUND * max(want.abs().max().item(), 1e-300), msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize("kwargs", [DW, PW], ids=["depthwise", "pointwise"])
def test_edited_num_conv_branches_is_honoured_on_every_path(kwargs):
    ours, reference = build_pair("MobileOneBlock", **kwargs)
    ours.num_conv_branches = reference.num_conv_branches = 2
    x = random_input((2, 8, 7, 6))
    ours.train(), reference.train()
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert ours.forward_path(xo) != "module", ours.forward_path(xo, explain=True)
    out, want = ours(xo), reference(xr)
    _close(out, want.detach(), "train output")
    out.square().sum().backward(), want.square().sum().backward()
    _close(xo.grad, xr.grad, "input gradient")
    assert ours.rbr_conv[2].conv.weight.grad is None  # the third branch is not used
    ours.eval(), reference.eval()
    with torch.no_grad():
        assert ours.forward_path(x).startswith("folded")
        _close(ours(x), reference(x), "eval output")
        fused, fused_ref = mobileone_rs.reparameterize_model(ours), oracle.reparameterize_model(reference)
        _close(fused(x), fused_ref(x), "fused output")


@pytest.mark.parametrize("value, error", [(4, IndexError), ("3", TypeError), (0, None)])
def test_num_conv_branches_the_reference_cannot_loop_over_takes_the_module_path(value, error):
    ours, reference = build_pair("MobileOneBlock", **DW)
    ours.num_conv_branches = reference.num_conv_branches = value
    x = random_input((2, 8, 7, 6))
    assert ours.forward_path(x) == "module"
    if error is None:  # zero branches: the reference sums the scale and skip branches only
        _close(ours(x).detach(), reference(x).detach(), "output")
        return
    for model in (ours, reference):
        with pytest.raises(error):
            model(x)


def _nonfinite_pattern(t):
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


def _assert_reference_pattern(got, want, bound):
    """NaN, +inf and -inf where the reference has them, the finite values within ``bound``."""
    for have, expected, what in zip(
        _nonfinite_pattern(got), _nonfinite_pattern(want), ("NaN", "+inf", "-inf")
    ):
        assert torch.equal(have, expected), f"{what} positions differ from the reference's"
    finite = torch.isfinite(want)
    torch.testing.assert_close(
        got[finite], want[finite], rtol=0, atol=bound * want[finite].abs().max().item()
    )


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("kwargs", [DW, PW], ids=["depthwise", "pointwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_inputs_give_the_reference_nan_inf_pattern_in_eval(kwargs, fused, value, dtype):
    ours, reference = build_pair("MobileOneBlock", dtype=dtype, **kwargs)
    ours.eval(), reference.eval()
    if fused:
        ours, reference = mobileone_rs.reparameterize_model(ours), oracle.reparameterize_model(reference)
    x = random_input((2, 8, 7, 6), dtype)
    x[0, 3, 2, 4] = value
    x[1, 5, 0, 0] = -value
    with torch.no_grad():
        got, want = ours(x), reference(x)
    _assert_reference_pattern(got, want, 1e-10 if dtype == torch.float64 else 1e-4)


def _set(block, name, value, index):
    with torch.no_grad():
        tensor = block.get_parameter(name) if name.endswith(("weight", "bias")) else block.get_buffer(name)
        tensor.view(-1)[index] = value


_WEIGHTS = ["rbr_conv.0.conv.weight", "rbr_conv.1.bn.weight", "rbr_conv.2.bn.running_var", "rbr_skip.bias"]
_SCALE = ["rbr_scale.conv.weight", "rbr_scale.bn.running_mean"]  # depthwise 3x3 only: 1x1 has no scale


@pytest.mark.parametrize(
    "kwargs, name",
    [pytest.param(DW, n, id=f"depthwise-{n}") for n in _WEIGHTS + _SCALE]
    + [pytest.param(PW, n, id=f"pointwise-{n}") for n in _WEIGHTS],
)
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_non_finite_weights_give_the_reference_nan_inf_pattern_in_eval(kwargs, fused, value, name):
    """A non-finite weight or BN statistic: the CPU kernel would multiply the zero padding by it
    and the fold would spread it differently than the reference's branches do."""
    ours, reference = build_pair("MobileOneBlock", dtype=torch.float32, **kwargs)
    ours.eval(), reference.eval()
    for block in (ours, reference):
        _set(block, name, value, 1)
    if fused:  # the reference's own fuse of the same state; ours refuses it (FuseOverflowError)
        reference = oracle.reparameterize_model(reference)
        ours = mobileone_rs.MobileOneBlock(**kwargs, inference_mode=True).eval()
        ours.load_state_dict(reference.state_dict())
    x = random_input((2, 8, 7, 6), torch.float32)
    with torch.no_grad():
        got, want = ours(x), reference(x)
    _assert_reference_pattern(got, want, 1e-4)


@pytest.mark.parametrize("kwargs", [DW, PW], ids=["depthwise", "pointwise"])
def test_a_fold_that_overflows_where_the_reference_stays_finite_takes_the_module_path(kwargs):
    ours, reference = build_pair("MobileOneBlock", dtype=torch.float32, **kwargs)
    ours.eval(), reference.eval()
    with torch.no_grad():
        for block in (ours, reference):
            block.rbr_conv[0].conv.weight.fill_(1e10)  # folded: 1e10 * 1e30 overflows float32
            block.rbr_conv[0].bn.weight.fill_(1e30)
            block.rbr_conv[0].bn.running_var.fill_(1.0)
        x = random_input((2, 8, 7, 6), torch.float32) * 1e-20
        assert ours.forward_path(x) == "module", ours.forward_path(x, explain=True)
        got, want = ours(x), reference(x)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "args, name",
    [
        ((256, 256, 10, 4, "Flase", 1), "use_se"),  # a yaml typo: the row [256, 10, 4, Flase, 1]
        ((16, 32, 2, 4, 1, 0), "use_se"),
        ((16, 32, 2.0, 4), "num_blocks_per_stage"),
        ((16, 32, True, 4), "num_blocks_per_stage"),
        ((16, 32, 2, 4, False, 0, "no"), "inference_mode"),
    ],
)
def test_stage_arguments_of_the_wrong_type_are_refused_by_name(args, name):
    with pytest.raises(mobileone_rs.ArgumentTypeError, match=name) as raised:
        mobileone_rs.MobileOne(*args)
    assert isinstance(raised.value, mobileone_rs.ConfigError) and isinstance(raised.value, TypeError)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"use_se": "False"}, "use_se"),
        ({"use_se": 1}, "use_se"),
        ({"kernel_size": 3.0}, "kernel_size"),
        ({"groups": True}, "groups"),
        ({"inference_mode": None}, "inference_mode"),
        ({"fast": 1}, "fast"),
        ({"low_memory": "no"}, "low_memory"),
        ({"cpu_kernel": None}, "cpu_kernel"),
    ],
)
def test_block_arguments_of_the_wrong_type_are_refused_by_name(kwargs, name):
    with pytest.raises(mobileone_rs.ArgumentTypeError, match=name):
        mobileone_rs.MobileOneBlock(**{**DW, **kwargs})


@pytest.mark.parametrize("attribute", ["fast", "low_memory", "cpu_kernel"])
@pytest.mark.parametrize("value", [0, None, "False"], ids=["0", "None", "str"])
def test_options_set_to_values_that_are_not_bools_are_refused_by_name(attribute, value):
    block = mobileone_rs.MobileOneBlock(**DW)
    setattr(block, attribute, value)
    x = random_input((2, 8, 7, 6))
    with pytest.raises(mobileone_rs.ArgumentTypeError, match=f"MobileOneBlock.{attribute}"):
        block(x)


@pytest.mark.parametrize("argument", ["enabled", "low_memory", "cpu_kernel"])
def test_fast_paths_scope_refuses_values_that_are_not_bools(argument):
    with pytest.raises(mobileone_rs.ArgumentTypeError, match=f"{argument}="):
        mobileone_rs.fast_paths(**{argument: "no"}).__enter__()
    with mobileone_rs.fast_paths(**{argument: None}):  # None keeps each block's own option
        assert mobileone_rs.MobileOneBlock(**DW).double().forward_path(random_input((2, 8, 7, 6))) != "module"
