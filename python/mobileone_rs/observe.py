"""What a block's shell observes of its children at each call, as the named state the native
dispatcher reads (:mod:`mobileone_rs.state`).

A child that is not exactly torch's class running torch's own forward (see
:func:`mobileone_rs.probes.stock`) makes the body or SE opaque, with a reason naming it: only
the module path runs it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import probes
from .state import BlockState, BnState, Body, BranchState, ConvState, SeState

_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)
_MISSING = object()


class Opaque(Exception):
    """A child the dispatcher cannot model (the message names it)."""


def member(module: Any, group: str, name: str) -> Any:
    """``getattr(module, name, None)`` for a member of ``group`` (``"_parameters"``, ``"_buffers"``,
    ``"_modules"``), without ``Module.__getattr__``'s cost; anything set elsewhere still found."""
    value = module.__dict__[group].get(name, _MISSING)
    return getattr(module, name, None) if value is _MISSING else value


def child(module: Any, name: str) -> Any:
    """The child module ``name`` (or whatever the attribute holds, or None)."""
    return member(module, "_modules", name)


def _plain(*tensors: Any) -> bool:
    return all(t is None or type(t) in _PLAIN_TENSORS for t in tensors)


def _require_stock(module: Any, cls: type, name: str) -> None:
    if type(module) is not cls:
        raise Opaque(f"{name} is a {type(module).__name__}, not torch's nn.{cls.__name__}")
    if not probes.stock(module, cls):
        raise Opaque(f"{name} has its own forward (an instance attribute replaces torch's)")


def conv_state(conv: Any, name: str) -> ConvState:
    """An ``nn.Conv2d`` child."""
    _require_stock(conv, probes.CONV2D, name)
    weight, bias = member(conv, "_parameters", "weight"), member(conv, "_parameters", "bias")
    return {
        "weight": weight,
        "bias": bias,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "padding_mode": conv.padding_mode,
        "plain": not probes.hooked(conv) and _plain(weight, bias),
    }


def bn_state(bn: Any, name: str) -> BnState:
    """An ``nn.BatchNorm2d`` child."""
    _require_stock(bn, probes.BATCHNORM2D, name)
    weight, bias = member(bn, "_parameters", "weight"), member(bn, "_parameters", "bias")
    mean, var = member(bn, "_buffers", "running_mean"), member(bn, "_buffers", "running_var")
    count = member(bn, "_buffers", "num_batches_tracked")
    return {
        "weight": weight,
        "bias": bias,
        "running_mean": mean,
        "running_var": var,
        "num_batches_tracked": count,
        "momentum": bn.momentum,
        "eps": bn.eps,
        "training": bn.training,
        "track_running_stats": bn.track_running_stats,
        "plain": not probes.hooked(bn) and _plain(weight, bias, mean, var, count),
    }


def branch_state(branch: Any, name: str) -> BranchState:
    """A conv+BN branch: exactly ``nn.Sequential(conv, bn)`` in that order."""
    _require_stock(branch, probes.SEQUENTIAL, name)
    children = branch.__dict__["_modules"]
    if list(children) != ["conv", "bn"]:
        raise Opaque(f"{name} does not hold exactly conv then bn")
    return {
        "conv": conv_state(children["conv"], f"{name}.conv"),
        "bn": bn_state(children["bn"], f"{name}.bn"),
        "plain": not probes.hooked(branch),
    }


def se_state(se: Any, se_class: type) -> SeState:
    """The block's ``se`` child: ``nn.Identity``, our ``SEBlock``, or opaque."""
    if type(se) is probes.IDENTITY and probes.stock(se, probes.IDENTITY):
        return {"kind": "none", "plain": not probes.hooked(se)}
    if type(se) is not se_class or "forward" in se.__dict__:
        return {
            "kind": "opaque",
            "reason": f"se is a {type(se).__name__} (or has its own forward), not our SEBlock or nn.Identity",
        }
    try:
        reduce = conv_state(child(se, "reduce"), "se.reduce")
        expand = conv_state(child(se, "expand"), "se.expand")
    except Opaque as why:
        return {"kind": "opaque", "reason": str(why)}
    return {"kind": "se", "reduce": reduce, "expand": expand, "plain": not probes.hooked(se)}


def conv_branch_count(block: nn.Module, branches: int) -> int:
    """The number of conv branches the reference's forward loops over: ``num_conv_branches`` as
    it is now (it may have been edited), checked against ``rbr_conv``."""
    n = block.__dict__.get("num_conv_branches", _MISSING)
    if type(n) is not int or n < 1:
        raise Opaque(f"num_conv_branches is {n!r}, not a positive int")
    if n > branches:
        raise Opaque(
            f"num_conv_branches={n} but rbr_conv holds {branches} branches "
            "(the reference's forward raises IndexError)"
        )
    return n


def branches_body(block: nn.Module) -> Body:
    """An unfused block's branches, as its forward would use them."""
    convs = child(block, "rbr_conv")
    if type(convs) is not probes.MODULELIST:
        raise Opaque("rbr_conv is not torch's nn.ModuleList")
    listed = list(convs.__dict__["_modules"].values())
    n = conv_branch_count(block, len(listed))
    scale, skip = child(block, "rbr_scale"), child(block, "rbr_skip")
    return {
        "kind": "branches",
        "convs": [branch_state(b, f"rbr_conv.{i}") for i, b in enumerate(listed[:n])],
        "scale": None if scale is None else branch_state(scale, "rbr_scale"),
        "skip": None if skip is None else bn_state(skip, "rbr_skip"),
    }


def body(block: nn.Module) -> Body:
    """What the block's forward would run: the fused conv or the branches (or opaque)."""
    try:
        if block.inference_mode:
            return {"kind": "fused", "conv": conv_state(child(block, "reparam_conv"), "reparam_conv")}
        return branches_body(block)
    except Opaque as why:
        return {"kind": "opaque", "reason": str(why)}
    except AttributeError as why:  # a child deleted or replaced by a non-module
        return {"kind": "opaque", "reason": f"a child is missing: {why}"}


def block_state(block: nn.Module, spec: Any, se_class: type) -> BlockState:
    """Every child of a ``MobileOneBlock`` as the dispatcher sees it (read now)."""
    activation = child(block, "activation")
    plain = (
        type(activation) is probes.RELU
        and probes.stock(activation, probes.RELU)
        and not probes.hooked(activation)
    )
    return {
        "spec": spec,
        "body": body(block),
        "se": se_state(child(block, "se"), se_class),
        "activation_plain": plain,
    }
