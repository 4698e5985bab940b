"""The seed's four MobileOne stages: parameter counts, keys, training, fused == unfused (float64)."""

import copy

import mobileone_rs
import pytest
import torch
from torch import nn

from tests import oracle
from tests._util import (
    SEED_STAGES,
    TOLERANCE,
    assert_close,
    build_pair,
    eval_output,
    random_input,
    rel_err,
    sgd_steps,
    train_step,
)

F64 = TOLERANCE[torch.float64]


def _stage_input(name: str, seed: int = 1) -> torch.Tensor:
    _, _, channels, size = SEED_STAGES[name]
    return random_input((2, channels, size, size), seed=seed)


@pytest.mark.parametrize("name", list(SEED_STAGES))
def test_parameter_count_matches_seed_table(name):
    args, expected, _, _ = SEED_STAGES[name]
    model = mobileone_rs.MobileOne(*args)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", list(SEED_STAGES))
def test_state_dict_keys_match_oracle_before_and_after_fusing(name):
    args = SEED_STAGES[name][0]
    ours, reference = mobileone_rs.MobileOne(*args), oracle.MobileOne(*args)
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours_fused = mobileone_rs.reparameterize_model(ours)
    assert list(ours_fused.state_dict()) == list(oracle.reparameterize_model(reference).state_dict())
    built_fused = mobileone_rs.MobileOne(*args, inference_mode=True)
    assert list(built_fused.state_dict()) == list(ours_fused.state_dict())


def test_num_se_ignored_without_use_se_like_the_seed():
    args = (64, 64, 2, 4, False, 3)
    assert list(mobileone_rs.MobileOne(*args).state_dict()) == list(oracle.MobileOne(*args).state_dict())


def test_stage_is_a_sequential_of_alternating_blocks():
    ours = mobileone_rs.MobileOne(16, 32, 3, 2, True, 2)
    assert isinstance(ours.stage, nn.Sequential)
    assert len(ours.stage) == 6
    assert all(isinstance(b, mobileone_rs.MobileOneBlock) for b in ours.stage)


@pytest.mark.parametrize("name", list(SEED_STAGES))
def test_trained_stage_fused_equals_unfused(name):
    ours, _ = build_pair("MobileOne", *SEED_STAGES[name][0])
    sgd_steps(ours, _stage_input(name))
    # The reference is the oracle holding ours' trained weights, so fused is checked
    # against the seed's unfused eval forward, never against ours.
    reference = oracle.copy_weights(ours, oracle.MobileOne(*SEED_STAGES[name][0]).double())
    x = _stage_input(name, seed=7)
    expected = eval_output(reference, x)
    assert_close(eval_output(ours, x), expected, F64, "unfused eval")
    fused = mobileone_rs.reparameterize_model(ours)
    assert_close(eval_output(fused, x), expected, F64, "fused eval")


def _chained(module) -> nn.Sequential:
    return nn.Sequential(*(module.MobileOne(*args) for args, *_ in SEED_STAGES.values()))


def test_chained_stages_train_step_matches_oracle():
    reference = oracle.randomize_bn_stats(_chained(oracle)).double()
    ours = oracle.copy_weights(reference, _chained(mobileone_rs).double())
    x = random_input((2, 64, 32, 32))
    again = copy.deepcopy(reference)
    got, expected = train_step(ours, x), train_step(reference, x)
    # Gradients through 42 blocks include nearly cancelling sums (BN biases); the oracle's own
    # rounding noise on them, seen by rerunning it on a channels_last input, sets a floor.
    noise = train_step(again, x.contiguous(memory_format=torch.channels_last))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        floor = 10 * rel_err(noise[key], value)
        assert_close(got[key], value, max(F64, floor), f"{key} (oracle noise x10 {floor:.1e})")
    trained = ours.state_dict()
    for key, value in reference.state_dict().items():
        assert_close(trained[key], value, F64, f"after the step: {key}")


def test_chained_stages_trained_then_fused_match_oracle():
    ours = oracle.copy_weights(oracle.randomize_bn_stats(_chained(oracle)), _chained(mobileone_rs)).double()
    # Lock-step SGD through 42 blocks is chaotic (a 1e-15 weight change grows to 1e-4 in three
    # steps, in the oracle alone), so ours trains alone and the oracle then takes its weights.
    sgd_steps(ours, random_input((2, 64, 32, 32)))
    reference = oracle.copy_weights(ours, _chained(oracle).double())
    x = random_input((2, 64, 32, 32), seed=9)
    expected = eval_output(reference, x)
    assert_close(eval_output(ours, x), expected, F64, "chained eval")
    fused = mobileone_rs.reparameterize_model(ours)
    assert_close(eval_output(fused, x), expected, F64, "chained fused vs unfused oracle")
    fused_reference = oracle.reparameterize_model(reference)
    assert_close(eval_output(fused, x), eval_output(fused_reference, x), F64, "chained fused")
