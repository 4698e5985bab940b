"""A depthwise training step against an extended-precision (numpy long double) recomputation of
the reference's math: ours must be at least as accurate as float64 allows, on every output.

The reference's own float64 code is measured the same way (not asserted: it is the reference, not the
subject); ours is held to a bound a few ulps wide, including the scale kernel's gradient, which
BN makes an O(eps) difference of large terms.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests._util import build_pair, random_input, train_step

WIDE = np.longdouble
# Relative to each tensor's largest value; float64's unit roundoff is 1.1e-16.
BOUND = 4e-15


def _patches(x: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    """(N, C, k, k, OH, OW) windows of the zero-padded input."""
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (x.shape[2] + 2 * pad - k) // stride + 1
    ow = (x.shape[3] + 2 * pad - k) // stride + 1
    out = np.empty(x.shape[:2] + (k, k, oh, ow), dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            out[:, :, i, j] = padded[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride]
    return out


def _wide_step(reference: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> dict:
    """The reference's training step of one depthwise block (no SE), in long double."""
    k, stride, pad = reference.kernel_size, reference.stride, reference.kernel_size // 2
    xs = x.numpy().astype(WIDE)
    patches = _patches(xs, k, stride, pad)
    channels = xs.shape[1]
    branches = []  # (kernel (C, k, k), bn, parameter name of the kernel or None)
    for i, branch in enumerate(reference.rbr_conv):
        branches.append(
            (branch.conv.weight.detach().numpy().astype(WIDE)[:, 0], branch.bn, f"rbr_conv.{i}.conv.weight")
        )
    centre = np.zeros((channels, k, k), dtype=WIDE)
    centre[:, k // 2, k // 2] = reference.rbr_scale.conv.weight.detach().numpy().astype(WIDE)[:, 0, 0, 0]
    branches.append((centre, reference.rbr_scale.bn, "rbr_scale.conv.weight"))
    if reference.rbr_skip is not None:
        ones = np.zeros((channels, k, k), dtype=WIDE)
        ones[:, k // 2, k // 2] = 1
        branches.append((ones, reference.rbr_skip, None))
    out = 0
    saved = []
    for kernel, bn, name in branches:
        y = np.einsum("ncijhw,cij->nchw", patches, kernel)
        mean = y.mean(axis=(0, 2, 3), keepdims=True)
        var = ((y - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
        std = np.sqrt(var + WIDE(bn.eps))
        gamma = bn.weight.detach().numpy().astype(WIDE)[None, :, None, None]
        beta = bn.bias.detach().numpy().astype(WIDE)[None, :, None, None]
        out = out + gamma * (y - mean) / std + beta
        saved.append((y, mean, std, gamma, kernel, name))
    result = {"output": np.maximum(out, 0)}
    g = upstream.numpy().astype(WIDE) * (out > 0)
    count = g.shape[0] * g.shape[2] * g.shape[3]
    dpatches = np.zeros_like(patches)
    for y, mean, std, gamma, kernel, name in saved:
        centred = y - mean
        s = (g * centred).sum(axis=(0, 2, 3), keepdims=True)
        dy = gamma / std * (g - g.mean(axis=(0, 2, 3), keepdims=True) - centred * s / (count * std**2))
        dpatches += np.einsum("nchw,cij->ncijhw", dy, kernel)
        dkernel = np.einsum("nchw,ncijhw->cij", dy, patches)
        if name == "rbr_scale.conv.weight":
            result[f"{name}.grad"] = dkernel[:, k // 2, k // 2]
        elif name is not None:
            result[f"{name}.grad"] = dkernel
    dx = np.zeros((xs.shape[0], channels, xs.shape[2] + 2 * pad, xs.shape[3] + 2 * pad), dtype=WIDE)
    oh, ow = patches.shape[-2:]
    for i in range(k):
        for j in range(k):
            dx[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride] += dpatches[:, :, i, j]
    result["input.grad"] = dx[:, :, pad : pad + xs.shape[2], pad : pad + xs.shape[3]]
    return result


def _error(got: torch.Tensor, exact: np.ndarray) -> float:
    got = got.detach().numpy().astype(WIDE).reshape(exact.shape)
    return float(np.abs(got - exact).max() / np.abs(exact).max())


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_training_step_is_float64_exact(stride):
    ours, reference = build_pair(
        "MobileOneBlock", 12, 12, 3, stride=stride, padding=1, groups=12, num_conv_branches=4
    )
    # A smooth, non-negative input (as after a ReLU) makes neighbouring taps correlated.
    x = torch.nn.functional.avg_pool2d(torch.relu(random_input((2, 12, 14, 14)) + 0.3), 3, 1, 1) * 3
    got = train_step(ours, x)
    seed = train_step(reference, x)
    upstream = random_input(got["output"].shape, torch.float64, seed=2)  # train_step's upstream
    exact = _wide_step(reference, x, upstream)
    assert len(exact) == 2 + 5
    for key, value in exact.items():
        ours_err, seed_err = _error(got[key], value), _error(seed[key], value)
        assert ours_err <= BOUND, f"{key}: ours {ours_err:.1e} (the reference's float64 code: {seed_err:.1e})"
