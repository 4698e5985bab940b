"""MobileOne re-parameterizable blocks (https://arxiv.org/abs/2206.04040) for PyTorch and YOLOv9.

The modules are ordinary ``torch.nn.Module`` shells that own their parameters; the block math
(train-time branches, eval-time folding, the fused conv and re-parameterization) runs in Rust.
"""

import torch  # noqa: F401  (loads libtorch, which the extension links)

# The torch this build is for; importing ._build refuses, with a message, a torch the build does not serve.
from ._build import TORCH_BUILT_FOR, TORCH_REQUIREMENT, TORCH_SUPPORTED, _native  # noqa: F401
from ._native import (
    ArgumentTypeError,
    BlockSpec,
    ConfigError,
    FuseOverflowError,
    InputShapeError,
    InputTypeError,
    MobileOneError,
    TorchError,
    YamlError,
)
from .backbone import mobileone
from .checkpoints import CheckpointError, convert_checkpoint
from .modules import MobileOne, MobileOneBlock, SEBlock, safe_globals
from .options import Options, fast_paths, module_path
from .reparameterize import reparameterize_model
from .verify import ErrorStat, ReparamReport, verify_reparameterization

__version__ = _native.__version__  # Cargo.toml is the one version source

__all__ = [
    "ArgumentTypeError",
    "BlockSpec",
    "CheckpointError",
    "ConfigError",
    "ErrorStat",
    "FuseOverflowError",
    "InputShapeError",
    "InputTypeError",
    "MobileOne",
    "MobileOneBlock",
    "MobileOneError",
    "Options",
    "ReparamReport",
    "SEBlock",
    "TorchError",
    "YamlError",
    "__version__",
    "convert_checkpoint",
    "fast_paths",
    "mobileone",
    "module_path",
    "reparameterize_model",
    "safe_globals",
    "verify_reparameterization",
]
