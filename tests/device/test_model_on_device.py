"""Whole stages on a device (``--device cuda``; cpu by default): reparameterize_model against the
oracle's, and AMP (float16, bfloat16) training steps against the oracle's own step under the same
autocast."""

from __future__ import annotations

import copy

import mobileone_rs
import pytest
import torch

from tests import oracle
from tests._util import SEED_STAGES, TOLERANCE, assert_close, build_pair, random_input, rel_err
from tests.device.support import assert_buffers_match, assert_matches_truth, float64_twin, train_step

# A small MobileOne stage with every block kind (dense stride-2 entry, depthwise, pointwise, SE).
STAGE = (16, 32, 2, 3, True, 1)
# Ours against the oracle under the same autocast: rounding-level bounds (as tests/block/test_precision.py).
AMP_BOUND = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _stage(dtype, device):
    ours, reference = build_pair("MobileOne", *STAGE, dtype=dtype)
    return ours.to(device), reference.to(device)


def _input(dtype, device, seed=1):
    return random_input((2, STAGE[0], 12, 10), dtype, seed).to(device)


def _yolov9_stages(dtype, device):
    """The four MobileOne stages of yolov9-c-mobileone.yaml (layers 2-5) chained, ours and the oracle's."""
    reference = torch.nn.Sequential(*[oracle.MobileOne(*args) for args, *_ in SEED_STAGES.values()])
    oracle.randomize_bn_stats(reference)
    ours = torch.nn.Sequential(*[mobileone_rs.MobileOne(*args) for args, *_ in SEED_STAGES.values()])
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours.to(device, dtype), reference.to(device, dtype)


def test_yolov9_mobileone_stages_train_step_and_fused_inference(dtype, device, record_property):
    """YOLOv9-C-MobileOne's backbone stages: a training step (output, input gradient, running
    statistics), then reparameterize_model and the fused forward, against the oracle.

    The parameter gradients through 21 BN blocks are ill-conditioned (tests/stage checks them on the CPU
    against an extended-precision recomputation); here each block's are checked by test_block_on_device,
    and the chain's largest parameter-gradient difference is recorded, not bounded."""
    ours, reference = _yolov9_stages(dtype, device)
    truth = float64_twin(reference, dtype)
    x = random_input((2, 64, 32, 32), dtype).to(device)
    got, expected = train_step(ours, x), train_step(reference, x)
    exact = train_step(truth, x.double()) if truth is not None else expected
    keys = ["output", "input.grad"]
    assert_matches_truth(
        *({k: d[k] for k in keys} for d in (got, expected)),
        {k: exact[k] for k in keys} if truth is not None else None,
        dtype,
    )
    grads = [k for k in got if k not in keys]
    record_property("chain max param-grad rel err, ours", max(rel_err(got[k], exact[k]) for k in grads))
    record_property(
        "chain max param-grad rel err, oracle", max(rel_err(expected[k], exact[k]) for k in grads)
    )
    assert_buffers_match(ours, reference, dtype, truth)
    fused = mobileone_rs.reparameterize_model(ours.eval())
    want = oracle.reparameterize_model(reference.eval())
    with torch.no_grad():
        out, expected_out = fused(x), want(x)
        exact_out = (
            oracle.reparameterize_model(truth.eval())(x.double()) if truth is not None else expected_out
        )
    own = rel_err(expected_out, exact_out)
    assert_close(out, exact_out, max(TOLERANCE[dtype], 4 * own), f"fused (oracle's own error {own:.1e})")


def test_reparameterize_model_matches_oracle(dtype, device):
    ours, reference = _stage(dtype, device)
    x = _input(dtype, device)
    fused = mobileone_rs.reparameterize_model(ours.eval())
    expected = oracle.reparameterize_model(reference.eval())
    assert all(p.device == x.device for p in fused.parameters())
    with torch.no_grad():
        got, want = fused(x), expected(x)
    truth = copy.deepcopy(expected).double() if dtype == torch.float32 else None
    if truth is None:
        assert_close(got, want, TOLERANCE[dtype], "fused stage")
    else:
        with torch.no_grad():
            exact = truth(x.double())
        own = ((want.double() - exact).abs().max() / exact.abs().max()).item()
        assert_close(
            got, exact, max(TOLERANCE[dtype], 4 * own), f"fused stage (oracle's own error {own:.1e})"
        )


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_amp_training_step_matches_oracle_amp_step(amp, device):
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        pytest.skip(f"no autocast on {device_type}")
    ours, reference = _stage(torch.float32, device)
    x = _input(torch.float32, device)
    results = []
    for model in (ours, reference):
        with torch.autocast(device_type, dtype=amp):
            results.append(train_step(model, x))
    got, expected = results
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert_close(got[key], value, AMP_BOUND[amp], key)
    for (name, a), (_, b) in zip(ours.named_buffers(), reference.named_buffers()):
        if not name.endswith("num_batches_tracked"):
            assert_close(a, b, AMP_BOUND[amp], name)
