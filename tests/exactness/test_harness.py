"""Differential harness: block configs x module-state perturbations x optimizer steps against the
oracle (the reference's math in plain PyTorch), float64 <= 1e-10 on outputs, input and parameter
gradients and every buffer after every step.

Each perturbation is applied identically to ours and the oracle's copy (same weights): what the
reference's module-by-module forward does with that state is the expected behaviour, whichever path
the dispatcher picks for ours. Cases: len(CONFIGS) x len(PERTURBATIONS) unfused and
len(CONFIGS) x len(FUSED_PERTURBATIONS) fused, each over STEPS optimizer steps.
"""

from __future__ import annotations

import contextlib

import mobileone_rs
import pytest
import torch
from torch import nn

from tests._util import build_pair, random_input

BOUND = 1e-10
STEPS = 3

# (name, constructor kwargs, input shape): every branch kind, the train paths (gram, depthwise
# stride 1 and 2) and the module-only geometries (dense 3x3, grouped, dilated 5x5).
CONFIGS = {
    "depthwise-s1": (
        {
            "in_channels": 8,
            "out_channels": 8,
            "kernel_size": 3,
            "padding": 1,
            "groups": 8,
            "num_conv_branches": 3,
        },
        (2, 8, 7, 6),
    ),
    "depthwise-s2-se": (
        {
            "in_channels": 16,
            "out_channels": 16,
            "kernel_size": 3,
            "stride": 2,
            "padding": 1,
            "groups": 16,
            "num_conv_branches": 2,
            "use_se": True,
        },
        (2, 16, 9, 8),
    ),
    "pointwise-skip": (
        {"in_channels": 8, "out_channels": 8, "kernel_size": 1, "num_conv_branches": 2},
        (2, 8, 5, 6),
    ),
    "pointwise-wider-se": (
        {"in_channels": 8, "out_channels": 16, "kernel_size": 1, "num_conv_branches": 3, "use_se": True},
        (2, 8, 5, 5),
    ),
    "dense-3x3": (
        {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1, "num_conv_branches": 2},
        (2, 4, 6, 7),
    ),
    "grouped-3x3-skip": (
        {
            "in_channels": 8,
            "out_channels": 8,
            "kernel_size": 3,
            "padding": 1,
            "groups": 4,
            "num_conv_branches": 2,
        },
        (2, 8, 6, 6),
    ),
    "dilated-5x5-depthwise": (
        {
            "in_channels": 8,
            "out_channels": 8,
            "kernel_size": 5,
            "padding": 4,
            "dilation": 2,
            "groups": 8,
            "num_conv_branches": 1,
        },
        (2, 8, 9, 9),
    ),
}


def _bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _freeze_all_bn(model):
    for bn in _bns(model):
        bn.eval()


def _freeze_some_bn(model):
    for i, bn in enumerate(_bns(model)):
        if i % 2:
            bn.eval()


def _untracked(model):
    for bn in _bns(model):
        bn.track_running_stats = False


def _cumulative(model):
    for bn in _bns(model):
        bn.momentum = None


def _own_eps_momentum(model):
    for i, bn in enumerate(_bns(model)):
        bn.eps, bn.momentum = 10.0 ** -(i % 4 + 2), 0.03 * (i + 1)


def _frozen_params(model):
    for i, p in enumerate(model.parameters()):
        if i % 3 == 0:
            p.requires_grad_(False)


def _hooked_child(model):
    bn = _bns(model)[-1]
    bn.register_forward_hook(lambda module, args, out: out * 1.0)


def _reflect_branch(model):
    model.rbr_conv[0].conv.padding_mode = "reflect" if model.kernel_size > 1 else "zeros"


def _eval_mode(model):
    model.eval()


# name -> (applied to both models, input transform, context of every step, train mode)
PERTURBATIONS = {
    "plain": (None, None, None),
    "frozen-bn": (_freeze_all_bn, None, None),
    "mixed-bn": (_freeze_some_bn, None, None),
    "untracked-bn": (_untracked, None, None),
    "cumulative-momentum": (_cumulative, None, None),
    "own-eps-momentum": (_own_eps_momentum, None, None),
    "frozen-params": (_frozen_params, None, None),
    "hooked-child": (_hooked_child, None, None),
    "reflect-padding-branch": (_reflect_branch, None, None),
    "channels-last-input": (None, lambda x: x.to(memory_format=torch.channels_last), None),
    "strided-input": (None, lambda x: torch.cat([x, x], dim=3)[..., ::2], None),
    "eval-with-grad": (_eval_mode, None, None),
    "no-grad-training": (None, None, torch.no_grad),
}


def _buffers(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def _step(model, x, step, ctx, opt):
    """One step: forward, a fixed loss, backward (when grad is on), SGD. Returns what to compare."""
    x = x.detach().clone().requires_grad_(ctx is None)
    with ctx() if ctx else contextlib.nullcontext():
        out = model(x)
        if ctx is None:
            opt.zero_grad()
            target = random_input(out.shape, out.dtype, seed=100 + step)
            (out - target).square().mean().backward()
    result = {"output": out.detach(), "input.grad": x.grad}
    result.update({f"{n}.grad": p.grad for n, p in model.named_parameters()})
    if ctx is None:
        opt.step()
    result.update({f"{n} (after step)": b for n, b in _buffers(model).items()})
    result.update({f"{n} (after step)": p.detach().clone() for n, p in model.named_parameters()})
    return result


def _compare(got: dict, expected: dict, where: str) -> None:
    assert got.keys() == expected.keys(), where
    for key, want in expected.items():
        have = got[key]
        if want is None or have is None:
            assert want is None and have is None, f"{where} {key}: {have is None} vs {want is None}"
            continue
        assert have.shape == want.shape and have.dtype == want.dtype, f"{where} {key}"
        if want.dtype.is_floating_point:
            scale = max(want.abs().nan_to_num().max().item(), 1e-300) if want.numel() else 1.0
            torch.testing.assert_close(
                have,
                want,
                rtol=0,
                atol=BOUND * scale,
                equal_nan=True,
                msg=lambda m, k=key: f"{where} {k}: {m}",
            )
        else:
            assert torch.equal(have, want), f"{where} {key}: {have} != {want}"


def _run(ours, reference, shape, perturbation, where):
    """STEPS optimizer steps of both models under one perturbation, compared after each."""
    apply, transform, ctx = PERTURBATIONS[perturbation]
    if apply is not None:
        apply(ours), apply(reference)
    x = random_input(shape)
    if transform is not None:
        x = transform(x)
    opts = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (ours, reference)
    ]
    for step in range(STEPS):
        got = _step(ours, x, step, ctx, opts[0])
        expected = _step(reference, x, step, ctx, opts[1])
        _compare(got, expected, f"{where}/{perturbation} step {step}")


@pytest.mark.parametrize("perturbation", list(PERTURBATIONS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_block_matches_oracle_under_perturbation(config, perturbation):
    kwargs, shape = CONFIGS[config]
    ours, reference = build_pair("MobileOneBlock", **kwargs)
    ours.train(), reference.train()
    _run(ours, reference, shape, perturbation, config)


FUSED_PERTURBATIONS = ["plain", "channels-last-input", "strided-input", "no-grad-training"]


@pytest.mark.parametrize("perturbation", FUSED_PERTURBATIONS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fused_block_matches_oracle(config, perturbation):
    kwargs, shape = CONFIGS[config]
    ours, reference = build_pair("MobileOneBlock", **kwargs)
    ours, reference = mobileone_rs.reparameterize_model(ours), _seed_fused(reference)
    _run(ours, reference, shape, perturbation, f"fused {config}")


def _seed_fused(reference):
    """The oracle fused, with its parameters trainable again (the reference detaches them; ours keep
    them trainable, so both train the same way)."""
    from tests import oracle

    fused = oracle.reparameterize_model(reference)
    for p in fused.parameters():
        p.requires_grad_(True)
    return fused
