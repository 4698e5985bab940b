"""Type stubs of the native core (Rust, pyo3). The nn.Module shells in ``modules.py`` are its only
intended caller; every function validates its arguments and raises, never crashes."""

from typing import Any

import torch
from typing_extensions import TypeAlias

__all__ = [
    "TORCH_BUILDS",
    "TORCH_BUILT_FOR",
    "TORCH_REQUIREMENT",
    "TORCH_SUPPORTED",
    "ConfigError",
    "FuseOverflowError",
    "InputShapeError",
    "InputTypeError",
    "MobileOneError",
    "TorchError",
    "YamlError",
    "__version__",
    "block_forward",
    "check_input",
    "forward_path",
    "fuse_block",
    "se_forward",
    "se_reduced_channels",
    "se_relu",
    "stage_plan",
    "train_backward",
    "train_forward",
    "validate_block",
    "yaml_mobileone_layers",
]

__version__: str
# The torch this build is for (build.rs, torch-versions.txt): the libtorch version it compiled against
# ("2.13.0"), the torch minors it serves, the wheel's requirement, and the build serving each torch minor.
TORCH_BUILT_FOR: str
TORCH_SUPPORTED: tuple[str, ...]
TORCH_REQUIREMENT: str
TORCH_BUILDS: dict[str, str]

class MobileOneError(Exception): ...
class ConfigError(MobileOneError, ValueError): ...
class InputShapeError(MobileOneError, ValueError): ...
class InputTypeError(MobileOneError, TypeError): ...
class YamlError(MobileOneError, ValueError): ...
class FuseOverflowError(MobileOneError, OverflowError): ...
class TorchError(MobileOneError, RuntimeError): ...

# (in_channels, out_channels, kernel_size, stride, padding, dilation, groups, use_se, num_conv_branches)
_SpecTuple: TypeAlias = tuple[int, int, int, int, int, int, int, bool, int]
# (weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)
_FuseBn: TypeAlias = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any, Any, float]
# The shells' observations (see modules.py: _state, _env).
_BlockState: TypeAlias = tuple[Any, ...]
_Env: TypeAlias = tuple[bool, ...]

def validate_block(spec: _SpecTuple) -> None: ...
def se_reduced_channels(in_channels: int, rd_ratio: float) -> int: ...
def stage_plan(
    in_channels: int,
    out_channels: int,
    num_blocks_per_stage: int,
    num_conv_branches: int,
    use_se: bool,
    num_se: int,
) -> list[_SpecTuple]: ...
def check_input(x: torch.Tensor, spec: _SpecTuple, weight: torch.Tensor, autocast: bool) -> None: ...
def forward_path(x: torch.Tensor, block: _BlockState, env: _Env) -> tuple[str, str]: ...
def block_forward(x: torch.Tensor, block: _BlockState, env: _Env) -> torch.Tensor | str: ...
def train_forward(
    x: torch.Tensor, block: _BlockState, env: _Env, path: str
) -> tuple[torch.Tensor, list[torch.Tensor]] | None: ...
def train_backward(
    grad: torch.Tensor, x: torch.Tensor, block: _BlockState, path: str, saved: list[torch.Tensor]
) -> list[torch.Tensor] | None: ...
def se_relu(x: torch.Tensor, se: tuple[Any, ...]) -> torch.Tensor: ...
def se_forward(x: torch.Tensor, se: tuple[Any, ...], channels: int, env: _Env) -> torch.Tensor | None: ...
def fuse_block(
    spec: _SpecTuple,
    conv: list[tuple[torch.Tensor, _FuseBn]],
    scale: tuple[torch.Tensor, _FuseBn] | None,
    skip: _FuseBn | None,
) -> tuple[torch.Tensor, torch.Tensor]: ...
def yaml_mobileone_layers(
    text: str, image_channels: int = 3
) -> list[tuple[int, tuple[int, int, int, int, bool, int], int]]: ...
