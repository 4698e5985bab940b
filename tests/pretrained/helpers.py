"""timm's MobileOne S0-S4 as the independent oracle, and Apple-named dicts in the other schemas.

timm's ``mobileone_sX`` (``timm/models/byobnet.py``) is its own implementation of Apple's network, under
its own names: random weights with every BatchNorm's statistics and affine parameters randomized, so
that folding or swapping a branch anywhere would show in the logits.
"""

from __future__ import annotations

import pytest
import torch

from tests import oracle

timm = pytest.importorskip("timm")

VARIANTS = ("s0", "s1", "s2", "s3", "s4")
IMG = 64  # stride 32: a 2x2 map at stage 4, SE and BN batch statistics still non-trivial


def timm_model(variant: str, seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    """timm's MobileOne with random weights and randomized BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(f"mobileone_{variant}", pretrained=False)
    oracle.randomize_bn_stats(model, torch.Generator().manual_seed(seed))
    return model.to(dtype).eval()


def timm_features(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """timm's stem and four stage outputs (Apple's stage0 .. stage4)."""
    features = [model.stem(x)]
    for stage in model.stages:
        features.append(stage(features[-1]))
    return features


def images(n: int = 2, size: int = IMG, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen, dtype=torch.float64).to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| in float64; b is the reference."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max()).item()


# The schema table, written out as plain string replacements (Apple -> other), independent of
# the regular expressions in mobileone_rs.checkpoints.
MMPRETRAIN_PARTS = (
    (".rbr_conv.", ".branch_conv_list."),
    (".bn.", ".norm."),
    (".rbr_scale.", ".branch_scale."),
    (".rbr_skip.", ".branch_norm."),
    (".se.reduce.", ".se.conv1.conv."),
    (".se.expand.", ".se.conv2.conv."),
    (".reparam_conv.", ".branch_reparam."),
)


def to_mmpretrain(apple: dict) -> dict:
    """An Apple-named state dict as mmpretrain's ImageClassifier names it (``backbone.``, ``head.fc.``)."""
    out = {}
    for key, value in apple.items():
        if key.startswith("linear."):
            out["head.fc." + key.split(".", 1)[1]] = value
            continue
        for old, new in MMPRETRAIN_PARTS:
            key = key.replace(old, new)
        out["backbone." + key] = value
    return out


def to_timm(apple: dict) -> dict:
    """An Apple-named state dict as timm's ByobNet names it."""
    parts = (
        (".rbr_conv.", ".conv_kxk."),
        (".rbr_scale.", ".conv_scale."),
        (".rbr_skip.", ".identity."),
        (".se.reduce.", ".attn.fc1."),
        (".se.expand.", ".attn.fc2."),
    )
    out = {}
    for key, value in apple.items():
        if key.startswith("linear."):
            out["head.fc." + key.split(".", 1)[1]] = value
            continue
        stage, rest = key.split(".", 1)
        k = int(stage[len("stage") :])
        prefix = "stem" if k == 0 else f"stages.{k - 1}"
        key = f"{prefix}.{rest}"
        for old, new in parts:
            key = key.replace(old, new)
        out[key] = value
    return out
