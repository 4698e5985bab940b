"""The named data the shells hand to the native dispatcher, defined once.

Each call, a block observes its children and the call (:mod:`mobileone_rs.observe`,
:mod:`mobileone_rs.probes`) into these dicts; the native side reads them by key (a missing or
misspelt key raises ``KeyError``, a value of the wrong kind ``TypeError``: never a silent swap)
and the stub ``_native.pyi`` types its functions with them. Plain dicts keep the per-call cost
low; the ``TypedDict`` s give them a schema that mypy checks where they are built.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import torch


class ConvState(TypedDict):
    """An ``nn.Conv2d`` child: its tensors and every attribute its forward reads."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    stride: Any
    padding: Any
    dilation: Any
    groups: Any
    padding_mode: Any
    plain: bool  # no hooks, plain tensors (not subclasses)


class BnState(TypedDict):
    """An ``nn.BatchNorm2d`` child: its tensors and every attribute its forward reads."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    momentum: Any
    eps: Any
    training: Any  # as set; anything but a bool takes the module path (torch reads it as truthy)
    track_running_stats: Any
    plain: bool


class BranchState(TypedDict):
    """A conv+BN branch: ``nn.Sequential`` of ``conv`` then ``bn``."""

    conv: ConvState
    bn: BnState
    plain: bool  # no hooks on the Sequential


class NoSe(TypedDict):
    """``se`` is ``nn.Identity``."""

    kind: Literal["none"]
    plain: bool


class Se(TypedDict):
    """``se`` is our ``SEBlock``."""

    kind: Literal["se"]
    reduce: ConvState
    expand: ConvState
    plain: bool


class OpaqueSe(TypedDict):
    """``se`` is something only the module path runs."""

    kind: Literal["opaque"]
    reason: str


SeState = NoSe | Se | OpaqueSe


class BranchesBody(TypedDict):
    """An unfused block: the conv branches its forward loops over, the scale and skip branches."""

    kind: Literal["branches"]
    convs: list[BranchState]
    scale: BranchState | None
    skip: BnState | None


class FusedBody(TypedDict):
    """A re-parameterized block: ``reparam_conv``."""

    kind: Literal["fused"]
    conv: ConvState


class OpaqueBody(TypedDict):
    """A block whose children only the module path runs (``reason`` names the child)."""

    kind: Literal["opaque"]
    reason: str


Body = BranchesBody | FusedBody | OpaqueBody


class BlockState(TypedDict):
    """A ``MobileOneBlock`` as its forward sees it now."""

    spec: Any  # mobileone_rs._native.BlockSpec
    body: Body
    se: SeState
    activation_plain: bool  # torch's nn.ReLU with its own forward, no hooks


class CallEnv(TypedDict):
    """The facts of one call the dispatcher weighs, and the block's effective options."""

    grad_enabled: bool
    inference_mode: bool
    autocast: bool
    jit_tracing: bool
    functorch: bool
    dispatch_mode: bool
    function_mode: bool
    saved_tensor_hooks: bool
    forward_ad: bool
    global_hooks: bool
    patched_torch: bool
    input_subclass: bool
    fast: bool
    low_memory: bool
    cpu_kernel: bool


class FoldBn(TypedDict):
    """What re-parameterization folds of a BatchNorm (running statistics, affine, eps)."""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float


class FoldBranch(TypedDict):
    """A conv kernel and the BatchNorm folded into it."""

    weight: torch.Tensor
    bn: FoldBn
