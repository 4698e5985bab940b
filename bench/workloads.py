"""The benchmark workloads: the reference's chained MobileOne stages and each block configuration in them.

Both sides are built from one set of weights: the reference (``tests/oracle.py``, the reference's code)
is constructed and its BatchNorms randomized, then its state_dict is loaded into ours (same keys).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import mobileone_rs
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]

# The four MobileOne stages of yolov9-c-mobileone.yaml (layers 2-5), as parse_model calls them:
# (in_channels, out_channels, num_blocks_per_stage, num_conv_branches, use_se, num_se).
SEED_STAGES = (
    (64, 64, 2, 4, False, 0),
    (64, 128, 8, 4, False, 0),
    (128, 256, 10, 4, True, 1),
    (256, 512, 1, 4, True, 1),
)
# Layer 2 sees the stem's output: 64 channels at half the image size (a 640 image -> 320).
CHAIN_IN_CHANNELS = 64


def load_oracle():
    """Imports ``tests/oracle.py`` by path (it imports only torch), without the tests package."""
    spec = importlib.util.spec_from_file_location("mobileone_oracle", REPO_ROOT / "tests" / "oracle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ORACLE = load_oracle()
IMPLS = {"ref": ORACLE, "ours": mobileone_rs}


def build_chain(impl: str) -> nn.Sequential:
    """The four stages chained, from the reference (``"ref"``) or from mobileone_rs (``"ours"``)."""
    lib = IMPLS[impl]
    return nn.Sequential(*[lib.MobileOne(*args) for args in SEED_STAGES])


def share_weights(ref: nn.Module, ours: nn.Module, seed: int = 0) -> None:
    """Gives ``ref`` non-trivial BN statistics, then loads its state_dict into ``ours`` (strict)."""
    ORACLE.randomize_bn_stats(ref, torch.Generator().manual_seed(seed))
    ours.load_state_dict(ref.state_dict(), strict=True)


def chain_pair(device: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The reference chain and ours, with identical weights, on ``device``."""
    torch.manual_seed(seed)
    ref, ours = build_chain("ref"), build_chain("ours")
    share_weights(ref, ours, seed)
    return ref.to(device), ours.to(device)


def make_input(batch: int, channels: int, size: int, device: str, seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal NCHW input."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=gen).to(device)


@dataclass(frozen=True)
class BlockCase:
    """One MobileOneBlock configuration and the square input size it sees in the chain."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    groups: int
    use_se: bool
    num_conv_branches: int
    size: int

    @property
    def name(self) -> str:
        """A short label such as ``dw3x3 s2 c64 @320`` or ``pw 128->128 skip SE @40``."""
        if self.kernel_size > 1:
            kind = f"dw{self.kernel_size}x{self.kernel_size} s{self.stride} c{self.in_channels}"
        else:
            kind = f"pw {self.in_channels}->{self.out_channels}"
        skip = " skip" if self.in_channels == self.out_channels and self.stride == 1 else ""
        se = " SE" if self.use_se else ""
        return f"{kind}{skip}{se} @{self.size}"

    def build(self, impl: str) -> nn.Module:
        """The block from the reference or from mobileone_rs."""
        return IMPLS[impl].MobileOneBlock(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            use_se=self.use_se,
            num_conv_branches=self.num_conv_branches,
        )


def _case_of(block: nn.Module, size: int) -> BlockCase:
    conv = block.rbr_conv[0].conv
    return BlockCase(
        block.in_channels,
        block.out_channels,
        block.kernel_size,
        block.stride,
        conv.padding[0],
        block.groups,
        not isinstance(block.se, nn.Identity),
        block.num_conv_branches,
        size,
    )


def _output_size(size: int, conv: nn.Conv2d) -> int:
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def block_cases(chain_size: int) -> list[BlockCase]:
    """Every distinct block configuration of the chain, in chain order, at the size it sees there."""
    cases: list[BlockCase] = []
    size = chain_size
    for block in build_chain("ref").modules():
        if not isinstance(block, ORACLE.MobileOneBlock):
            continue
        case = _case_of(block, size)
        if case not in cases:
            cases.append(case)
        size = _output_size(size, block.rbr_conv[0].conv)
    return cases


def block_pair(case: BlockCase, device: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The reference block and ours for ``case``, with identical weights, on ``device``."""
    torch.manual_seed(seed)
    ref, ours = case.build("ref"), case.build("ours")
    share_weights(ref, ours, seed)
    return ref.to(device), ours.to(device)
