"""The reference's four MobileOne stages: parameter counts, keys, training, fused == unfused (float64)."""

import copy
import itertools

import mobileone_rs
import numpy as np
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


def test_num_se_ignored_without_use_se_like_the_reference():
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
    # against the reference's unfused eval forward, never against ours.
    reference = oracle.copy_weights(ours, oracle.MobileOne(*SEED_STAGES[name][0]).double())
    x = _stage_input(name, seed=7)
    expected = eval_output(reference, x)
    assert_close(eval_output(ours, x), expected, F64, "unfused eval")
    fused = mobileone_rs.reparameterize_model(ours)
    assert_close(eval_output(fused, x), expected, F64, "fused eval")


def _chained(module) -> nn.Sequential:
    return nn.Sequential(*(module.MobileOne(*args) for args, *_ in SEED_STAGES.values()))


def _with_gradient_rounding(model: nn.Module, seed: int) -> nn.Module:
    """The model with one rounding's worth of error added to the gradient reaching every block's
    input, along that input (per channel, ``d * max|g| / max|x| * x`` with ``|d|`` up to float64's
    unit roundoff). That direction is the ill-conditioned one: the next BN-normalized block is
    nearly blind to it, so the gradients of earlier scales (BN weights) are O(eps) sums there,
    and an exact backward's rounding along it, e.g. the reference's cancelling scale-branch backward,
    shows in them far above its size elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    unit = torch.finfo(torch.float64).eps

    def hook(module, args):
        x = args[0].detach()
        if not args[0].requires_grad:
            return

        def perturb(g):
            d = unit * (2 * torch.rand((1, x.shape[1], 1, 1), generator=gen, dtype=g.dtype) - 1)
            return g + d * (g.abs().max() / x.abs().max().clamp_min(1e-300)) * x

        args[0].register_hook(perturb)

    for block in model.modules():
        if isinstance(block, oracle.MobileOneBlock):
            block.register_forward_pre_hook(hook)
    return model


def _record_block_inputs(model: nn.Module, cls: type) -> tuple[list, list]:
    """Forward pre-hooks (on the blocks themselves, which keeps every path native) that record,
    in chain order, each block's name, input and the gradient reaching that input."""
    records, hooks = [], []
    for name, block in model.named_modules():
        if isinstance(block, cls):

            def record(module, args, name=name):
                entry = {"name": name, "x": args[0].detach()}
                args[0].register_hook(lambda g: entry.__setitem__("grad", g.detach()))
                records.append(entry)

            hooks.append(block.register_forward_pre_hook(record))
    return records, hooks


def _branch_sum_grad(block: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient of a block's branch sum (its ``se`` input) given the gradient of its output,
    through a copy of the oracle block run on ``x`` (ReLU and SE are well conditioned)."""
    block = copy.deepcopy(block).train()
    seen = {}

    def keep(module, args):
        args[0].retain_grad()
        seen["sum"] = args[0]

    block.se.register_forward_pre_hook(keep)
    block(x.clone().requires_grad_(True)).backward(grad_out)
    return seen["sum"].grad


def _precise_scale_grad(block: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The scale kernel's gradient of a depthwise block in extended precision (numpy longdouble),
    from its input and the gradient of its branch sum.

    BN makes this gradient O(eps / var) of the terms its backward subtracts, so it is
    ill-conditioned: a 1e-16 relative change of the upstream gradient moves it ~1e-11, and two
    exact implementations chained through 40 blocks differ there by more than 1e-10. Each side is
    therefore checked against this recomputation from its own input and upstream gradient."""
    wide = np.longdouble
    s = block.stride
    xs = x[:, :, ::s, ::s].numpy().astype(wide)
    g = g.numpy().astype(wide)
    weight = block.rbr_scale.conv.weight.detach().flatten().numpy().astype(wide)
    bn = block.rbr_scale.bn
    gamma, eps = bn.weight.detach().numpy().astype(wide), wide(bn.eps)
    result = np.zeros(len(weight), dtype=wide)
    for c in range(len(weight)):
        y = weight[c] * xs[:, c]
        centred = y - y.mean()
        var_eps = (centred * centred).mean() + eps
        a = gamma[c] / np.sqrt(var_eps)
        gc = g[:, c]
        dy = a * (gc - gc.mean()) - a * (gc * centred).sum() / (y.size * var_eps) * centred
        result[c] = (dy * xs[:, c]).sum()
    return torch.from_numpy(result.astype(np.float64)).reshape(block.rbr_scale.conv.weight.shape)


def _precise_scale_grads(reference: nn.Module, records: list) -> dict[str, torch.Tensor]:
    """Per depthwise block with a scale branch, its scale kernel's precise gradient from one
    side's recorded inputs (the next block's input gradient is this block's output gradient)."""
    precise = {}
    for entry, after in itertools.pairwise(records):
        block = reference.get_submodule(entry["name"])
        if block.rbr_scale is None:
            continue
        assert block.groups == block.in_channels == block.out_channels, entry["name"]
        g = _branch_sum_grad(block, entry["x"], after["grad"])
        precise[f"{entry['name']}.rbr_scale.conv.weight.grad"] = _precise_scale_grad(block, entry["x"], g)
    return precise


def test_chained_stages_train_step_matches_oracle():
    reference = oracle.randomize_bn_stats(_chained(oracle)).double()
    ours = oracle.copy_weights(reference, _chained(mobileone_rs).double())
    # 64x64: at 32x32 layer 5 sees 2x2 maps, its BNs average 8 values and the chain's conditioning
    # grows tenfold.
    x = random_input((2, 64, 64, 64))
    again = copy.deepcopy(reference)
    our_records, our_hooks = _record_block_inputs(ours, mobileone_rs.MobileOneBlock)
    their_records, their_hooks = _record_block_inputs(reference, oracle.MobileOneBlock)
    got, expected = train_step(ours, x), train_step(reference, x)
    for hook in our_hooks + their_hooks:
        hook.remove()
    # Scale kernels' gradients: each side against the extended-precision recomputation from its
    # own inputs (see _precise_scale_grad); the oracle's agreement validates the recomputation.
    ours_precise = _precise_scale_grads(reference, our_records)
    their_precise = _precise_scale_grads(reference, their_records)
    assert len(ours_precise) == len(their_precise) == 21
    for key, value in their_precise.items():
        assert_close(expected[key], value, 1e-9, f"{key}: the oracle vs extended precision")
        assert_close(got[key], ours_precise[key], F64, f"{key} vs extended precision")
    # Other gradients through 42 blocks are ill-conditioned too (see _with_gradient_rounding): the
    # oracle rerun on a channels_last input, and with one rounding's worth of error on every
    # block's input gradient (two draws), sets a floor per tensor.
    noise = [train_step(again, x.contiguous(memory_format=torch.channels_last))]
    noise += [train_step(_with_gradient_rounding(copy.deepcopy(again), seed), x) for seed in (0, 1)]
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key not in their_precise:
            floor = 10 * max(rel_err(run[key], value) for run in noise)
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
