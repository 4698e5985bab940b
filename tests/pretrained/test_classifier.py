"""``mobileone(variant)`` is Apple's S0-S4 classifier: timm's weights, converted, give timm's logits.

The oracle is timm's own MobileOne (random weights, randomized BN statistics) in float64; the bound is
the project's float64 equivalence bound, 1e-10 relative.
"""

from __future__ import annotations

import copy

import mobileone_rs
import pytest
import torch
from mobileone_rs.backbone import VARIANTS as TABLE

from tests.pretrained.helpers import VARIANTS, images, rel_err, timm, timm_features, timm_model, to_timm

F64 = 1e-10

# Apple's ml-mobileone mobileone.py, evaluated by hand: stage0 = min(64, int(64 * w0)), stage k =
# int(base_k * w_k), conv branches (S0: 4), SE pairs per stage (S4: stage3 10 // 2, stage4 all).
APPLE_WIDTHS = {
    "s0": (48, 48, 128, 256, 1024),
    "s1": (64, 96, 192, 512, 1280),
    "s2": (64, 96, 256, 640, 2048),
    "s3": (64, 128, 320, 768, 2048),
    "s4": (64, 192, 448, 896, 2048),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_table_is_apples(variant):
    spec = TABLE[variant]
    stages = spec.stages()
    assert (spec.stem_channels, *(s.out_channels for s in stages)) == APPLE_WIDTHS[variant]
    assert [s.num_blocks for s in stages] == [2, 8, 10, 1]
    assert {s.num_conv_branches for s in stages} == {4 if variant == "s0" else 1}
    assert [s.num_se for s in stages] == ([0, 0, 5, 1] if variant == "s4" else [0, 0, 0, 0])
    # timm's feature_info lists the same widths (stem, then each stage).
    model = timm.create_model(f"mobileone_{variant}", pretrained=False)
    assert tuple(f["num_chs"] for f in model.feature_info) == APPLE_WIDTHS[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_apple_names_and_parameter_count(variant):
    model = mobileone_rs.mobileone(variant)
    keys = list(model.state_dict())
    assert keys[0].startswith("stage0.rbr_conv.0.conv.weight") and keys[-2:] == [
        "linear.weight",
        "linear.bias",
    ]
    assert "stage1.0.rbr_conv.0.conv.weight" in keys and not any(".stage." in k for k in keys)
    assert ("stage4.1.se.reduce.weight" in keys) == (variant == "s4")
    reference = timm.create_model(f"mobileone_{variant}", pretrained=False)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    fused = mobileone_rs.mobileone(variant, inference_mode=True, num_classes=10)
    assert all(
        k.endswith(("reparam_conv.weight", "reparam_conv.bias")) or ".se." in k or k.startswith("linear.")
        for k in fused.state_dict()
    )
    assert fused.linear.out_features == 10


def _ours_from(reference: torch.nn.Module, variant: str) -> torch.nn.Module:
    converted = mobileone_rs.convert_checkpoint(reference.state_dict())
    assert (converted.source, converted.fused, converted.variant) == ("timm", False, variant)
    ours = mobileone_rs.mobileone(variant).double()
    ours.load_state_dict(converted, strict=True)
    return ours.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_timm_weights_give_timms_logits_unfused_and_fused(variant):
    reference = timm_model(variant)
    ours = _ours_from(reference, variant)
    x = images()
    with torch.no_grad():
        expected = reference(x)
        assert rel_err(ours(x), expected) <= F64
        fused = mobileone_rs.reparameterize_model(ours)
        assert rel_err(fused(x), expected) <= F64
        for got, want in zip(ours.forward_features(x), timm_features(reference, x)):
            assert rel_err(got, want) <= F64
    assert all(
        hasattr(m, "reparam_conv") for m in fused.modules() if isinstance(m, mobileone_rs.MobileOneBlock)
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_timm_fused_checkpoint_loads_into_an_inference_model(variant):
    """timm's own re-parameterization (timm.utils.reparameterize_model), converted, strict, same logits."""
    from timm.utils.model import reparameterize_model

    reference = reparameterize_model(timm_model(variant))
    converted = mobileone_rs.convert_checkpoint(reference.state_dict())
    assert (converted.source, converted.fused, converted.variant) == ("timm", True, variant)
    ours = mobileone_rs.mobileone(variant, inference_mode=True).double().eval()
    ours.load_state_dict(converted, strict=True)
    x = images(seed=2)
    with torch.no_grad():
        assert rel_err(ours(x), reference(x)) <= F64


def _train_step(model, x, target) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    out = model(x)
    (out - target).square().mean().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step_matches_timm(variant):
    """Train mode: outputs (batch statistics) and running statistics to 1e-10, gradients to timm's own
    roundoff.

    Gradients through ~40 train-mode BatchNorms are ill-conditioned: timm's own float64 gradients move
    by 1e-10..1e-8 (relative) when only the order of the batch changes, so ours are held to 10 times
    that. A batch of 4 keeps the 2x2 stage-4 maps' batch statistics well-conditioned.
    """
    reference = timm_model(variant, seed=3)
    shuffled = copy.deepcopy(reference)
    ours = _ours_from(reference, variant)
    x = images(n=4, seed=4)
    target = torch.randn(4, 1000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected, timm_grads = _train_step(reference, x, target)
    _, shuffled_grads = _train_step(shuffled, x.flip(0), target.flip(0))
    out, our_grads = _train_step(ours, x, target)
    assert rel_err(out, expected) <= F64
    timm_state, our_state = reference.state_dict(), to_timm(ours.state_dict())
    assert sorted(our_state) == sorted(timm_state)
    for key, want in timm_state.items():
        if "running_" in key:
            assert rel_err(our_state[key], want) <= F64, key
        elif key.endswith("num_batches_tracked"):
            assert torch.equal(our_state[key], want), key
    our_grads = to_timm(our_grads)
    noise = max(rel_err(shuffled_grads[k], g) for k, g in timm_grads.items())
    worst = max((rel_err(our_grads[k], g), k) for k, g in timm_grads.items())
    assert worst[0] <= max(F64, 10 * noise), (
        f"{worst[1]}: {worst[0]:.2e} (timm's own order noise {noise:.2e})"
    )
