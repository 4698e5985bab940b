"""Fast paths against the reference under PyTorch's tools: forward AD, autocast, torch.func,
vmap, checkpointing, double backward, FX and jit tracing.
Each test reproduces a case that once differed from the reference (or crashed); float64 unless the case
is about another dtype.
"""

from __future__ import annotations

import copy

import mobileone_rs
import pytest
import torch
import torch.autograd.forward_ad as fwad

from tests import oracle
from tests._util import TOLERANCE, assert_close, build_pair, random_input
from tests.exactness._regression_helpers import (
    DEPTHWISE,
    DEPTHWISE_S2,
    F64,
    POINTWISE,
    _assert_same_buffers,
    _assert_same_step,
    _error_of,
)

# Forward-mode AD


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


# CPU autocast


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


# Blocks made under inference mode, torch.func, expanded buffers


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


# vmap


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


# Activation checkpointing


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


# Double backward


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


# FX and jit tracing


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
