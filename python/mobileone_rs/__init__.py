"""MobileOne re-parameterizable blocks (https://arxiv.org/abs/2206.04040) for PyTorch and YOLOv9.

The modules are ordinary ``torch.nn.Module`` shells that own their parameters; the block math
(train-time branches, eval-time folding, the fused conv and re-parameterization) runs in Rust.
"""

import torch

# The extension is compiled against libtorch 2.13 (tch 0.26 builds against 2.13 only) and links the
# installed torch's libtorch at import. These are the torch versions the whole test suite passed under
# with that build (README, "Supported torch versions"); any other is refused here, before loading it.
TORCH_BUILT_FOR = "2.13"
TORCH_SUPPORTED = ("2.13", "2.14", "2.15")
TORCH_REQUIREMENT = "torch>=2.13,<2.16"


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


if _minor(torch.__version__) not in TORCH_SUPPORTED:
    raise ImportError(
        f"mobileone_rs supports torch {', '.join(TORCH_SUPPORTED)} (its extension is built against libtorch "
        f"{TORCH_BUILT_FOR}.0) but torch {torch.__version__} is installed: pip install '{TORCH_REQUIREMENT}'"
    )

try:
    from . import _native  # torch, imported above, loads libtorch first
except ImportError as err:
    if "undefined symbol" not in str(err):
        raise
    raise ImportError(
        f"mobileone_rs's extension does not link against torch {torch.__version__}'s libtorch ({err}); it "
        f"was built against libtorch {TORCH_BUILT_FOR}.0: pip install 'torch=={TORCH_BUILT_FOR}.*'"
    ) from err
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
