"""Fast paths against the reference when modules are in states a config does not set: BN
modes and flags, edited conv attributes, wrong-shaped parameters, empty and NaN batches.
Each test reproduces a case that once differed from the reference (or crashed); float64 unless the case
is about another dtype.
"""

from __future__ import annotations

import copy

import mobileone_rs
import pytest
import torch
from torch import nn

from tests import oracle
from tests._util import assert_close, build_pair, random_input
from tests.exactness._regression_helpers import (
    DEPTHWISE,
    DEPTHWISE_S2,
    F64,
    POINTWISE,
    _assert_same_buffers,
    _assert_same_step,
    _bns,
    _error_of,
    _no_panic,
)

# BN modes set per module: frozen BNs in a training model, training BNs in an eval model


@pytest.mark.parametrize("kwargs", [DEPTHWISE, DEPTHWISE_S2, POINTWISE], ids=["dw", "dw-s2", "pw"])
def test_frozen_bn_in_a_training_model(kwargs):
    ours, reference = build_pair("MobileOneBlock", **kwargs)
    for model in (ours, reference):
        model.train()
        for bn in _bns(model):
            bn.eval()
    x = random_input((2, 8, 7, 6))
    before = copy.deepcopy(dict(ours.named_buffers()))
    _assert_same_step(ours, reference, x, "frozen BN")
    for key, value in before.items():
        assert torch.equal(dict(ours.named_buffers())[key], value), f"frozen {key} moved"


@pytest.mark.parametrize("kwargs", [DEPTHWISE, POINTWISE], ids=["dw", "pw"])
def test_eval_model_with_some_bns_training(kwargs):
    ours, reference = build_pair("MobileOneBlock", **kwargs)
    for model in (ours, reference):
        model.eval()
        _bns(model)[0].train()
    x = random_input((2, 8, 7, 6))
    with torch.no_grad():
        assert_close(ours(x), reference(x), F64, "mixed BN eval")
    _assert_same_buffers(ours, reference, "mixed BN eval")


# BNs that track no running statistics


@pytest.mark.parametrize("kwargs", [DEPTHWISE, POINTWISE], ids=["dw", "pw"])
def test_untracked_bn_keeps_its_buffers(kwargs):
    ours, reference = build_pair("MobileOneBlock", **kwargs)
    for model in (ours, reference):
        for bn in _bns(model):
            bn.track_running_stats = False
    before = copy.deepcopy(dict(ours.named_buffers()))
    _assert_same_step(ours, reference, random_input((2, 8, 7, 6)), "untracked BN")
    for key, value in before.items():
        assert torch.equal(dict(ours.named_buffers())[key], value), f"untracked {key} moved"


# BN flags set to values that are not bools: torch's forward reads them as truthy


@pytest.mark.parametrize(
    "flag, value, train",
    [
        ("training", 1, False),
        ("training", 0, True),
        ("track_running_stats", 0, True),
        ("training", None, True),
    ],
    ids=["training=1-in-eval", "training=0-in-train", "track_running_stats=0", "training=None"],
)
@pytest.mark.parametrize("kwargs", [DEPTHWISE, POINTWISE], ids=["dw", "pw"])
def test_bn_flags_that_are_not_bools_take_the_module_path(kwargs, flag, value, train):
    ours, reference = build_pair("MobileOneBlock", **kwargs)
    for model in (ours, reference):
        model.train(train)
        setattr(_bns(model)[0], flag, value)
    x = random_input((2, 8, 7, 6))
    name, why = ours.forward_path(x, explain=True)
    assert name == "module" and "not a bool" in why, why
    _assert_same_step(ours, reference, x, f"{flag}={value!r}")


# BNs sharing running statistics (tied buffers): the reference updates a shared buffer once per BN,
# skip first, then scale, then the conv branches


@pytest.mark.parametrize("buffer", ["running_mean", "running_var", "num_batches_tracked"])
@pytest.mark.parametrize("kwargs", [DEPTHWISE, POINTWISE], ids=["dw", "pw"])
def test_bns_sharing_running_statistics_take_the_module_path(kwargs, buffer):
    ours, reference = build_pair("MobileOneBlock", **kwargs)
    for model in (ours, reference):
        model.train()
        setattr(model.rbr_conv[0].bn, buffer, getattr(model.rbr_skip, buffer))
    x = random_input((2, 8, 7, 6))
    name, why = ours.forward_path(x, explain=True)
    assert name == "module" and "share running statistics" in why, why
    for _ in range(2):
        _assert_same_step(ours, reference, x, f"shared {buffer}")


# One batch statistic per channel, whatever the input's shape


def _outcome(model, x):
    try:
        return ("ok", model(x).detach())
    except ValueError as error:
        return ("ValueError", str(error))


@pytest.mark.parametrize("shape", [(1, 8, 2, 2), (1, 8, 1, 2), (1, 8, 1, 1), (2, 8, 1, 1)], ids=str)
@pytest.mark.parametrize("kwargs", [DEPTHWISE, DEPTHWISE_S2, POINTWISE], ids=["dw", "dw-s2", "pw"])
def test_one_value_per_channel_per_bn(kwargs, shape):
    ours, reference = build_pair("MobileOneBlock", **kwargs)
    ours.train(), reference.train()
    x = random_input(shape)
    got, expected = _outcome(ours, x), _outcome(reference, x)
    assert got[0] == expected[0], (got, expected)
    if got[0] == "ok":
        assert_close(got[1], expected[1], F64, "output")
    else:
        assert "more than 1 value per channel" in got[1]
    _assert_same_buffers(ours, reference, "one value per channel")


# NaN in a training batch


@pytest.mark.parametrize("kwargs", [DEPTHWISE, POINTWISE], ids=["dw", "pw"])
def test_nan_input_reaches_the_statistics_as_in_the_reference(kwargs):
    ours, reference = build_pair("MobileOneBlock", **kwargs)
    ours.train(), reference.train()
    x = random_input((2, 8, 7, 6))
    x[0, 3, 2, 2] = float("nan")
    with torch.no_grad():
        got, expected = ours(x), reference(x)
    torch.testing.assert_close(
        got, expected, rtol=0, atol=F64 * expected.abs().nan_to_num().max().item(), equal_nan=True
    )
    _assert_same_buffers(ours, reference, "NaN input")
    skip = ours.rbr_skip.running_var
    assert skip[3].isnan() and not skip[torch.arange(8) != 3].isnan().any()


# Conv attributes edited in place

EDITS = {
    "branch padding_mode": lambda m: setattr(m.rbr_conv[1].conv, "padding_mode", "reflect"),
    "branch dilation": lambda m: (
        setattr(m.rbr_conv[0].conv, "dilation", (2, 2)),
        setattr(m.rbr_conv[0].conv, "padding", (2, 2)),
    ),
    "scale padding": lambda m: setattr(m.rbr_scale.conv, "padding", (1, 1)),
}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_conv_attributes_edited_in_place(edit, train):
    ours, reference = build_pair("MobileOneBlock", **DEPTHWISE)
    for model in (ours, reference):
        EDITS[edit](model)
        model.train(train)
    x = random_input((2, 8, 7, 6))
    if edit == "scale padding":  # a padded 1x1 conv's output is larger: both must refuse to add
        for model in (ours, reference):
            with pytest.raises(RuntimeError):
                model(x)
        return
    if train:
        _assert_same_step(ours, reference, x, edit)
    else:
        with torch.no_grad():
            assert_close(ours(x), reference(x), F64, edit)
    with pytest.raises(mobileone_rs.ConfigError, match="re-parameterize"):
        ours.reparameterize()


@pytest.mark.parametrize("edit", ["padding_mode", "dilation"])
def test_reparam_conv_attributes_edited_in_place(edit):
    ours, reference = build_pair("MobileOneBlock", **DEPTHWISE)
    ours, reference = mobileone_rs.reparameterize_model(ours), oracle.reparameterize_model(reference)
    for model in (ours, reference):
        if edit == "padding_mode":
            model.reparam_conv.padding_mode = "circular"
        else:
            model.reparam_conv.dilation, model.reparam_conv.padding = (2, 2), (2, 2)
    x = random_input((2, 8, 7, 6))
    with torch.no_grad():
        assert_close(ours(x), reference(x), F64, edit)


# Parameters of the wrong shape

SHAPE_EDITS = {
    "branch conv": lambda m: setattr(
        m.rbr_conv[0].conv, "weight", nn.Parameter(torch.randn(8, 1, 5, 5).double())
    ),
    "scale conv": lambda m: setattr(
        m.rbr_scale.conv, "weight", nn.Parameter(torch.randn(8, 2, 1, 1).double())
    ),
    "bn weight": lambda m: setattr(m.rbr_conv[1].bn, "weight", nn.Parameter(torch.randn(3).double())),
}


@pytest.mark.parametrize("edit", list(SHAPE_EDITS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_wrong_shaped_parameters_raise_as_in_the_reference(edit, train):
    ours, reference = build_pair("MobileOneBlock", **DEPTHWISE)
    for model in (ours, reference):
        SHAPE_EDITS[edit](model)
        model.train(train)
    x = random_input((2, 8, 7, 6))
    got, expected = _error_of(lambda: ours(x)), _error_of(lambda: reference(x))
    assert expected is not None and got is not None, (got, expected)
    _no_panic(got)
    assert isinstance(got, (type(expected), mobileone_rs.MobileOneError)), (got, expected)


def test_wrong_shaped_reparam_conv():
    ours = mobileone_rs.reparameterize_model(build_pair("MobileOneBlock", **DEPTHWISE)[0])
    ours.reparam_conv.weight = nn.Parameter(torch.randn(8, 2, 3, 3).double())
    with pytest.raises(RuntimeError) as info:
        ours(random_input((2, 8, 7, 6)))
    _no_panic(info.value)


# Empty batches


@pytest.mark.parametrize("state", ["train", "eval", "fused"])
@pytest.mark.parametrize("kwargs", [DEPTHWISE, POINTWISE], ids=["dw", "pw"])
def test_empty_batch(kwargs, state):
    ours, reference = build_pair("MobileOneBlock", dtype=torch.float32, **kwargs)
    if state == "fused":
        ours, reference = mobileone_rs.reparameterize_model(ours), oracle.reparameterize_model(reference)
    for model in (ours, reference):
        model.train(state == "train")
    x = torch.zeros(0, 8, 7, 6)
    with torch.no_grad():
        got, expected = ours(x), reference(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    _assert_same_buffers(ours, reference, "empty batch")


# BN eps of zero


@pytest.mark.parametrize("kwargs", [DEPTHWISE, POINTWISE], ids=["dw", "pw"])
def test_zero_eps_in_training_behaves_as_in_the_reference(kwargs):
    """torch 2.10+ refuses ``eps = 0`` in a training BatchNorm (``ValueError``); torch 2.9 computes
    with it. Whichever this torch does, ours does the same, with the same side effects."""
    ours, reference = build_pair("MobileOneBlock", **kwargs)
    for model in (ours, reference):
        model.train()
        _bns(model)[0].eps = 0.0
    x = random_input((2, 8, 7, 6))
    try:
        expected = reference(x).detach()
    except ValueError as err:
        assert "eps must be positive" in str(err)
        with pytest.raises(ValueError, match="eps must be positive"):
            ours(x)
    else:
        torch.testing.assert_close(ours(x).detach(), expected, rtol=0, atol=1e-10, equal_nan=True)
    _assert_same_buffers(ours, reference, "eps 0")
