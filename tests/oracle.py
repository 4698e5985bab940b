"""Independent pure-PyTorch oracle: the reference's MobileOne code with its indentation restored.

The reference (`/work/shared/seed/mobileone-yolov9.seed.txt`, after Apple's ml-mobileone,
https://arxiv.org/abs/2206.04040) lost its indentation when the page was copied. This file
restores it statement for statement, with the reference's attribute names, so that its state_dict
keys are the ones the package under test must produce.

Deliberate deviation from the reference (the only one):
  (a) The reference's ``_conv_bn`` drops ``dilation``, so its train-time kxk branches are never
      dilated while the fused ``reparam_conv`` (built from ``rbr_conv[0].conv.dilation``) is.
      Here ``_conv_bn`` takes ``dilation`` and the kxk conv branches get the block's dilation;
      the 1x1 scale branch keeps dilation 1 (a 1x1 kernel is unaffected by it). ``reparam_conv``
      then carries the same dilation, and fused == unfused holds for ``dilation > 1`` with
      "same" padding ``dilation * (kernel_size // 2)``.

Kept as in the reference, though the package may differ:
  * ``reparameterize`` calls ``detach_()`` on every parameter, which leaves the fused block's
    parameters (``reparam_conv`` and SE included) with ``requires_grad=False``.
  * ``MobileOne`` checks ``num_se > num_blocks`` only when ``use_se`` is true and validates
    nothing else.

Only torch is imported, so benchmarks can load this file by path as well.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MobileOne",
    "MobileOneBlock",
    "SEBlock",
    "copy_weights",
    "randomize_bn_stats",
    "reparameterize_model",
    "set_bn_hyperparameters",
]


class SEBlock(nn.Module):
    """Squeeze and Excite module. https://arxiv.org/pdf/1709.01507.pdf"""

    def __init__(self, in_channels: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(
            in_channels=in_channels,
            out_channels=int(in_channels * rd_ratio),
            kernel_size=1,
            stride=1,
            bias=True,
        )
        self.expand = nn.Conv2d(
            in_channels=int(in_channels * rd_ratio),
            out_channels=in_channels,
            kernel_size=1,
            stride=1,
            bias=True,
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        _b, c, h, w = inputs.size()
        x = F.avg_pool2d(inputs, kernel_size=[h, w])
        x = self.reduce(x)
        x = F.relu(x)
        x = self.expand(x)
        x = torch.sigmoid(x)
        x = x.view(-1, c, 1, 1)
        return inputs * x


class MobileOneBlock(nn.Module):
    """MobileOne building block. https://arxiv.org/pdf/2206.04040.pdf"""

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
        super().__init__()
        self.inference_mode = inference_mode
        self.groups = groups
        self.stride = stride
        self.kernel_size = kernel_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_conv_branches = num_conv_branches

        if use_se:
            self.se = SEBlock(out_channels)
        else:
            self.se = nn.Identity()
        self.activation = nn.ReLU()

        if inference_mode:
            self.reparam_conv = nn.Conv2d(
                in_channels=in_channels,
                out_channels=out_channels,
                kernel_size=kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=True,
            )
        else:
            self.rbr_skip = (
                nn.BatchNorm2d(num_features=in_channels)
                if out_channels == in_channels and stride == 1
                else None
            )
            rbr_conv = []
            for _ in range(self.num_conv_branches):
                # Deviation (a): the reference omits dilation here.
                rbr_conv.append(self._conv_bn(kernel_size=kernel_size, padding=padding, dilation=dilation))
            self.rbr_conv = nn.ModuleList(rbr_conv)
            self.rbr_scale = None
            if kernel_size > 1:
                self.rbr_scale = self._conv_bn(kernel_size=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))

        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)

        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)

        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out += self.rbr_conv[ix](x)

        return self.activation(self.se(out))

    def reparameterize(self):
        """Fold all branches into one conv (RepVGG, https://arxiv.org/pdf/2101.03697.pdf)."""
        if self.inference_mode:
            return
        kernel, bias = self._get_kernel_bias()
        self.reparam_conv = nn.Conv2d(
            in_channels=self.rbr_conv[0].conv.in_channels,
            out_channels=self.rbr_conv[0].conv.out_channels,
            kernel_size=self.rbr_conv[0].conv.kernel_size,
            stride=self.rbr_conv[0].conv.stride,
            padding=self.rbr_conv[0].conv.padding,
            dilation=self.rbr_conv[0].conv.dilation,
            groups=self.rbr_conv[0].conv.groups,
            bias=True,
        )
        self.reparam_conv.weight.data = kernel
        self.reparam_conv.bias.data = bias

        for para in self.parameters():
            para.detach_()
        self.__delattr__("rbr_conv")
        self.__delattr__("rbr_scale")
        if hasattr(self, "rbr_skip"):
            self.__delattr__("rbr_skip")

        self.inference_mode = True

    def _get_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        kernel_scale = 0
        bias_scale = 0
        if self.rbr_scale is not None:
            kernel_scale, bias_scale = self._fuse_bn_tensor(self.rbr_scale)
            pad = self.kernel_size // 2
            kernel_scale = torch.nn.functional.pad(kernel_scale, [pad, pad, pad, pad])

        kernel_identity = 0
        bias_identity = 0
        if self.rbr_skip is not None:
            kernel_identity, bias_identity = self._fuse_bn_tensor(self.rbr_skip)

        kernel_conv = 0
        bias_conv = 0
        for ix in range(self.num_conv_branches):
            _kernel, _bias = self._fuse_bn_tensor(self.rbr_conv[ix])
            kernel_conv += _kernel
            bias_conv += _bias

        kernel_final = kernel_conv + kernel_scale + kernel_identity
        bias_final = bias_conv + bias_scale + bias_identity
        return kernel_final, bias_final

    def _fuse_bn_tensor(self, branch) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(branch, nn.Sequential):
            kernel = branch.conv.weight
            running_mean = branch.bn.running_mean
            running_var = branch.bn.running_var
            gamma = branch.bn.weight
            beta = branch.bn.bias
            eps = branch.bn.eps
        else:
            assert isinstance(branch, nn.BatchNorm2d)
            if not hasattr(self, "id_tensor"):
                input_dim = self.in_channels // self.groups
                kernel_value = torch.zeros(
                    (self.in_channels, input_dim, self.kernel_size, self.kernel_size),
                    dtype=branch.weight.dtype,
                    device=branch.weight.device,
                )
                for i in range(self.in_channels):
                    kernel_value[i, i % input_dim, self.kernel_size // 2, self.kernel_size // 2] = 1
                self.id_tensor = kernel_value
            kernel = self.id_tensor
            running_mean = branch.running_mean
            running_var = branch.running_var
            gamma = branch.weight
            beta = branch.bias
            eps = branch.eps
        std = (running_var + eps).sqrt()
        t = (gamma / std).reshape(-1, 1, 1, 1)
        return kernel * t, beta - running_mean * gamma / std

    def _conv_bn(self, kernel_size: int, padding: int, dilation: int = 1) -> nn.Sequential:
        mod_list = nn.Sequential()
        mod_list.add_module(
            "conv",
            nn.Conv2d(
                in_channels=self.in_channels,
                out_channels=self.out_channels,
                kernel_size=kernel_size,
                stride=self.stride,
                padding=padding,
                dilation=dilation,
                groups=self.groups,
                bias=False,
            ),
        )
        mod_list.add_module("bn", nn.BatchNorm2d(num_features=self.out_channels))
        return mod_list


class MobileOne(nn.Module):
    """One MobileOne stage as the reference's YOLOv9 yaml uses it. https://arxiv.org/pdf/2206.04040.pdf"""

    def __init__(
        self,
        in_channels,
        out_channels,
        num_blocks_per_stage=2,
        num_conv_branches: int = 1,
        use_se: bool = False,
        num_se: int = 0,
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        self.inference_mode = inference_mode
        self.use_se = use_se
        self.num_conv_branches = num_conv_branches
        self.stage = self._make_stage(
            in_channels,
            out_channels,
            num_blocks_per_stage,
            num_se_blocks=num_se if use_se else 0,
        )

    def _make_stage(self, in_channels, out_channels, num_blocks: int, num_se_blocks: int) -> nn.Sequential:
        strides = [2] + [1] * (num_blocks - 1)
        blocks = []
        for ix, stride in enumerate(strides):
            use_se = False
            if num_se_blocks > num_blocks:
                raise ValueError("Number of SE blocks cannot exceed number of layers.")
            if ix >= (num_blocks - num_se_blocks):
                use_se = True
            blocks.append(
                MobileOneBlock(
                    in_channels=in_channels,
                    out_channels=in_channels,
                    kernel_size=3,
                    stride=stride,
                    padding=1,
                    groups=in_channels,
                    inference_mode=self.inference_mode,
                    use_se=use_se,
                    num_conv_branches=self.num_conv_branches,
                )
            )
            blocks.append(
                MobileOneBlock(
                    in_channels=in_channels,
                    out_channels=out_channels,
                    kernel_size=1,
                    stride=1,
                    padding=0,
                    groups=1,
                    inference_mode=self.inference_mode,
                    use_se=use_se,
                    num_conv_branches=self.num_conv_branches,
                )
            )
            in_channels = out_channels
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage(x)
        return x


def reparameterize_model(model: torch.nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` with every re-parameterizable module fused."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "reparameterize"):
            module.reparameterize()
    return model


# ---------------------------------------------------------------------------------------------
# Test helpers (not part of the reference).


def copy_weights(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Copy every parameter and buffer of ``src`` into ``dst`` (same state_dict keys, strict)."""
    dst.load_state_dict(src.state_dict(), strict=True)
    return dst


def randomize_bn_stats(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm2d non-trivial affine parameters and running statistics.

    running_var lies in [0.5, 2.0), weight in +-[0.5, 1.5), running_mean and bias are N(0, 0.5^2),
    num_batches_tracked in [1, 5]; so folding a BN is never close to the identity.
    """
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                _randomize_one_bn(bn, generator)
    return model


def _randomize_one_bn(bn: nn.BatchNorm2d, generator: torch.Generator | None) -> None:
    n = bn.num_features

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

    sign = torch.where(torch.rand(n, generator=generator) < 0.2, -1.0, 1.0).double()
    bn.running_mean.copy_(0.5 * torch.randn(n, generator=generator, dtype=torch.float64))
    bn.running_var.copy_(uniform(0.5, 2.0))
    bn.weight.copy_(sign * uniform(0.5, 1.5))
    bn.bias.copy_(0.5 * torch.randn(n, generator=generator, dtype=torch.float64))
    bn.num_batches_tracked.fill_(int(torch.randint(1, 6, (1,), generator=generator)))


def set_bn_hyperparameters(model: nn.Module, eps: float, momentum: float | None) -> nn.Module:
    """Overwrite eps and momentum on every BatchNorm2d, as YOLOv9's initialize_weights does."""
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.eps = eps
            bn.momentum = momentum
    return model
