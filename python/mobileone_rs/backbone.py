"""Apple's MobileOne S0-S4 ImageNet classifiers (https://arxiv.org/abs/2206.04040), built from our blocks.

The variant table and the network layout are those of Apple's ``mobileone.py``
(github.com/apple/ml-mobileone): a 3x3 stride-2 ``MobileOneBlock`` stem (``stage0``, one conv
branch whatever the variant), four stages of depthwise/pointwise block pairs with
``(2, 8, 10, 1)`` pairs and widths ``int(c * w)`` for ``c`` in ``(64, 128, 256, 512)``, global
average pooling and a linear classifier. S0 has 4 conv branches per stage block (the others 1); S4
has squeeze-excite in the last 5 pairs of stage 3 and the one pair of stage 4.

The module names are Apple's (``stage0``, ``stage1.{j}.rbr_conv...``, ``linear``), so Apple's
checkpoints load with ``strict=True``: train-time (``mobileone_sX_unfused.pth.tar``) into
``mobileone(variant)``, fused (``mobileone_sX.pth.tar``) into ``mobileone(variant, inference_mode=True)``.
timm's and mmpretrain's checkpoints load after :func:`mobileone_rs.convert_checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import _native
from .modules import MobileOne, MobileOneBlock

__all__ = [
    "NUM_BLOCKS",
    "VARIANTS",
    "MobileOneClassifier",
    "StageArgs",
    "Variant",
    "get_variant",
    "mobileone",
    "yaml_stages",
]

#: Block pairs per stage, the same for every variant (Apple's ``num_blocks_per_stage``).
NUM_BLOCKS = (2, 8, 10, 1)
_BASE_WIDTHS = (64, 128, 256, 512)


@dataclass(frozen=True)
class StageArgs:
    """The arguments of one stage, in the order of ``MobileOne(...)`` and of a YOLOv9 yaml row."""

    in_channels: int
    out_channels: int
    num_blocks: int
    num_conv_branches: int
    use_se: bool
    num_se: int

    def build(self, **kwargs: bool) -> MobileOne:
        """The ``MobileOne`` stage of these arguments (``kwargs``: inference_mode, options)."""
        return MobileOne(
            self.in_channels,
            self.out_channels,
            self.num_blocks,
            self.num_conv_branches,
            self.use_se,
            self.num_se,
            **kwargs,
        )


@dataclass(frozen=True)
class Variant:
    """One row of Apple's ``PARAMS`` table."""

    name: str
    width_multipliers: tuple[float, float, float, float]
    num_conv_branches: int = 1
    use_se: bool = False

    @property
    def stem_channels(self) -> int:
        """``stage0``'s output width: Apple's ``min(64, int(64 * w0))``."""
        return min(64, int(64 * self.width_multipliers[0]))

    def stages(self) -> list[StageArgs]:
        """``stage1`` .. ``stage4`` as Apple's ``_make_stage`` builds them.

        SE sits in the last ``num_blocks // 2`` pairs of stage 3 and in every pair of stage 4 when the
        variant uses SE; ``use_se`` is passed only where a stage has SE pairs.
        """
        num_se = (0, 0, NUM_BLOCKS[2] // 2, NUM_BLOCKS[3]) if self.use_se else (0, 0, 0, 0)
        stages, in_channels = [], self.stem_channels
        for base, w, blocks, se in zip(_BASE_WIDTHS, self.width_multipliers, NUM_BLOCKS, num_se):
            out_channels = int(base * w)
            stages.append(StageArgs(in_channels, out_channels, blocks, self.num_conv_branches, se > 0, se))
            in_channels = out_channels
        return stages

    @property
    def features(self) -> int:
        """The width of the last stage, the classifier's input."""
        return self.stages()[-1].out_channels


#: Apple's ``PARAMS`` (ml-mobileone ``mobileone.py``); ImageNet top-1 71.4/75.9/77.4/78.1/79.4.
VARIANTS = {
    v.name: v
    for v in (
        Variant("s0", (0.75, 1.0, 1.0, 2.0), num_conv_branches=4),
        Variant("s1", (1.5, 1.5, 2.0, 2.5)),
        Variant("s2", (1.5, 2.0, 2.5, 4.0)),
        Variant("s3", (2.0, 2.5, 3.0, 4.0)),
        Variant("s4", (3.0, 3.5, 3.5, 4.0), use_se=True),
    )
}


def get_variant(name: str) -> Variant:
    """The table row of ``name`` (``"s0"`` .. ``"s4"``, case-insensitive); ``ValueError`` otherwise."""
    key = str(name).lower()
    if key not in VARIANTS:
        raise ValueError(f"unknown MobileOne variant {name!r}; expected one of {', '.join(VARIANTS)}")
    return VARIANTS[key]


class MobileOneClassifier(nn.Module):
    """Apple's ``MobileOne`` ImageNet classifier with Apple's module names.

    ``stage1`` .. ``stage4`` are the ``stage`` sequences of our :class:`MobileOne` stages (the same
    blocks a YOLOv9 ``MobileOne`` layer holds), so each block is ``stage{k}.{j}`` as in Apple's code.
    """

    def __init__(self, variant: str = "s0", num_classes: int = 1000, inference_mode: bool = False) -> None:
        super().__init__()
        spec = get_variant(variant)
        self.variant = spec.name
        self.inference_mode = inference_mode
        self.stage0 = MobileOneBlock(
            3, spec.stem_channels, 3, stride=2, padding=1, inference_mode=inference_mode
        )
        for k, args in enumerate(spec.stages(), start=1):
            self.add_module(f"stage{k}", args.build(inference_mode=inference_mode).stage)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(spec.features, num_classes)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of ``stage0`` .. ``stage4`` (strides 2, 4, 8, 16, 32)."""
        features = []
        for k in range(5):
            x = getattr(self, f"stage{k}")(x)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits."""
        x = self.forward_features(x)[-1]
        return self.linear(torch.flatten(self.gap(x), 1))


def mobileone(
    variant: str = "s0", num_classes: int = 1000, inference_mode: bool = False
) -> MobileOneClassifier:
    """Apple's MobileOne-S0..S4 classifier (``mobileone.mobileone`` in ml-mobileone), our blocks inside.

    Args:
        variant: ``"s0"`` .. ``"s4"``.
        num_classes: classifier outputs.
        inference_mode: build fused blocks (``reparam_conv``), for Apple's fused checkpoints.
    """
    return MobileOneClassifier(variant, num_classes=num_classes, inference_mode=inference_mode)


def yaml_stages(text: str) -> list[tuple[int, StageArgs, int]]:
    """``(layer, stage args, input stride)`` of every MobileOne row of a YOLOv9 model yaml.

    Channels are resolved as YOLOv9's ``parse_model`` does (``make_divisible(c2 * width_multiple, 8)``),
    MobileOneBlock rows included. Raises ``YamlError`` for an invalid yaml.
    """
    layers = _native.yaml_mobileone_layers(text)
    return [(index, StageArgs(*args), stride) for index, args, stride in layers]
