"""Training checkpoints for the deploy tests, made in memory from a yaml by YOLOv9's own ``Model``."""

from __future__ import annotations

from pathlib import Path

import mobileone_rs
import torch
from torch import nn


def randomize_batch_norms(model: nn.Module, seed: int) -> nn.Module:
    """Every BatchNorm's statistics and affine parameters drawn at random (moderate: the output stays finite
    through ~100 layers), so that fusing is no identity fold."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            bn.running_var.copy_(torch.empty(c).uniform_(0.5, 2.0, generator=gen))
            bn.weight.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=gen))
            bn.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return model


def _pairs(stage: nn.Module):
    blocks = [m for m in stage.modules() if isinstance(m, mobileone_rs.MobileOneBlock)]
    for dw, pw in zip(blocks[::2], blocks[1::2], strict=True):
        if not isinstance(dw.se, nn.Identity) or dw.groups != dw.out_channels or pw.kernel_size != 1:
            continue
        yield dw, pw


def misequalize(model: nn.Module, layers: tuple[int, ...], spread: float, seed: int) -> nn.Module:
    """The same function with wide fused-kernel ranges.

    In each depthwise -> pointwise block pair of ``layers``, the depthwise block's output channel ``i``
    is scaled by ``g_i`` (every branch's BN gamma and beta) and the pointwise block divides it back out
    (its conv columns; its skip BN's statistics). ReLU between them is positively homogeneous, so the
    model's output is unchanged; cross-layer equalization can undo exactly this.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for dw, pw in _pairs(model.model[layer]):
                g = torch.exp(torch.empty(dw.out_channels).uniform_(-spread, spread, generator=gen))
                for bn in (m for m in dw.modules() if isinstance(m, nn.BatchNorm2d)):
                    bn.weight.mul_(g.to(bn.weight.dtype))
                    bn.bias.mul_(g.to(bn.bias.dtype))
                for branch in pw.rbr_conv:
                    branch.conv.weight.div_(g.view(1, -1, 1, 1).to(branch.conv.weight.dtype))
                if pw.rbr_skip is not None:
                    bn = pw.rbr_skip
                    bn.running_mean.mul_(g)
                    bn.running_var.copy_((bn.running_var + bn.eps) * g * g - bn.eps)
    return model


def write_checkpoint(model: nn.Module, path: Path) -> Path:
    """``model`` saved as train_dual.py's strip_optimizer leaves best.pt: ``{'model': half model, ...}``."""
    torch.save({"model": model.half(), "ema": None, "optimizer": None, "updates": None, "epoch": -1}, path)
    model.float()
    return path
