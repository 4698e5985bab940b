"""The nn.Module shells of MobileOne (https://arxiv.org/abs/2206.04040).

Parameters and buffers live in real ``nn.Conv2d`` / ``nn.BatchNorm2d`` children with the seed's
(Apple's) names, so state_dicts, ``.to()``, EMA, optimizers and DDP see ordinary modules. At every
call a shell observes its children and the call (``_state``, ``_env``) and hands both to the
native dispatcher, which picks the path: a fast path only where it provably equals the seed's
module-by-module forward for the whole state, else the module path, which runs here.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
import torch.nn.modules.module as _torch_module
from torch import nn

from . import _native
from .yolov9 import hints as _hints

_BRANCH_NAMES = ("rbr_conv", "rbr_scale", "rbr_skip")
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


class Options(NamedTuple):
    """A block's fast-path options.

    Attributes:
        fast: run fast paths at all (False: the seed's module path always).
        low_memory: depthwise blocks train without storing branch outputs (False: through the
            seed's branches, which store them).
        cpu_kernel: depthwise blocks use the CPU kernels (training in float32/64, inference in
            float32) on CPU tensors (False: libtorch's ops).
    """

    fast: bool = True
    low_memory: bool = True
    cpu_kernel: bool = True


_scope = threading.local()


@contextlib.contextmanager
def fast_paths(enabled: bool | None = None, low_memory: bool | None = None, cpu_kernel: bool | None = None):
    """Overrides every block's options on this thread for the scope; ``None`` keeps a block's own.

    Example: ``with fast_paths(cpu_kernel=False): model(x)`` runs libtorch's ops where the CPU
    kernels would run.
    """
    previous = getattr(_scope, "override", Options(None, None, None))
    _scope.override = Options(
        previous.fast if enabled is None else enabled,
        previous.low_memory if low_memory is None else low_memory,
        previous.cpu_kernel if cpu_kernel is None else cpu_kernel,
    )
    try:
        yield
    finally:
        _scope.override = previous


def module_path():
    """Inside this context, blocks on this thread run the seed's module-by-module path.

    That path calls every branch's conv and BN as the seed does; it is the independent reference
    that :func:`mobileone_rs.verify_reparameterization` compares fused blocks against.
    """
    return fast_paths(enabled=False)


# ---- what the shells observe -------------------------------------------------------------


class _Opaque(Exception):
    """A child the dispatcher cannot even describe (not a conv / BN / container of them)."""


def _hooked(module: nn.Module) -> bool:
    d = module.__dict__
    return bool(d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"]
                or d["_backward_pre_hooks"])


_MISSING = object()


def _member(module: nn.Module, group: str, name: str):
    """``getattr(module, name, None)`` for a member of ``group`` (``"_parameters"``, ``"_buffers"``,
    ``"_modules"``), without ``Module.__getattr__``'s cost; anything set elsewhere still found."""
    value = module.__dict__[group].get(name, _MISSING)
    return getattr(module, name, None) if value is _MISSING else value


def _child(module: nn.Module, name: str):
    return _member(module, "_modules", name)


def _global_hooks() -> bool:
    return bool(
        _torch_module._global_forward_hooks
        or _torch_module._global_forward_pre_hooks
        or _torch_module._global_backward_hooks
        or _torch_module._global_backward_pre_hooks
    )


def _plain(*tensors) -> bool:
    return all(t is None or type(t) in _PLAIN_TENSORS for t in tensors)


def _conv_state(conv: nn.Module, name: str) -> tuple:
    if type(conv) is not nn.Conv2d:
        raise _Opaque(f"{name} is a {type(conv).__name__}, not an nn.Conv2d")
    weight, bias = _member(conv, "_parameters", "weight"), _member(conv, "_parameters", "bias")
    plain = not _hooked(conv) and _plain(weight, bias)
    return (weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode, plain)


def _bn_state(bn: nn.Module, name: str) -> tuple:
    if type(bn) is not nn.BatchNorm2d:
        raise _Opaque(f"{name} is a {type(bn).__name__}, not an nn.BatchNorm2d")
    tensors = (
        _member(bn, "_parameters", "weight"),
        _member(bn, "_parameters", "bias"),
        _member(bn, "_buffers", "running_mean"),
        _member(bn, "_buffers", "running_var"),
        _member(bn, "_buffers", "num_batches_tracked"),
    )
    plain = not _hooked(bn) and _plain(*tensors)
    return (*tensors, bn.momentum, bn.eps, bn.training, bn.track_running_stats, plain)


def _branch_state(branch: nn.Module, name: str) -> tuple:
    children = branch.__dict__.get("_modules", {}) if type(branch) is nn.Sequential else {}
    if len(children) != 2 or "conv" not in children or "bn" not in children:
        raise _Opaque(f"{name} is not an nn.Sequential of conv and bn")
    conv, bn = children["conv"], children["bn"]
    return (_conv_state(conv, f"{name}.conv"), _bn_state(bn, f"{name}.bn"), not _hooked(branch))


def _se_state(se: nn.Module) -> tuple:
    if type(se) is nn.Identity:
        return ("none", not _hooked(se))
    if type(se) is not SEBlock:
        return ("opaque",)
    try:
        reduce = _conv_state(_child(se, "reduce"), "se.reduce")
        expand = _conv_state(_child(se, "expand"), "se.expand")
    except _Opaque:
        return ("opaque",)
    return ("se", reduce, expand, not _hooked(se))


def _autocast(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def _functorch(x: torch.Tensor) -> bool:
    return (
        torch._C._functorch.peek_interpreter_stack() is not None
        or torch._C._functorch.is_functorch_wrapped_tensor(x)
    )


def _symbolic(x) -> bool:
    """Whether ``x`` is traced symbolically (torch.compile, FX): no native call can run."""
    return (
        isinstance(x, torch.fx.Proxy)
        or torch.compiler.is_compiling()
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
    )


def _capturing(x) -> bool:
    """Whether a graph is being captured (jit.trace, ONNX export, torch.compile/export, FX)."""
    return (_symbolic(x) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_exporting())


def _require_tensor(x, owner: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise _native.InputTypeError(f"{owner} input must be a torch.Tensor, got {type(x).__name__}")


def _env(x: torch.Tensor, options: Options) -> tuple:
    """The call's facts, in the order of the native ``Env``."""
    override = getattr(_scope, "override", None)
    if override is not None:
        options = Options(*(mine if theirs is None else theirs for mine, theirs in zip(options, override)))
    return (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        _autocast(x),
        torch.jit.is_tracing(),
        _functorch(x),
        torch._C._len_torch_dispatch_stack() > 0,
        torch._C._len_torch_function_stack() > 0,
        torch._C._autograd._top_saved_tensors_default_hooks(False) is not None,
        _forward_ad._current_level >= 0,
        _global_hooks(),
        type(x) is not torch.Tensor,
        *options,
    )


# ---- the exact training paths -----------------------------------------------------------------


class _NonFinite(Exception):
    """The batch statistics were not finite: nothing was updated; the module path runs."""


def _train_params(body: tuple) -> list:
    """Every trainable tensor of a branches state, in the order the native backward returns."""
    _, convs, scale, skip = body
    params = []
    for conv, bn, _ in [*convs, *([scale] if scale is not None else [])]:
        params += [conv[0], bn[0], bn[1]]
    if skip is not None:
        params += [skip[0], skip[1]]
    return params


def _seed_branch_sum(x, params, spec, body):
    """The seed's train-time branch sum as a function of the input and the parameters (batch
    statistics, no running-statistics update), for gradients of gradients."""
    _, _, _, stride, padding, dilation, groups, _, _ = spec
    _, convs, scale, skip = body
    n = len(convs)
    out = 0
    if scale is not None:
        w, gamma, beta = params[3 * n: 3 * n + 3]
        y = F.conv2d(x, w, None, stride, 0, 1, groups)
        out = out + F.batch_norm(y, None, None, gamma, beta, True, 0.0, scale[1][6])
    if skip is not None:
        gamma, beta = params[-2:]
        out = out + F.batch_norm(x, None, None, gamma, beta, True, 0.0, skip[6])
    for i, (_, bn, _) in enumerate(convs):
        w, gamma, beta = params[3 * i: 3 * i + 3]
        y = F.conv2d(x, w, None, stride, padding, dilation, groups)
        out = out + F.batch_norm(y, None, None, gamma, beta, True, 0.0, bn[6])
    return out


class _TrainBranchSum(torch.autograd.Function):
    """The exact train-time branch sum of a block, computed in Rust without storing any branch
    output: the forward runs one conv folded from the batch statistics, the backward is analytic.
    A gradient of the gradient (``create_graph=True``) differentiates the seed's math instead."""

    @staticmethod
    def forward(ctx, x, info, *params):
        state, env, path = info
        result = _native.train_forward(x, state, env, path)
        if result is None:
            raise _NonFinite
        out, saved = result
        ctx.info = info
        ctx.num_params = len(params)
        ctx.save_for_backward(x, *params, *saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, *rest = ctx.saved_tensors
        params, saved = rest[: ctx.num_params], rest[ctx.num_params:]
        state, _, path = ctx.info
        if not torch.is_grad_enabled():
            grads = _native.train_backward(grad, x, state, path, saved)
            if grads is not None:
                return (grads[0], None, *grads[1:])
        return _differentiate(ctx, x, params, grad)


def _differentiate(ctx, x, params, grad):
    """The backward by autograd through the seed's math: differentiable itself when the outer
    backward builds a graph (``create_graph=True``)."""
    state = ctx.info[0]
    needs = ctx.needs_input_grad
    inputs = [x, *params]
    wanted = [needs[0], *needs[2:]]
    with torch.enable_grad():
        out = _seed_branch_sum(x, params, state[0], state[1])
        targets = [t for t, want in zip(inputs, wanted) if want]
        got = iter(torch.autograd.grad(out, targets, grad, create_graph=torch.is_grad_enabled(), allow_unused=True))
    grads = [next(got) if want else None for want in wanted]
    return (grads[0], None, *grads[1:])


# ---- the modules ---------------------------------------------------------------------------------


class SEBlock(nn.Module):
    """Squeeze and Excite module (https://arxiv.org/abs/1709.01507), as in the seed."""

    def __init__(self, in_channels: int, rd_ratio: float = 0.0625) -> None:
        """Builds the module; raises ``ConfigError`` when ``int(in_channels * rd_ratio)`` is 0."""
        super().__init__()
        reduced = _native.se_reduced_channels(in_channels, rd_ratio)
        self.reduce = nn.Conv2d(in_channels=in_channels, out_channels=reduced, kernel_size=1, stride=1, bias=True)
        self.expand = nn.Conv2d(in_channels=reduced, out_channels=in_channels, kernel_size=1, stride=1, bias=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Scales each channel of ``inputs`` by a gate computed from its global average."""
        if not _symbolic(inputs):
            _require_tensor(inputs, "SEBlock")
            env = _env(inputs, Options())
            out = _native.se_forward(inputs, _se_state(self), inputs.shape[1] if inputs.dim() == 4 else -1, env)
            if out is not None:
                return out
        return self._forward_torch(inputs)

    def _forward_torch(self, inputs: torch.Tensor) -> torch.Tensor:
        """The seed's forward. Graph capture (tracing, export, compile, FX) records the global
        average as a mean, which stays shape-generic where a size-derived pooling kernel would be
        baked in (or refused by ONNX); eager runs the seed's ``avg_pool2d``."""
        c = inputs.shape[1]
        if _capturing(inputs):
            x = inputs.mean((2, 3), keepdim=True)
        else:
            x = F.avg_pool2d(inputs, kernel_size=[inputs.shape[2], inputs.shape[3]])
        x = torch.sigmoid(self.expand(F.relu(self.reduce(x))))
        return inputs * x.view(-1, c, 1, 1)


class MobileOneBlock(nn.Module):
    """MobileOne building block (https://arxiv.org/abs/2206.04040).

    At train time it sums ``num_conv_branches`` conv+BN branches, a 1x1 conv+BN scale branch (when
    ``kernel_size > 1``) and a BN skip branch (when ``in_channels == out_channels`` and
    ``stride == 1``), then applies SE (optional) and ReLU. ``reparameterize()`` folds every branch
    into ``reparam_conv``. ``dilation`` applies to every kxk branch (the seed drops it at train
    time), so the fused block always equals the unfused one.

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
        low_memory: bool = True,
        cpu_kernel: bool = True,
    ) -> None:
        """Builds the block; raises ``ConfigError`` naming the first invalid argument."""
        super().__init__()
        spec = (in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bool(use_se),
                num_conv_branches)
        _native.validate_block(spec)
        self._spec = spec
        self.fast, self.low_memory, self.cpu_kernel = bool(fast), bool(low_memory), bool(cpu_kernel)
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

    def __setstate__(self, state: dict) -> None:
        # Whole-module pickles from before the options existed get the defaults.
        state = {"fast": True, "low_memory": True, "cpu_kernel": True, **state}
        super().__setstate__(state)

    def _conv_bn(self, kernel_size: int, padding: int, dilation: int) -> nn.Sequential:
        branch = nn.Sequential()
        branch.add_module("conv", nn.Conv2d(self.in_channels, self.out_channels, kernel_size, stride=self.stride,
                                            padding=padding, dilation=dilation, groups=self.groups, bias=False))
        branch.add_module("bn", nn.BatchNorm2d(num_features=self.out_channels))
        return branch

    @property
    def options(self) -> Options:
        """This block's own fast-path options (a scope's :func:`fast_paths` may override them)."""
        return Options(self.fast, self.low_memory, self.cpu_kernel)

    # -- observing ----------------------------------------------------------------------------

    def _body_state(self) -> tuple:
        if self.inference_mode:
            return ("fused", _conv_state(_child(self, "reparam_conv"), "reparam_conv"))
        convs = _child(self, "rbr_conv")
        if type(convs) is not nn.ModuleList:
            raise _Opaque("rbr_conv is not an nn.ModuleList")
        convs = [_branch_state(b, f"rbr_conv.{i}") for i, b in enumerate(convs.__dict__["_modules"].values())]
        scale, skip = _child(self, "rbr_scale"), _child(self, "rbr_skip")
        scale = None if scale is None else _branch_state(scale, "rbr_scale")
        skip = None if skip is None else _bn_state(skip, "rbr_skip")
        return ("branches", convs, scale, skip)

    def _state(self) -> tuple:
        """Every child as the dispatcher sees it (read now: a BN's own flags, a conv's attributes)."""
        try:
            body = self._body_state()
        except _Opaque as why:
            body = ("opaque", str(why))
        except AttributeError as why:  # a child deleted or replaced by a non-module
            body = ("opaque", f"a child is missing: {why}")
        activation, se = _child(self, "activation"), _child(self, "se")
        plain = type(activation) is nn.ReLU and not _hooked(activation) and not _global_hooks()
        return (self._spec, body, _se_state(se), plain)

    def forward_path(self, x: torch.Tensor, explain: bool = False):
        """The name of the path ``forward(x)`` takes now (and, with ``explain``, why).

        Names: ``"module"`` (the seed's module-by-module forward), ``"train_gram"``,
        ``"train_depthwise_cpu"``, ``"train_depthwise"`` (exact training without branch storage;
        they run the module path instead when the batch statistics are not finite),
        ``"folded"``/``"folded_cpu"`` (unfused, every BN in eval: one folded conv) and
        ``"fused"``/``"fused_cpu"`` (re-parameterized); ``_cpu``: the CPU kernel.
        """
        if _symbolic(x):
            name, reason = "module", "symbolic tracing (torch.compile or FX) records the seed's graph"
        else:
            _require_tensor(x, "MobileOneBlock")
            name, reason = _native.forward_path(x, self._state(), _env(x, self.options))
        return (name, reason) if explain else name

    # -- running ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block on the path the dispatcher picks (see :meth:`forward_path`)."""
        if _symbolic(x):
            return self._forward_torch(x)
        _require_tensor(x, "MobileOneBlock")
        state, env = self._state(), _env(x, self.options)
        result = _native.block_forward(x, state, env)
        if isinstance(result, torch.Tensor):
            return result
        if result == "module":
            return self._forward_modules(x, env)
        try:
            out = _TrainBranchSum.apply(x, (state, env, result), *_train_params(state[1]))
        except _NonFinite:
            return self._forward_modules(x, env)
        return _native.se_relu(out, state[2])

    def _forward_modules(self, x: torch.Tensor, env: tuple) -> torch.Tensor:
        """The seed's forward, module by module, after the package's input checks."""
        weight = self.reparam_conv.weight if self.inference_mode else self.rbr_conv[0].conv.weight
        if type(weight) in _PLAIN_TENSORS and type(x) is torch.Tensor:
            _native.check_input(x, self._spec, weight, env[2])
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

    # -- re-parameterizing --------------------------------------------------------------------

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel and bias of the one conv equal to this block's branches in eval mode.

        Computed in at least float32 and returned in the weights' dtype; raises
        ``FuseOverflowError`` when they do not fit that dtype, ``ConfigError`` when a branch's
        conv no longer has the block's geometry (the fold would not equal the branches).
        """
        self._check_fusable()
        conv = [(branch.conv.weight, _fuse_args(branch.bn)) for branch in self.rbr_conv]
        scale = None
        if self.rbr_scale is not None:
            scale = (self.rbr_scale.conv.weight, _fuse_args(self.rbr_scale.bn))
        skip = _fuse_args(self.rbr_skip) if self.rbr_skip is not None else None
        return _native.fuse_block(self._spec, conv, scale, skip)

    def _check_fusable(self) -> None:
        _, _, _, stride, padding, dilation, groups, _, _ = self._spec
        expected = [(f"rbr_conv.{i}.conv", b.conv, padding, dilation) for i, b in enumerate(self.rbr_conv)]
        if self.rbr_scale is not None:
            expected.append(("rbr_scale.conv", self.rbr_scale.conv, 0, 1))
        for name, conv, pad, dil in expected:
            got = (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups, conv.padding_mode,
                   conv.bias is None)
            want = ((stride, stride), (pad, pad), (dil, dil), groups, "zeros", True)
            if got != want:
                raise _native.ConfigError(
                    f"cannot re-parameterize: {name} has (stride, padding, dilation, groups, padding_mode, "
                    f"no bias) = {got}, the block's are {want}; the fold would not equal the branches"
                )

    def _make_reparam_conv(self) -> nn.Conv2d:
        kernel, bias = self.fused_kernel_bias()
        _, _, k, stride, padding, dilation, groups, _, _ = self._spec
        conv = nn.Conv2d(self.in_channels, self.out_channels, k, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=True, device="meta")
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
        **options,
    ) -> None:
        """Builds the stage; raises ``ConfigError`` for invalid arguments (e.g. num_se > blocks)."""
        super().__init__()
        try:
            self.inference_mode = inference_mode
            self.use_se = use_se
            self.num_conv_branches = num_conv_branches
            plan = _native.stage_plan(in_channels, out_channels, num_blocks_per_stage, num_conv_branches,
                                      bool(use_se), num_se)
            self.stage = nn.Sequential(*[self._block(spec, inference_mode, options) for spec in plan])
        except _native.ConfigError as err:  # under YOLOv9's parse_model: name the yaml layer
            _hints.reraise_with_yaml_layer(err, type(self).__name__)
            raise

    @staticmethod
    def _block(spec, inference_mode: bool, options: dict) -> MobileOneBlock:
        cin, cout, k, stride, padding, dilation, groups, use_se, branches = spec
        return MobileOneBlock(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                              use_se=use_se, num_conv_branches=branches, inference_mode=inference_mode, **options)

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
    """Prefixes a FuseOverflowError or ConfigError with the path of the block that raised it."""
    try:
        yield
    except _native.FuseOverflowError as err:
        raise _native.FuseOverflowError(f"block {name or '<model>'!r}: {err}") from err
    except _native.ConfigError as err:
        raise _native.ConfigError(f"block {name or '<model>'!r}: {err}") from err


def safe_globals() -> list:
    """The classes a whole-module checkpoint of MobileOne modules needs under ``weights_only=True``.

    Use as ``torch.serialization.add_safe_globals(mobileone_rs.safe_globals())`` (add your own
    model's classes too); state_dicts need nothing.
    """
    return [MobileOne, MobileOneBlock, SEBlock, nn.Sequential, nn.ModuleList, nn.Conv2d, nn.BatchNorm2d,
            nn.ReLU, nn.Identity]
