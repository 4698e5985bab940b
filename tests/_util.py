"""Shared helpers: error metric, tolerances, oracle/ours pairs, one training step."""

from __future__ import annotations

import torch
from torch import nn

from tests import oracle

# max|a - b| / max|b| bounds. float64 is the equivalence bound and must never be loosened.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# float32 gradients sum many more terms (BN backward, SE), so they get one more decade.
GRAD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}

# The four MobileOne stages of the reference's yolov9-c-mobileone.yaml, as parse_model calls them,
# with the parameter counts of the reference's printed model table.
SEED_STAGES = {
    "layer2": ((64, 64, 2, 4, False, 0), 40192, 64, 32),
    "layer3": ((64, 128, 8, 4, False, 0), 548416, 64, 16),
    "layer4": ((128, 256, 10, 4, True, 1), 2651296, 128, 8),
    "layer5": ((256, 512, 1, 4, True, 1), 582192, 256, 4),
}


# A small block with every branch (kxk, scale, skip), grouped convs and SE.
BLOCK_ARGS = {
    "in_channels": 16,
    "out_channels": 16,
    "kernel_size": 3,
    "padding": 1,
    "groups": 4,
    "use_se": True,
    "num_conv_branches": 3,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|, computed in float64; b is the reference."""
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != reference {tuple(b.shape)}"
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close(actual, expected, bound: float, what: str) -> None:
    """Fail with the measured relative error when it exceeds ``bound``."""
    err = rel_err(actual, expected)
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.0e}"


def build_pair(name: str, *args, dtype=torch.float64, **kwargs) -> tuple[nn.Module, nn.Module]:
    """Build ``(ours, reference)``: reference with random BN stats, ours loaded from it."""
    import mobileone_rs

    reference = getattr(oracle, name)(*args, **kwargs)
    oracle.randomize_bn_stats(reference)
    reference.to(dtype)
    ours = getattr(mobileone_rs, name)(*args, **kwargs).to(dtype)
    oracle.copy_weights(reference, ours)
    return ours, reference


def random_input(shape, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    """A reproducible input that does not depend on how many draws came before."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def train_step(model: nn.Module, x: torch.Tensor, seed: int = 2) -> dict[str, torch.Tensor]:
    """One train-mode forward/backward; returns output, input grad and parameter grads by name."""
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    upstream = random_input(out.shape, out.dtype, seed)
    (out * upstream).sum().backward()
    result = {"output": out.detach(), "input.grad": x.grad}
    for name, param in model.named_parameters():
        result[f"{name}.grad"] = param.grad
    return result


def sgd_steps(model: nn.Module, x: torch.Tensor, steps: int = 3, lr: float = 0.05) -> list:
    """A few plain SGD steps on a fixed loss; returns the train-mode outputs of each step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    outputs = []
    model.train()
    for step in range(steps):
        opt.zero_grad()
        out = model(x)
        target = random_input(out.shape, out.dtype, seed=100 + step)
        loss = (out - target).square().mean()
        loss.backward()
        opt.step()
        outputs.append(out.detach())
    return outputs


def eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def fused_copy_of(reference: nn.Module) -> nn.Module:
    """The oracle's fused model for a reference (the reference's deep-copying reparameterize_model)."""
    return oracle.reparameterize_model(reference)


def tensors_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    """Bit-for-bit equality of two state dicts."""
    assert list(a) == list(b)
    for key, value in a.items():
        assert value.dtype == b[key].dtype, key
        assert torch.equal(value, b[key]), key
