"""The autograd Function of the exact training paths: the branch sum computed in Rust without
storing any branch output, with an analytic backward that runs from the forward's plan."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class NonFinite(Exception):
    """The batch statistics were not finite: nothing was updated; the module path runs."""


class TrainBranchSum(torch.autograd.Function):
    """The exact train-time branch sum of a block (before SE and ReLU).

    The forward runs one conv folded from the batch statistics (``plan.train_forward``); the
    backward is analytic (``plan.train_backward``) on the same plan: no second dispatch. A gradient
    of the gradient (``create_graph=True``) differentiates the reference's math instead.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, plan: Any, *params: torch.Tensor) -> torch.Tensor:
        result = plan.train_forward(x)
        if result is None:
            raise NonFinite
        out, saved = result
        ctx.plan = plan
        ctx.num_params = len(params)
        ctx.save_for_backward(x, *params, *saved)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *rest = ctx.saved_tensors
        params, saved = rest[: ctx.num_params], rest[ctx.num_params :]
        if not torch.is_grad_enabled():
            grads = ctx.plan.train_backward(grad, x, saved)
            if grads is not None:
                return (grads[0], None, *grads[1:])
        return _differentiate(ctx, x, params, grad)


def reference_branch_sum(x: torch.Tensor, params: list[torch.Tensor], plan: Any) -> torch.Tensor:
    """The reference's train-time branch sum as a function of the input and the parameters (batch
    statistics, no running-statistics update), in the parameter order of ``plan.parameters()``."""
    spec, eps = plan.spec, plan.batch_norm_eps()
    n = spec.num_conv_branches
    s, p, d, g = spec.stride, spec.padding, spec.dilation, spec.groups

    def conv_bn(i: int, padding: int, dilation: int) -> torch.Tensor:
        w, gamma, beta = params[3 * i : 3 * i + 3]
        y = F.conv2d(x, w, None, s, padding, dilation, g)
        return F.batch_norm(y, None, None, gamma, beta, True, 0.0, eps[i])

    out: Any = 0
    if spec.has_skip:
        gamma, beta = params[-2:]
        out = F.batch_norm(x, None, None, gamma, beta, True, 0.0, eps[-1])
    if spec.has_scale:
        out = conv_bn(n, 0, 1) + out
    for i in range(n):
        out = out + conv_bn(i, p, d)
    return out


def _differentiate(ctx: Any, x: torch.Tensor, params: list[torch.Tensor], grad: torch.Tensor):
    """The backward by autograd through the reference's math: differentiable itself when the outer
    backward builds a graph (``create_graph=True``)."""
    needs = ctx.needs_input_grad
    inputs = [x, *params]
    wanted = [needs[0], *needs[2:]]
    with torch.enable_grad():
        out = reference_branch_sum(x, params, ctx.plan)
        targets = [t for t, want in zip(inputs, wanted) if want]
        got = iter(
            torch.autograd.grad(out, targets, grad, create_graph=torch.is_grad_enabled(), allow_unused=True)
        )
    grads = [next(got) if want else None for want in wanted]
    return (grads[0], None, *grads[1:])
