"""Reduced precision: half/bfloat16 modules and CPU autocast behave like the oracle in that mode."""

import copy

import mobileone_rs  # noqa: F401  (build_pair imports it; fail here first if it is missing)
import pytest
import torch

from tests._util import BLOCK_ARGS, assert_close, build_pair, random_input, train_step

# Ours against the oracle run in the same reduced precision: rounding-level bounds only.
BOUND = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
LOW = list(BOUND)
CASES = {
    "skip-se": BLOCK_ARGS,
    "stride2": {"in_channels": 16, "out_channels": 16, "kernel_size": 3, "stride": 2, "padding": 1},
    "pointwise-skip": {"in_channels": 16, "out_channels": 16, "kernel_size": 1, "num_conv_branches": 2},
    "wider": {"in_channels": 8, "out_channels": 16, "kernel_size": 5, "padding": 2, "groups": 2},
}


def _low_precision_pair(key, dtype):
    ours, reference = build_pair("MobileOneBlock", **CASES[key])
    return ours.to(dtype), copy.deepcopy(reference).to(dtype)


def _input(key, dtype=torch.float32):
    return random_input((2, CASES[key]["in_channels"], 9, 7), dtype)


@pytest.mark.parametrize("dtype", LOW, ids=["half", "bfloat16"])
@pytest.mark.parametrize("key", list(CASES))
def test_low_precision_train_step_matches_oracle_in_same_dtype(key, dtype):
    ours, reference = _low_precision_pair(key, dtype)
    got, expected = train_step(ours, _input(key, dtype)), train_step(reference, _input(key, dtype))
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert_close(got[name], value, BOUND[dtype], name)


@pytest.mark.parametrize("state", ["train", "eval", "fused"])
@pytest.mark.parametrize("key", list(CASES))
def test_cpu_autocast_output_matches_oracle(key, state):
    ours, reference = build_pair("MobileOneBlock", dtype=torch.float32, **CASES[key])
    for model in (ours, reference):
        if state == "fused":
            model.reparameterize()
        model.train(state == "train")
    x = _input(key)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = ours(x), reference(x)
    # The reference's branch sum promotes a bfloat16 conv output plus a float32 BN skip to float32.
    assert got.dtype == expected.dtype
    assert_close(got, expected, BOUND[torch.bfloat16], f"autocast {state}")
