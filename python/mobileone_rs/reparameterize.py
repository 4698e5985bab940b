"""Re-parameterization (arXiv 2206.04040, RepVGG 2101.03697): fold every branch of a block into one
conv, and fuse whole models for inference.

The fold itself runs in Rust (``_native.fuse_block``) in at least float32; here the block's
branches are read by name and the fused conv is put in place.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import _native
from .state import FoldBn, FoldBranch

_BRANCH_NAMES = ("rbr_conv", "rbr_scale", "rbr_skip")


def fold_bn(bn: Any) -> FoldBn:
    """What the fold needs of any BatchNorm-like module (running statistics only)."""
    if getattr(bn, "running_mean", None) is None:
        raise _native.ConfigError(
            f"cannot re-parameterize {type(bn).__name__} without running statistics "
            "(track_running_stats=False): its eval output depends on the batch"
        )
    ones = torch.ones_like(bn.running_mean)
    weight = bn.weight if bn.weight is not None else ones
    bias = bn.bias if bn.bias is not None else torch.zeros_like(ones)
    return {
        "weight": weight,
        "bias": bias,
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
        "eps": float(bn.eps),
    }


def _check_fusable(block: Any, convs: list) -> None:
    spec = block.spec
    expected = [(f"rbr_conv.{i}.conv", b.conv, spec.padding, spec.dilation) for i, b in enumerate(convs)]
    if block.rbr_scale is not None:
        expected.append(("rbr_scale.conv", block.rbr_scale.conv, 0, 1))
    for name, conv, pad, dil in expected:
        got = (
            tuple(conv.stride),
            tuple(conv.padding),
            tuple(conv.dilation),
            conv.groups,
            conv.padding_mode,
            conv.bias is None,
        )
        want = ((spec.stride, spec.stride), (pad, pad), (dil, dil), spec.groups, "zeros", True)
        if got != want:
            raise _native.ConfigError(
                f"cannot re-parameterize: {name} has (stride, padding, dilation, groups, padding_mode, "
                f"no bias) = {got}, the block's are {want}; the fold would not equal the branches"
            )


def fused_kernel_bias(block: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel and bias of the one conv equal to ``block``'s branches in eval mode: the branches
    its forward uses (``rbr_conv[:num_conv_branches]``, as the reference loops)."""
    n = block.num_conv_branches
    if type(n) is not int or not 1 <= n <= len(block.rbr_conv):
        raise _native.ConfigError(
            f"cannot re-parameterize: num_conv_branches={n!r} but rbr_conv holds "
            f"{len(block.rbr_conv)} branches"
        )
    convs = [block.rbr_conv[i] for i in range(n)]
    _check_fusable(block, convs)
    folded: list[FoldBranch] = [{"weight": b.conv.weight, "bn": fold_bn(b.bn)} for b in convs]
    scale: FoldBranch | None = None
    if block.rbr_scale is not None:
        scale = {"weight": block.rbr_scale.conv.weight, "bn": fold_bn(block.rbr_scale.bn)}
    skip = fold_bn(block.rbr_skip) if block.rbr_skip is not None else None
    return _native.fuse_block(block.spec, folded, scale, skip)


def _reparam_conv(block: Any) -> nn.Conv2d:
    kernel, bias = fused_kernel_bias(block)
    s = block.spec
    conv = nn.Conv2d(
        s.in_channels,
        s.out_channels,
        s.kernel_size,
        stride=s.stride,
        padding=s.padding,
        dilation=s.dilation,
        groups=s.groups,
        bias=True,
        device="meta",
    )
    conv.weight = nn.Parameter(kernel)
    conv.bias = nn.Parameter(bias)
    return conv


def reparameterize_block(block: Any) -> None:
    """Folds every branch of ``block`` into ``reparam_conv`` (in place; a no-op when fused)."""
    if block.inference_mode:
        return
    block.reparam_conv = _reparam_conv(block)
    for name in _BRANCH_NAMES:
        if hasattr(block, name):
            delattr(block, name)
    block.inference_mode = True


def fused_copy(block: Any, memo: dict) -> Any:
    """A deep copy of ``block``, already re-parameterized, without copying the branches."""
    clone = block.__class__.__new__(block.__class__)
    for key, value in block.__dict__.items():
        if key in _BRANCH_NAMES:
            continue
        if key == "_modules":
            value = {name: m for name, m in value.items() if name not in _BRANCH_NAMES}
        clone.__dict__[key] = copy.deepcopy(value, memo)
    clone.reparam_conv = _reparam_conv(block)
    clone.inference_mode = True
    return clone


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Returns ``model`` with every re-parameterizable module fused for inference.

    Calls ``reparameterize()`` on every module that has it (ours and any other, like the
    reference's function). By default the model is deep-copied first and the original stays
    untouched and trainable; our blocks are fused while copying, so their branches are never
    copied. Fusing is computed in at least float32; a half/bfloat16 kernel or bias that would
    overflow raises ``FuseOverflowError`` naming the block instead of silently writing inf.

    Args:
        model: any module containing MobileOne blocks (a whole YOLOv9 model too).
        inplace: fuse ``model`` itself instead of a copy.
    """
    if not inplace:
        memo: dict = {}
        with torch.no_grad():
            for name, module in model.named_modules():
                copier = getattr(module, "_fused_copy", None)
                if copier is not None and not module.inference_mode:
                    with _naming(name):
                        memo[id(module)] = copier(memo)
        model = copy.deepcopy(model, memo)
    for name, module in model.named_modules():
        if hasattr(module, "reparameterize"):
            with _naming(name):
                module.reparameterize()
    return model


@contextlib.contextmanager
def _naming(name: str) -> Iterator[None]:
    """Prefixes a FuseOverflowError or ConfigError with the path of the block that raised it."""
    try:
        yield
    except _native.FuseOverflowError as err:
        raise _native.FuseOverflowError(f"block {name or '<model>'!r}: {err}") from err
    except _native.ConfigError as err:
        raise _native.ConfigError(f"block {name or '<model>'!r}: {err}") from err
