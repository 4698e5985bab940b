"""Self-checks of the oracle (no mobileone_rs needed): if these fail, no other verdict counts."""

import pytest
import torch

from tests import oracle
from tests._util import SEED_STAGES, TOLERANCE, assert_close, eval_output, random_input


@pytest.mark.parametrize("name", list(SEED_STAGES))
def test_oracle_parameter_counts_match_seed_table(name):
    args, expected, _, _ = SEED_STAGES[name]
    model = oracle.MobileOne(*args)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize(
    "kernel, dilation, stride, groups, use_se",
    [(3, 1, 1, 1, False), (5, 2, 1, 2, False), (3, 2, 2, 16, True), (1, 1, 1, 1, True)],
)
def test_oracle_fused_equals_unfused(kernel, dilation, stride, groups, use_se):
    block = oracle.MobileOneBlock(
        16, 16, kernel, stride, dilation * (kernel // 2), dilation, groups, use_se, 3
    ).double()
    oracle.randomize_bn_stats(block)
    x = random_input((2, 16, 9, 11))
    expected = eval_output(block, x)
    fused = oracle.reparameterize_model(block)
    assert_close(eval_output(fused, x), expected, TOLERANCE[torch.float64], "oracle fused")


def test_oracle_chained_stages_fused_equals_unfused():
    net = torch.nn.Sequential(*(oracle.MobileOne(*a) for a, *_ in SEED_STAGES.values())).double()
    oracle.randomize_bn_stats(net)
    x = random_input((2, 64, 32, 32))
    expected = eval_output(net, x)
    fused = oracle.reparameterize_model(net)
    assert_close(eval_output(fused, x), expected, TOLERANCE[torch.float64], "oracle chain")


def test_oracle_num_se_above_num_blocks_is_an_error():
    with pytest.raises(ValueError, match="exceed"):
        oracle.MobileOne(64, 64, 2, 4, True, 3)
