"""The nn.Module shells of MobileOne (https://arxiv.org/abs/2206.04040).

Parameters and buffers live in real ``nn.Conv2d`` / ``nn.BatchNorm2d`` children with Apple's
names, so state_dicts, ``.to()``, EMA, optimizers and DDP see ordinary modules. At every call a
shell observes its children and the call (:mod:`mobileone_rs.observe`,
:mod:`mobileone_rs.probes`) and asks the native dispatcher for a plan: a fast path only where it
provably equals the reference's module-by-module forward for the whole state, else the module
path, which runs here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _native, observe, probes
from .function import NonFinite, TrainBranchSum
from .options import Options, require_bool
from .reparameterize import fused_copy, fused_kernel_bias, reparameterize_block
from .state import CallEnv


def _require_tensor(x: Any, owner: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise _native.InputTypeError(f"{owner} input must be a torch.Tensor, got {type(x).__name__}")


class SEBlock(nn.Module):
    """Squeeze and Excite module (https://arxiv.org/abs/1709.01507), as in the reference."""

    def __init__(self, in_channels: int, rd_ratio: float = 0.0625) -> None:
        """Builds the module; raises ``ConfigError`` when ``int(in_channels * rd_ratio)`` is 0."""
        super().__init__()
        reduced = _native.se_reduced_channels(in_channels, rd_ratio)
        self.reduce = nn.Conv2d(
            in_channels=in_channels, out_channels=reduced, kernel_size=1, stride=1, bias=True
        )
        self.expand = nn.Conv2d(
            in_channels=reduced, out_channels=in_channels, kernel_size=1, stride=1, bias=True
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Scales each channel of ``inputs`` by a gate computed from its global average."""
        if not probes.symbolic(inputs):
            _require_tensor(inputs, "SEBlock")
            channels = inputs.shape[1] if inputs.dim() == 4 else -1
            state = observe.se_state(self, SEBlock)
            out = _native.se_forward(inputs, state, channels, probes.call_env(inputs, Options()))
            if out is not None:
                return out
        return self._forward_torch(inputs)

    def _forward_torch(self, inputs: torch.Tensor) -> torch.Tensor:
        """The reference's forward. Graph capture (tracing, export, compile, FX) records the global
        average as a mean, which stays shape-generic where a size-derived pooling kernel would be
        baked in (or refused by ONNX); eager runs the reference's ``avg_pool2d``."""
        c = inputs.shape[1]
        if probes.capturing(inputs):
            x = inputs.mean((2, 3), keepdim=True)
        else:
            x = F.avg_pool2d(inputs, kernel_size=[inputs.shape[2], inputs.shape[3]])
        x = torch.sigmoid(self.expand(F.relu(self.reduce(x))))
        return inputs * x.view(-1, c, 1, 1)


probes.capture(SEBlock, "forward")


class MobileOneBlock(nn.Module):
    """MobileOne building block (https://arxiv.org/abs/2206.04040).

    At train time it sums ``num_conv_branches`` conv+BN branches, a 1x1 conv+BN scale branch (when
    ``kernel_size > 1``) and a BN skip branch (when ``in_channels == out_channels`` and
    ``stride == 1``), then applies SE (optional) and ReLU. ``reparameterize()`` folds every branch
    into ``reparam_conv``. ``dilation`` applies to every kxk branch (the reference drops it at
    train time), so the fused block always equals the unfused one.

    The keyword-only ``fast``, ``low_memory`` and ``cpu_kernel`` set this block's fast-path options
    (see :class:`Options`; attributes of the same names, overridden in a scope by
    :func:`fast_paths`). :meth:`forward_path` tells which path an input takes, and why.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        use_se: bool = False,
        num_conv_branches: int = 1,
        inference_mode: bool = False,
        *,
        fast: bool = True,
        low_memory: bool = False,
        cpu_kernel: bool = True,
    ) -> None:
        """Builds the block; raises ``ConfigError`` naming the first invalid argument (bools must be
        bools and integers integers: a yaml typo such as ``Flase`` is refused, not truthy)."""
        super().__init__()
        self._spec = _native.BlockSpec(
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            use_se=use_se,
            num_conv_branches=num_conv_branches,
        )
        self.fast = require_bool(fast, "fast")
        self.low_memory = require_bool(low_memory, "low_memory")
        self.cpu_kernel = require_bool(cpu_kernel, "cpu_kernel")
        self.inference_mode = require_bool(inference_mode, "inference_mode")
        self.groups = groups
        self.stride = stride
        self.kernel_size = kernel_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_conv_branches = num_conv_branches
        self.se = SEBlock(out_channels) if use_se else nn.Identity()
        self.activation = nn.ReLU()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=True,
            )
            return
        self.rbr_skip = (
            nn.BatchNorm2d(num_features=in_channels) if out_channels == in_channels and stride == 1 else None
        )
        self.rbr_conv = nn.ModuleList(
            [self._conv_bn(kernel_size, padding, dilation) for _ in range(num_conv_branches)]
        )
        self.rbr_scale = None
        if kernel_size > 1:
            self.rbr_scale = self._conv_bn(1, 0, 1)

    def __getstate__(self) -> dict:
        # Pickles hold the spec as plain values (weights_only loads take them; no native class).
        state = self.__dict__.copy()
        state["_spec"] = self._spec.as_dict()
        return state

    def __setstate__(self, state: dict) -> None:
        # Whole-module pickles from before the options existed get the defaults; older pickles
        # hold the spec as a 9-tuple.
        state = {"fast": True, "low_memory": False, "cpu_kernel": True, **state}
        spec = state["_spec"]
        if isinstance(spec, tuple):
            spec = dict(zip(_native.BlockSpec.FIELDS, spec))
        if isinstance(spec, dict):
            state["_spec"] = _native.BlockSpec(**spec)
        super().__setstate__(state)

    def _conv_bn(self, kernel_size: int, padding: int, dilation: int) -> nn.Sequential:
        branch = nn.Sequential()
        branch.add_module(
            "conv",
            nn.Conv2d(
                self.in_channels,
                self.out_channels,
                kernel_size,
                stride=self.stride,
                padding=padding,
                dilation=dilation,
                groups=self.groups,
                bias=False,
            ),
        )
        branch.add_module("bn", nn.BatchNorm2d(num_features=self.out_channels))
        return branch

    @property
    def spec(self) -> Any:
        """The constructor arguments, validated (a ``mobileone_rs._native.BlockSpec``)."""
        return self._spec

    @property
    def options(self) -> Options:
        """This block's own fast-path options (a scope's :func:`fast_paths` may override them);
        ``ArgumentTypeError`` when one was set to something other than a bool."""
        return Options(
            require_bool(self.fast, "MobileOneBlock.fast"),
            require_bool(self.low_memory, "MobileOneBlock.low_memory"),
            require_bool(self.cpu_kernel, "MobileOneBlock.cpu_kernel"),
        )

    def _plan(self, x: torch.Tensor, env: CallEnv) -> Any:
        return _native.plan(x, observe.block_state(self, self._spec, SEBlock), env)

    def forward_path(self, x: torch.Tensor, explain: bool = False) -> Any:
        """The name of the path ``forward(x)`` takes now (and, with ``explain``, why).

        Names: ``"module"`` (the reference's module-by-module forward), ``"train_gram"``,
        ``"train_depthwise_cpu"``, ``"train_depthwise"`` (exact training without branch storage;
        they run the module path instead when the batch statistics are not finite),
        ``"folded"``/``"folded_cpu"`` (unfused, every BN in eval: one folded conv) and
        ``"fused"``/``"fused_cpu"`` (re-parameterized); ``_cpu``: the CPU kernel.
        """
        if probes.symbolic(x):
            name, reason = "module", "symbolic tracing (torch.compile or FX) records the reference's graph"
        else:
            _require_tensor(x, "MobileOneBlock")
            plan = self._plan(x, probes.call_env(x, self.options))
            name, reason = plan.name, plan.reason
        return (name, reason) if explain else name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block on the path the dispatcher plans (see :meth:`forward_path`)."""
        if probes.symbolic(x):
            return self._forward_torch(x)
        _require_tensor(x, "MobileOneBlock")
        env = probes.call_env(x, self.options)
        plan = self._plan(x, env)
        if plan.module:
            return self._forward_modules(x, env)
        if not plan.training:
            return plan.run(x)
        try:
            out = TrainBranchSum.apply(x, plan, *plan.parameters())
        except NonFinite:
            return self._forward_modules(x, env)
        return plan.activate(out)

    def _forward_modules(self, x: torch.Tensor, env: CallEnv) -> torch.Tensor:
        """The reference's forward, module by module, after the package's input checks."""
        conv: Any = self.reparam_conv if self.inference_mode else self.rbr_conv[0].conv
        weight = conv.weight
        if type(weight) in (torch.Tensor, nn.Parameter) and type(x) is torch.Tensor:
            _native.check_input(x, self._spec, weight, env["autocast"])
        return self._forward_torch(x)

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The reference's forward in torch modules (no input checks)."""
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        identity_out: Any = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out: Any = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out = out + self.rbr_conv[ix](x)
        return self.activation(self.se(out))

    # -- re-parameterizing: see mobileone_rs.reparameterize -----------------------------------

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel and bias of the one conv equal to this block's branches in eval mode.

        Folds the branches the reference's forward uses (``rbr_conv[:num_conv_branches]``).
        Computed in at least float32 and returned in the weights' dtype; raises
        ``FuseOverflowError`` when they do not fit that dtype, ``ConfigError`` when a branch's
        conv no longer has the block's geometry (the fold would not equal the branches).
        """
        return fused_kernel_bias(self)

    def reparameterize(self) -> None:
        """Folds every branch into ``reparam_conv`` (in place; a no-op when already fused).

        Unlike the reference, the fused weights stay trainable (``requires_grad=True``).
        """
        reparameterize_block(self)

    def _fused_copy(self, memo: dict) -> MobileOneBlock:
        """A deep copy of this block, already re-parameterized, without copying the branches."""
        return fused_copy(self, memo)


class MobileOne(nn.Module):
    """A MobileOne stage for YOLOv9's ``parse_model`` (https://arxiv.org/abs/2206.04040).

    ``num_blocks_per_stage`` pairs of a depthwise 3x3 block and a pointwise 1x1 block; the first
    pair has stride 2; the last ``num_se`` pairs carry squeeze-excite when ``use_se``. The
    keyword-only options are every block's (see :class:`MobileOneBlock`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks_per_stage: int = 2,
        num_conv_branches: int = 1,
        use_se: bool = False,
        num_se: int = 0,
        inference_mode: bool = False,
        **options: bool,
    ) -> None:
        """Builds the stage; raises ``ConfigError`` for invalid arguments (e.g. num_se > blocks, or
        ``use_se`` that is not a bool)."""
        super().__init__()
        self.inference_mode = require_bool(inference_mode, "inference_mode")
        self.use_se = use_se
        self.num_conv_branches = num_conv_branches
        plan = _native.stage_plan(
            in_channels, out_channels, num_blocks_per_stage, num_conv_branches, use_se, num_se
        )
        self.stage = nn.Sequential(*[self._block(spec, inference_mode, options) for spec in plan])

    @staticmethod
    def _block(spec: Any, inference_mode: bool, options: dict) -> MobileOneBlock:
        return MobileOneBlock(**spec.as_dict(), inference_mode=inference_mode, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies every block in order."""
        return self.stage(x)


def safe_globals() -> list:
    """The classes a whole-module checkpoint of MobileOne modules needs under ``weights_only=True``.

    Use as ``torch.serialization.add_safe_globals(mobileone_rs.safe_globals())`` (add your own
    model's classes too); state_dicts need nothing.
    """
    return [
        MobileOne,
        MobileOneBlock,
        SEBlock,
        nn.Sequential,
        nn.ModuleList,
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.Identity,
    ]
