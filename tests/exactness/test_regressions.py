"""Regression tests, one per way the fast paths once differed from the reference's module path (or
crashed): each reproduces the state or call and checks ours against the oracle now. float64 unless
the case is about another dtype.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import mobileone_rs
import pytest
import torch
import torch.autograd.forward_ad as fwad
from mobileone_rs import _native, observe, probes
from torch import nn

from tests import oracle
from tests._util import TOLERANCE, assert_close, build_pair, random_input

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


# 1 ---------------------------------------------------------------------------------------------


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


# 2 ---------------------------------------------------------------------------------------------


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


# 3 ---------------------------------------------------------------------------------------------


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


# 4 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_mode", [torch.enable_grad, torch.no_grad], ids=["grad", "no-grad"])
@pytest.mark.parametrize("fused", [False, True], ids=["eval", "fused"])
def test_forward_ad_through_depthwise_float32(fused, grad_mode):
    ours, reference = build_pair("MobileOneBlock", dtype=torch.float32, **DEPTHWISE)
    if fused:
        ours, reference = mobileone_rs.reparameterize_model(ours), oracle.reparameterize_model(reference)
    ours.eval(), reference.eval()
    x = random_input((2, 8, 7, 6), torch.float32)
    tangent = random_input((2, 8, 7, 6), torch.float32, seed=5)
    with grad_mode():
        (out, jvp), (out_ref, jvp_ref) = (torch.func.jvp(m, (x,), (tangent,)) for m in (ours, reference))
        with fwad.dual_level():
            got = fwad.unpack_dual(ours(fwad.make_dual(x, tangent))).tangent
    assert_close(out, out_ref, TOLERANCE[torch.float32], "output")
    assert_close(jvp, jvp_ref, TOLERANCE[torch.float32], "tangent")
    assert got is not None
    assert_close(got, jvp_ref, TOLERANCE[torch.float32], "dual tangent")


# 5 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cpu_autocast_output_dtype(low, train):
    ours, reference = build_pair("MobileOne", 8, 16, 2, 2, True, 1, dtype=torch.float32)
    for model in (ours, reference):
        model.train(train)
    x = random_input((2, 8, 16, 16), torch.float32)
    with torch.autocast("cpu", dtype=low):
        got, expected = ours(x), reference(x)
        block_got = ours.stage[0](x)
        block_expected = reference.stage[0](x)
    assert got.dtype == expected.dtype == low
    assert block_got.dtype == block_expected.dtype == low
    assert_close(got.float(), expected.float(), 5e-2, "autocast output")


# 6 ---------------------------------------------------------------------------------------------


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


# 7 ---------------------------------------------------------------------------------------------

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


# 8 ---------------------------------------------------------------------------------------------

SHAPE_EDITS = {
    "branch conv": lambda m: setattr(
        m.rbr_conv[0].conv, "weight", nn.Parameter(torch.randn(8, 1, 5, 5).double())
    ),
    "scale conv": lambda m: setattr(
        m.rbr_scale.conv, "weight", nn.Parameter(torch.randn(8, 2, 1, 1).double())
    ),
    "bn weight": lambda m: setattr(m.rbr_conv[1].bn, "weight", nn.Parameter(torch.randn(3).double())),
}


def _error_of(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the kind is what is compared
        return error
    return None


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


# 9 ---------------------------------------------------------------------------------------------


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


# 10 --------------------------------------------------------------------------------------------


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


# 11 --------------------------------------------------------------------------------------------


def test_block_built_under_inference_mode_then_trained():
    with torch.inference_mode():
        ours = mobileone_rs.MobileOneBlock(**DEPTHWISE)
        reference = oracle.copy_weights(ours, oracle.MobileOneBlock(**DEPTHWISE))
    x = torch.randn(2, 8, 7, 6)
    got, expected = _error_of(lambda: ours(x)), _error_of(lambda: reference(x))
    assert type(got) is type(expected) and str(got) == str(expected), (got, expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        DEPTHWISE,
        POINTWISE,
        {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 1, "groups": 4},
    ],
    ids=["dw", "pw", "grouped"],
)
def test_func_grad_through_a_training_block(kwargs):
    ours, reference = build_pair("MobileOneBlock", **kwargs)
    x = random_input((2, 8, 7, 6))

    def loss(model):
        def f(params, buffers, x):
            return torch.func.functional_call(model, (params, buffers), (x,)).square().sum()

        return f

    # Buffers captured from outside: the reference's BN mutates them, which torch.func refuses.
    errors = [
        _error_of(lambda m=m: torch.func.grad(loss(m))(dict(m.named_parameters()), {}, x))
        for m in (ours, reference)
    ]
    assert type(errors[0]) is type(errors[1]) and str(errors[0]) == str(errors[1]), errors
    # Buffers passed in, the functorch idiom: both train, with equal gradients and statistics.
    results = []
    for m in (ours, reference):
        buffers = {k: v.clone() for k, v in m.named_buffers()}
        results.append((torch.func.grad(loss(m))(dict(m.named_parameters()), buffers, x), buffers))
    for key, value in results[1][0].items():
        assert_close(results[0][0][key], value, F64, key)
    for key, value in results[1][1].items():
        assert_close(results[0][1][key], value, F64, key)


def test_expanded_running_mean():
    ours, reference = build_pair("MobileOneBlock", **DEPTHWISE)
    for model in (ours, reference):
        model.rbr_conv[0].bn.running_mean = torch.zeros(1, dtype=torch.float64).expand(8)
    _assert_same_step(ours, reference, random_input((2, 8, 7, 6)), "expanded running_mean")


# 12 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_mode", [torch.enable_grad, torch.no_grad], ids=["grad", "no-grad"])
@pytest.mark.parametrize("fused", [False, True], ids=["eval", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_vmap_over_an_eval_block(fused, dtype, grad_mode):
    ours, reference = build_pair("MobileOneBlock", dtype=dtype, **DEPTHWISE)
    if fused:
        ours, reference = mobileone_rs.reparameterize_model(ours), oracle.reparameterize_model(reference)
    ours.eval(), reference.eval()
    xs = random_input((3, 2, 8, 7, 6), dtype)
    with grad_mode():
        got, expected = torch.vmap(ours)(xs), torch.vmap(reference)(xs)
    assert_close(got, expected, TOLERANCE[dtype], "vmap")


# 13 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kwargs", [DEPTHWISE, DEPTHWISE_S2, POINTWISE], ids=["dw", "dw-s2", "pw"])
def test_non_reentrant_checkpoint(kwargs, train):
    ours, reference = build_pair("MobileOneBlock", **kwargs)
    results = []
    for model in (ours, reference):
        model.train(train)
        x = random_input((2, 8, 7, 6)).requires_grad_(True)
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
        (out * random_input(out.shape, seed=3)).sum().backward()
        results.append(
            {"output": out.detach(), "input.grad": x.grad, **{n: p.grad for n, p in model.named_parameters()}}
        )
    for key, value in results[1].items():
        assert_close(results[0][key], value, F64, key)
    _assert_same_buffers(ours, reference, "checkpoint")


# 14 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [DEPTHWISE, DEPTHWISE_S2, POINTWISE], ids=["dw", "dw-s2", "pw"])
def test_double_backward_in_training(kwargs):
    ours, reference = build_pair("MobileOneBlock", **kwargs)
    results = []
    for model in (ours, reference):
        model.train()
        x = random_input((2, 8, 7, 6)).requires_grad_(True)
        out = model(x)
        params = [p for p in model.parameters()]
        first = torch.autograd.grad(
            (out * random_input(out.shape, seed=3)).sum(), [x, *params], create_graph=True
        )
        penalty = sum(g.square().sum() for g in first)
        penalty.backward()
        results.append({"x.grad": x.grad, **{n: p.grad for n, p in model.named_parameters()}})
    for key, value in results[1].items():
        assert_close(results[0][key], value, F64, key)


# 15 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace_and_feature_extraction(train):
    from torchvision.models.feature_extraction import create_feature_extractor

    ours, reference = build_pair("MobileOne", 8, 16, 2, 2, True, 1)
    ours.train(train), reference.train(train)
    x = random_input((2, 8, 8, 8))
    graph = torch.fx.symbolic_trace(ours)
    assert any(n.op == "call_module" and "rbr_conv" in str(n.target) for n in graph.graph.nodes)
    with torch.no_grad():
        expected = reference(x)
        ours_copy = copy.deepcopy(ours)
        assert_close(torch.fx.symbolic_trace(ours_copy)(x), expected, F64, "fx")
    extractor = create_feature_extractor(copy.deepcopy(ours), return_nodes={"stage.1": "pw"})
    with torch.no_grad():
        assert_close(extractor(x)["pw"], reference.stage[:2](x), F64, "feature extractor")


def test_jit_trace_of_a_training_block():
    ours, reference = build_pair("MobileOneBlock", **DEPTHWISE)
    ours.train(), reference.train()
    x = random_input((2, 8, 7, 6))
    traced = torch.jit.trace(copy.deepcopy(ours), (x,), check_trace=False)
    assert_close(traced(x), reference(x), F64, "traced train block")


# 16 --------------------------------------------------------------------------------------------


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
