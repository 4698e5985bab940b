"""The nn.Module shells of MobileOne (https://arxiv.org/abs/2206.04040).

Parameters and buffers live in real ``nn.Conv2d`` / ``nn.BatchNorm2d`` children with the seed's
(Apple's) names, so state_dicts, ``.to()``, EMA, optimizers and DDP see ordinary modules. The
forward math runs in Rust (``_native``). When a child is not a plain conv/BN (``SyncBatchNorm``,
``track_running_stats=False``, a subclass) or has hooks that must fire, the block runs the seed's
module-by-module path instead, so those children behave exactly as with the seed's code.
"""

from __future__ import annotations

import contextlib
import copy
import threading

import torch
import torch.nn.modules.module as _torch_module
from torch import nn

from . import _hints, _native

_BRANCH_NAMES = ("rbr_conv", "rbr_scale", "rbr_skip")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


_state = threading.local()


@contextlib.contextmanager
def module_path():
    """Inside this context, unfused blocks run the seed's module-by-module path on this thread.

    That path calls every branch's conv and BN as the seed does; it is the independent reference
    that :func:`mobileone_rs.verify_reparameterization` compares fused blocks against.
    """
    previous = getattr(_state, "module_path", False)
    _state.module_path = True
    try:
        yield
    finally:
        _state.module_path = previous


def _global_hooks() -> bool:
    return bool(
        _torch_module._global_forward_hooks
        or _torch_module._global_forward_pre_hooks
        or _torch_module._global_backward_hooks
        or _torch_module._global_backward_pre_hooks
    )


def _hooked(module: nn.Module) -> bool:
    d = module.__dict__
    return any(d[name] for name in _HOOK_DICTS)


def _raw_ok(x, parameters=None) -> bool:
    """Whether the native CPU kernels may read and write ``x``'s memory directly: a plain tensor
    (not a subclass such as a FakeTensor), outside ``torch.jit.trace`` (which records only
    aten ops). With ``parameters`` (a callable; inference kernels are not differentiable) also
    only when no gradient is wanted."""
    if type(x) is not torch.Tensor or torch.jit.is_tracing():
        return False
    if parameters is None or not torch.is_grad_enabled():
        return True
    return not x.requires_grad and not any(p.requires_grad for p in parameters())


def _autocast(x) -> bool:
    if not isinstance(x, torch.Tensor):
        return False
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def _bn_args(bn: nn.Module):
    """The native tuple of a plain BatchNorm2d, or None when the module path must run."""
    if type(bn) is not nn.BatchNorm2d or _hooked(bn) or bn.running_mean is None or bn.weight is None:
        return None
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps)


def _conv_bn_args(branch: nn.Module):
    if type(branch) is not nn.Sequential or _hooked(branch) or len(branch) != 2:
        return None
    conv, bn = branch.conv, branch.bn
    if type(conv) is not nn.Conv2d or _hooked(conv) or conv.bias is not None or conv.padding_mode != "zeros":
        return None
    bn_args = _bn_args(bn)
    return None if bn_args is None else (conv.weight, bn_args)


def _fuse_args(bn: nn.Module):
    """The native tuple of any BatchNorm-like module, for fusing (running statistics only)."""
    if getattr(bn, "running_mean", None) is None:
        raise _native.ConfigError(
            f"cannot re-parameterize {type(bn).__name__} without running statistics "
            "(track_running_stats=False): its eval output depends on the batch"
        )
    ones = torch.ones_like(bn.running_mean)
    weight = bn.weight if bn.weight is not None else ones
    bias = bn.bias if bn.bias is not None else torch.zeros_like(ones)
    return (weight, bias, bn.running_mean, bn.running_var, None, None, bn.eps)


_FAST_DTYPES = (torch.float32, torch.float64)


def _flat_params(conv, scale, skip) -> list:
    """Every trainable tensor of the branches, in the order the native backward returns grads."""
    params = []
    for weight, bn in conv:
        params += [weight, bn[0], bn[1]]
    if scale is not None:
        params += [scale[0], scale[1][0], scale[1][1]]
    if skip is not None:
        params += [skip[0], skip[1]]
    return params


class _TrainBranchSum(torch.autograd.Function):
    """The exact train-time branch sum of a block, computed in Rust without storing any branch
    output: the forward runs one conv folded from the batch statistics, the backward is analytic.
    Pointwise blocks work from the input's Gram matrix; depthwise blocks on the CPU from each
    channel's patch moments (a dedicated kernel), elsewhere (CUDA) by recomputing each branch."""

    @staticmethod
    def forward(ctx, x, block_args, *params):
        spec, conv, scale, skip = block_args
        out, saved = _native.train_forward(x, spec, conv, scale, skip, _raw_ok(x))
        ctx.block_args = block_args
        ctx.save_for_backward(x, *params, *saved)
        ctx.num_params = len(params)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, *rest = ctx.saved_tensors
        saved = rest[ctx.num_params:]
        spec, conv, scale, skip = ctx.block_args
        grads = _native.train_backward(grad, x, spec, conv, scale, skip, saved)
        return (grads[0], None, *grads[1:])


class SEBlock(nn.Module):
    """Squeeze and Excite module (https://arxiv.org/abs/1709.01507), as in the seed."""

    def __init__(self, in_channels: int, rd_ratio: float = 0.0625) -> None:
        """Builds the module; raises ``ConfigError`` when ``int(in_channels * rd_ratio)`` is 0."""
        super().__init__()
        reduced = _native.se_reduced_channels(in_channels, rd_ratio)
        self.reduce = nn.Conv2d(in_channels=in_channels, out_channels=reduced, kernel_size=1, stride=1, bias=True)
        self.expand = nn.Conv2d(in_channels=reduced, out_channels=in_channels, kernel_size=1, stride=1, bias=True)

    def native_args(self):
        """The native tuple of this module, or None when the module path must run."""
        if _hooked(self):
            return None
        reduce, expand = self.reduce, self.expand
        for conv in (reduce, expand):
            if type(conv) is not nn.Conv2d or _hooked(conv) or conv.bias is None:
                return None
        return (reduce.weight, reduce.bias, expand.weight, expand.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Scales each channel of ``inputs`` by a gate computed from its global average."""
        args = None if torch.compiler.is_compiling() or _global_hooks() else self.native_args()
        if args is not None:
            return _native.se_forward(inputs, args, _autocast(inputs))
        _, c, h, w = inputs.size()
        x = nn.functional.avg_pool2d(inputs, kernel_size=[h, w])
        x = torch.sigmoid(self.expand(nn.functional.relu(self.reduce(x))))
        return inputs * x.view(-1, c, 1, 1)


class MobileOneBlock(nn.Module):
    """MobileOne building block (https://arxiv.org/abs/2206.04040).

    At train time it sums ``num_conv_branches`` conv+BN branches, a 1x1 conv+BN scale branch (when
    ``kernel_size > 1``) and a BN skip branch (when ``in_channels == out_channels`` and
    ``stride == 1``), then applies SE (optional) and ReLU. ``reparameterize()`` folds every branch
    into ``reparam_conv``. ``dilation`` applies to every kxk branch (the seed drops it at train
    time), so the fused block always equals the unfused one.
    """

    #: Train depthwise blocks without storing any branch output: on the CPU (float32/64) through
    #: the patch-moment kernel, which is also the fastest path there; on other devices by
    #: recomputing each branch in the backward. Set it to False (on the class, or on one block)
    #: to run and store the branches as the seed does.
    low_memory: bool = True

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
    ) -> None:
        """Builds the block; raises ``ConfigError`` naming the first invalid argument."""
        super().__init__()
        spec = (in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bool(use_se),
                num_conv_branches)
        _native.validate_block(spec)
        self._spec = spec
        self._train_path = _native.train_path(spec)
        self.inference_mode = inference_mode
        self.groups = groups
        self.stride = stride
        self.kernel_size = kernel_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_conv_branches = num_conv_branches
        self.se = SEBlock(out_channels) if use_se else nn.Identity()
        self.activation = nn.ReLU()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                          dilation=dilation, groups=groups, bias=True)
            return
        self.rbr_skip = nn.BatchNorm2d(num_features=in_channels) if out_channels == in_channels and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            [self._conv_bn(kernel_size, padding, dilation) for _ in range(num_conv_branches)]
        )
        self.rbr_scale = None
        if kernel_size > 1:
            self.rbr_scale = self._conv_bn(1, 0, 1)

    def _conv_bn(self, kernel_size: int, padding: int, dilation: int) -> nn.Sequential:
        branch = nn.Sequential()
        branch.add_module("conv", nn.Conv2d(self.in_channels, self.out_channels, kernel_size, stride=self.stride,
                                            padding=padding, dilation=dilation, groups=self.groups, bias=False))
        branch.add_module("bn", nn.BatchNorm2d(num_features=self.out_channels))
        return branch

    def _se_args(self):
        """``(ok, args)``: args is None for no SE; ok is False when the module path must run."""
        se = self.se
        if type(se) is nn.Identity:
            return not _hooked(se), None
        if type(se) is not SEBlock:
            return False, None
        args = se.native_args()
        return args is not None, args

    def _branch_args(self):
        """The native tuples of every branch, or None when the module path must run."""
        conv = []
        for branch in self.rbr_conv:
            args = _conv_bn_args(branch)
            if args is None:
                return None
            conv.append(args)
        scale = skip = None
        if self.rbr_scale is not None:
            scale = _conv_bn_args(self.rbr_scale)
            if scale is None:
                return None
        if self.rbr_skip is not None:
            skip = _bn_args(self.rbr_skip)
            if skip is None:
                return None
        return conv, scale, skip

    def _native_ready(self) -> bool:
        return (type(self.activation) is nn.ReLU and not _hooked(self.activation) and not _global_hooks()
                and not getattr(_state, "module_path", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block: one conv when re-parameterized, else every branch."""
        if torch.compiler.is_compiling():
            # torch.compile traces the seed's torch-level graph (same math) and generates its
            # own fused kernels; an opaque native call would break the graph.
            return self._forward_torch(x)
        if self.inference_mode:
            return self._forward_fused(x)
        branches = self._branch_args() if self._native_ready() else None
        se_ok, se = self._se_args()
        if branches is None or not se_ok:
            return self._forward_modules(x)
        conv, scale, skip = branches
        autocast = _autocast(x)
        if self.training and self._fast_train(x, autocast):
            out = _TrainBranchSum.apply(x, (self._spec, conv, scale, skip), *_flat_params(conv, scale, skip))
            return _native.se_relu(out, se)
        raw = not self.training and _raw_ok(x, self.parameters)
        return _native.block_forward(x, self._spec, conv, scale, skip, se, self.training, autocast, raw)

    def _fast_train(self, x, autocast: bool) -> bool:
        """Whether the exact no-branch-storage training path applies (float32/64, no autocast).

        Pointwise blocks always take it (it is faster and leaner); depthwise blocks when
        ``low_memory`` is set (the default).
        """
        path = self._train_path
        wanted = path == "gram" or (path == "depthwise" and self.low_memory)
        return (wanted and not autocast and isinstance(x, torch.Tensor)
                and x.dtype in _FAST_DTYPES)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.reparam_conv
        se_ok, se = self._se_args()
        if se_ok and self._native_ready() and type(conv) is nn.Conv2d and not _hooked(conv):
            raw = _raw_ok(x, self.parameters)
            return _native.fused_forward(x, self._spec, conv.weight, conv.bias, se, _autocast(x), raw)
        _native.check_input(x, self._spec, conv.weight, _autocast(x))
        return self._forward_torch(x)

    def _forward_modules(self, x: torch.Tensor) -> torch.Tensor:
        """The seed's forward, module by module, so hooks and non-plain children behave as there."""
        _native.check_input(x, self._spec, self.rbr_conv[0].conv.weight, _autocast(x))
        return self._forward_torch(x)

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The seed's forward in torch modules (no input checks)."""
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for branch in self.rbr_conv:
            out = out + branch(x)
        return self.activation(self.se(out))

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel and bias of the one conv equal to this block's branches in eval mode.

        Computed in at least float32 and returned in the weights' dtype; raises
        ``FuseOverflowError`` when they do not fit that dtype.
        """
        conv = [(branch.conv.weight, _fuse_args(branch.bn)) for branch in self.rbr_conv]
        scale = None
        if self.rbr_scale is not None:
            scale = (self.rbr_scale.conv.weight, _fuse_args(self.rbr_scale.bn))
        skip = _fuse_args(self.rbr_skip) if self.rbr_skip is not None else None
        return _native.fuse_block(self._spec, conv, scale, skip)

    def _make_reparam_conv(self) -> nn.Conv2d:
        kernel, bias = self.fused_kernel_bias()
        template = self.rbr_conv[0].conv
        conv = nn.Conv2d(template.in_channels, template.out_channels, template.kernel_size, stride=template.stride,
                         padding=template.padding, dilation=template.dilation, groups=template.groups, bias=True,
                         device="meta")
        conv.weight = nn.Parameter(kernel)
        conv.bias = nn.Parameter(bias)
        return conv

    def reparameterize(self) -> None:
        """Folds every branch into ``reparam_conv`` (in place; a no-op when already fused).

        Unlike the seed, the fused weights stay trainable (``requires_grad=True``).
        """
        if self.inference_mode:
            return
        self.reparam_conv = self._make_reparam_conv()
        self._drop_branches()

    def _drop_branches(self) -> None:
        for name in _BRANCH_NAMES:
            if hasattr(self, name):
                delattr(self, name)
        self.inference_mode = True

    def _fused_copy(self, memo: dict) -> MobileOneBlock:
        """A deep copy of this block, already re-parameterized, without copying the branches."""
        clone = self.__class__.__new__(self.__class__)
        for key, value in self.__dict__.items():
            if key in _BRANCH_NAMES:
                continue
            if key == "_modules":
                value = {name: m for name, m in value.items() if name not in _BRANCH_NAMES}
            clone.__dict__[key] = copy.deepcopy(value, memo)
        clone.reparam_conv = self._make_reparam_conv()
        clone.inference_mode = True
        return clone


class MobileOne(nn.Module):
    """A MobileOne stage for YOLOv9's ``parse_model`` (https://arxiv.org/abs/2206.04040).

    ``num_blocks_per_stage`` pairs of a depthwise 3x3 block and a pointwise 1x1 block; the first
    pair has stride 2; the last ``num_se`` pairs carry squeeze-excite when ``use_se``.
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
    ) -> None:
        """Builds the stage; raises ``ConfigError`` for invalid arguments (e.g. num_se > blocks)."""
        super().__init__()
        try:
            self.inference_mode = inference_mode
            self.use_se = use_se
            self.num_conv_branches = num_conv_branches
            plan = _native.stage_plan(in_channels, out_channels, num_blocks_per_stage, num_conv_branches,
                                      bool(use_se), num_se)
            self.stage = nn.Sequential(*[self._block(spec, inference_mode) for spec in plan])
        except _native.ConfigError as err:  # under YOLOv9's parse_model: name the yaml layer
            _hints.reraise_with_yaml_layer(err, type(self).__name__)
            raise

    @staticmethod
    def _block(spec, inference_mode: bool) -> MobileOneBlock:
        cin, cout, k, stride, padding, dilation, groups, use_se, branches = spec
        return MobileOneBlock(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                              use_se=use_se, num_conv_branches=branches, inference_mode=inference_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies every block in order."""
        return self.stage(x)


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Returns ``model`` with every re-parameterizable module fused for inference.

    Calls ``reparameterize()`` on every module that has it (ours and any other, like the seed's
    function). By default the model is deep-copied first and the original stays untouched and
    trainable; our blocks are fused while copying, so their branches are never copied. Fusing is
    computed in at least float32; a half/bfloat16 kernel or bias that would overflow raises
    ``FuseOverflowError`` naming the block instead of silently writing inf.

    Args:
        model: any module containing MobileOne blocks (a whole YOLOv9 model too).
        inplace: fuse ``model`` itself instead of a copy.
    """
    if not inplace:
        memo: dict = {}
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, MobileOneBlock) and not module.inference_mode:
                    with _naming(name):
                        memo[id(module)] = module._fused_copy(memo)
        model = copy.deepcopy(model, memo)
    for name, module in model.named_modules():
        if hasattr(module, "reparameterize"):
            with _naming(name):
                module.reparameterize()
    return model


@contextlib.contextmanager
def _naming(name: str):
    """Prefixes a FuseOverflowError with the path of the block that raised it."""
    try:
        yield
    except _native.FuseOverflowError as err:
        raise _native.FuseOverflowError(f"block {name or '<model>'!r}: {err}") from err


def safe_globals() -> list:
    """The classes a whole-module checkpoint of MobileOne modules needs under ``weights_only=True``.

    Use as ``torch.serialization.add_safe_globals(mobileone_rs.safe_globals())`` (add your own
    model's classes too); state_dicts need nothing.
    """
    return [MobileOne, MobileOneBlock, SEBlock, nn.Sequential, nn.ModuleList, nn.Conv2d, nn.BatchNorm2d,
            nn.ReLU, nn.Identity]
