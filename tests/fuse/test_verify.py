"""verify_reparameterization: exact on a trained stage, side-effect free, and it finds a bad fold.

The detection tests break the fused copy that verify builds (a wrong kernel element in one block,
as a buggy fold would produce) and check that the report names that block alone, with the error
the oracle computes for the same damage; and that a change the fold cannot represent (a circular
padding branch) is reported or refused, never passed.
"""

from __future__ import annotations

import mobileone_rs
import pytest
import torch
from mobileone_rs.verify import verify_reparameterization

from tests import oracle
from tests._util import TOLERANCE, build_pair, random_input, rel_err, sgd_steps

F64 = TOLERANCE[torch.float64]
STAGE_ARGS = (16, 32, 2, 2, True, 1)
BLOCK_NAMES = ["stage.0", "stage.1", "stage.2", "stage.3"]
BROKEN = "stage.2"  # the depthwise block of the second pair (it has a BN skip branch)
PERTURBATION = 1e-4  # relative to the largest fused kernel entry


def _trained_pair(dtype=torch.float64):
    """(ours, oracle) after a few SGD steps of ours with YOLOv9's BN eps/momentum; same weights."""
    ours, reference = build_pair("MobileOne", *STAGE_ARGS, dtype=dtype)
    for model in (ours, reference):
        oracle.set_bn_hyperparameters(model, eps=1e-3, momentum=0.03)
    sgd_steps(ours, random_input((4, 16, 12, 10), dtype, seed=5), steps=3)
    oracle.copy_weights(ours, reference)
    return ours, reference


def _example(dtype=torch.float64) -> torch.Tensor:
    return random_input((2, 16, 11, 9), dtype, seed=6)


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "modules": [name for name, _ in model.named_modules()],
    }


def _assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["modules"] == before["modules"], "the model's module tree changed (fused in place?)"
    assert after["training"] == before["training"], "training flags not restored"
    assert after["requires_grad"] == before["requires_grad"]
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"
    for name, module in model.named_modules():
        hooks = module._forward_hooks, module._forward_pre_hooks, module._backward_hooks
        assert not any(hooks), f"hooks left on {name!r}"


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_trained_stage_is_exact_and_left_unchanged(mode):
    ours, _ = _trained_pair()
    ours.train(mode != "eval")
    if mode == "mixed":
        ours.stage[1].eval()
        ours.stage[2].se.eval()
    before = _snapshot(ours)
    report = verify_reparameterization(ours, _example())
    _assert_unchanged(ours, before)
    assert torch.is_grad_enabled()
    assert [stat.name for stat in report.blocks] == BLOCK_NAMES
    for stat in [*report.blocks, report.end_to_end]:
        assert 0.0 <= stat.max_rel <= F64, f"{stat.name}: {stat.max_rel:.3e}"
        assert stat.max_abs >= 0.0
    assert report.max_rel == max(stat.max_rel for stat in [*report.blocks, report.end_to_end])


def test_float32_stage_is_within_float32_rounding():
    ours, _ = _trained_pair(torch.float32)
    report = verify_reparameterization(ours, _example(torch.float32))
    assert report.max_rel <= TOLERANCE[torch.float32], str(report)


def test_already_fused_blocks_are_not_reported():
    ours, _ = _trained_pair()
    ours.stage[0].reparameterize()
    report = verify_reparameterization(ours, _example())
    assert [stat.name for stat in report.blocks] == BLOCK_NAMES[1:]
    assert report.max_rel <= F64, str(report)


# ------------------------------------------------------------------------------------------------
# Detection.


def _perturb(block: torch.nn.Module) -> None:
    """Nudges the centre tap of channel 0's fused kernel, as a slightly wrong fold would."""
    with torch.no_grad():
        weight = block.reparam_conv.weight
        centre = weight.shape[-1] // 2
        weight[0, 0, centre, centre] += PERTURBATION * weight.abs().max()


@pytest.fixture
def broken_fold(monkeypatch):
    """Makes every reparameterize_model that verify may call damage block BROKEN of its result."""
    real = mobileone_rs.reparameterize.reparameterize_model
    calls = []

    def damaged(model, *args, **kwargs):
        fused = real(model, *args, **kwargs)
        _perturb(dict(fused.named_modules())[BROKEN])
        calls.append(1)
        return fused

    for owner in (mobileone_rs.verify, mobileone_rs.reparameterize, mobileone_rs):
        monkeypatch.setattr(owner, "reparameterize_model", damaged, raising=False)
    return calls


def _oracle_block_error(reference: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """max|damaged fused - unfused| of BROKEN on the input it sees, computed with the oracle alone."""
    reference.eval()
    fused = oracle.reparameterize_model(reference)
    _perturb(dict(fused.named_modules())[BROKEN])
    index = BLOCK_NAMES.index(BROKEN)
    with torch.no_grad():
        block_input = reference.stage[:index](x)
        want = reference.stage[index](block_input)
        got = dict(fused.named_modules())[BROKEN](block_input)
    return (got - want).abs().max().item(), rel_err(got, want)


def test_a_wrong_fused_kernel_is_found_and_localised(broken_fold):
    ours, reference = _trained_pair()
    x = _example()
    report = verify_reparameterization(ours, x)
    assert broken_fold, "verify did not build its fused copy with reparameterize_model"
    stats = {stat.name: stat for stat in report.blocks}
    expected_abs, expected_rel = _oracle_block_error(reference, x)
    assert expected_rel > 1e3 * F64  # the damage is far above the equivalence bound
    broken = stats.pop(BROKEN)
    assert broken.max_abs == pytest.approx(expected_abs, rel=1e-6), str(report)
    assert broken.max_rel == pytest.approx(expected_rel, rel=1e-6), str(report)
    # Every other block is compared on the input it saw in the unfused run, so the damage does not
    # leak into the blocks after BROKEN; it does reach the model output.
    for stat in stats.values():
        assert stat.max_rel <= F64, str(report)
    assert report.end_to_end.max_rel > 1e3 * F64, str(report)
    assert report.max_rel == pytest.approx(expected_rel, rel=1e-6)


def test_a_branch_the_fold_cannot_represent_is_reported_or_refused():
    """A circular-padding branch (the fused conv pads with zeros): a ConfigError or a large error."""
    ours, _ = _trained_pair()
    dict(ours.named_modules())[BROKEN].rbr_conv[0].conv.padding_mode = "circular"
    before = _snapshot(ours)
    try:
        report = verify_reparameterization(ours, _example())
    except mobileone_rs.MobileOneError:
        _assert_unchanged(ours, before)
        return
    _assert_unchanged(ours, before)
    stats = {stat.name: stat for stat in report.blocks}
    assert stats.pop(BROKEN).max_rel > 1e-3, str(report)
    assert all(stat.max_rel <= F64 for stat in stats.values()), str(report)
    assert report.end_to_end.max_rel > 1e-3, str(report)


def test_an_already_fused_model_says_nothing_was_checked():
    """Fused vs fused is zero by construction: the report and a warning say nothing was verified."""
    ours, _ = _trained_pair()
    assert verify_reparameterization(ours, _example()).checked
    fused = mobileone_rs.reparameterize_model(ours)
    with pytest.warns(UserWarning, match="nothing was checked"):
        report = verify_reparameterization(fused, _example())
    assert not report.checked and report.blocks == [] and report.max_rel == 0.0
    assert "nothing was checked" in str(report)
