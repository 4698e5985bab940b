"""Float32 accuracy of every fast path on adversarial inputs, measured against the reference's own.

For each fast path (training: ``train_gram``, ``train_depthwise_cpu``, ``train_depthwise``; eval:
``folded``, ``folded_cpu``, ``fused``, ``fused_cpu``) and each input family that makes float32
cancel (a common offset 100x the spread, strongly correlated channels, spatially smooth planes,
tiny and huge scales, near-constant channels), one step runs three ways on the same float32
values: ours in float32, the oracle (Apple's reference MobileOne as YOLOv9-MobileOne uses it) in
float32, and the oracle in float64, the truth. Every tensor the step produces (output, input and
parameter gradients, running statistics) must be within ``RATIO`` times the reference's own
float32 error of the truth. The path is asserted first, so a case cannot pass on the module path.
"""

from __future__ import annotations

import copy

import mobileone_rs
import pytest
import torch

from tests import oracle
from tests._util import rel_err

# Ours may be at most this many times further from the float64 truth than the reference in float32.
RATIO = 4.0
# Errors below two float32 ulps of a tensor's largest value count as two ulps: where the reference
# is exact to its last bit (a BN gradient it sums in float64), a float32 reduction of ours may not
# be, and that is float32's resolution, not a cancellation.
FLOOR = 2 * torch.finfo(torch.float32).eps
# Relative distance from ReLU's kink below which outputs carry no gradient in the comparison.
KINK = 1e-3


def _offset(gen, shape):
    return 100.0 + torch.randn(shape, generator=gen, dtype=torch.float64)


def _correlated(gen, shape):
    n, _, h, w = shape
    common = torch.randn((n, 1, h, w), generator=gen, dtype=torch.float64)
    return common + 1e-2 * torch.randn(shape, generator=gen, dtype=torch.float64)


def _smooth(gen, shape):
    n, c, h, w = shape
    coarse = torch.randn((n, c, 3, 3), generator=gen, dtype=torch.float64)
    fine = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    return 5.0 + fine + 1e-3 * torch.randn(shape, generator=gen, dtype=torch.float64)


def _tiny(gen, shape):
    return 1e-6 * torch.randn(shape, generator=gen, dtype=torch.float64)


def _huge(gen, shape):
    return 1e6 * torch.randn(shape, generator=gen, dtype=torch.float64)


def _near_constant(gen, shape):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    level = 3.0 * torch.randn((1, shape[1], 1, 1), generator=gen, dtype=torch.float64)
    x[:, ::2] = level[:, ::2] + 1e-4 * x[:, ::2]
    return x


FAMILIES = {
    "offset": _offset,
    "correlated": _correlated,
    "smooth": _smooth,
    "tiny": _tiny,
    "huge": _huge,
    "near-constant": _near_constant,
}


def _pointwise(c_in, c_out):
    # Four branches, as s0 and YOLOv9-MobileOne have: with fewer, train_gram is expected slower than
    # the module path and the cost rule hands the block to it.
    return {"in_channels": c_in, "out_channels": c_out, "kernel_size": 1, "num_conv_branches": 4}


def _depthwise(c, k=3, stride=1):
    return {
        "in_channels": c,
        "out_channels": c,
        "kernel_size": k,
        "stride": stride,
        "padding": k // 2,
        "groups": c,
        "num_conv_branches": 2,
    }


# name -> (expected path, block kwargs, input shape, mode, fast-path options)
CASES = {
    "gram-skip": ("train_gram", _pointwise(32, 32), (2, 32, 24, 24), "train", {}),
    "gram-wide": ("train_gram", _pointwise(256, 256), (2, 256, 48, 48), "train", {}),
    "gram-expand": ("train_gram", _pointwise(16, 48), (2, 16, 12, 12), "train", {}),
    "depthwise-cpu": ("train_depthwise_cpu", _depthwise(16), (2, 16, 14, 14), "train", {}),
    "depthwise-cpu-s2": ("train_depthwise_cpu", _depthwise(16, stride=2), (2, 16, 15, 15), "train", {}),
    "depthwise": (
        "train_depthwise",
        _depthwise(16),
        (2, 16, 14, 14),
        "train",
        {"cpu_kernel": False, "low_memory": True},
    ),
    "folded-pointwise": ("folded", _pointwise(64, 64), (2, 64, 10, 10), "eval-grad", {}),
    "folded-depthwise": ("folded", _depthwise(16), (2, 16, 14, 14), "eval-grad", {}),
    "folded-cpu": ("folded_cpu", _depthwise(16), (2, 16, 14, 14), "eval", {}),
    "folded-se": ("folded", {**_depthwise(16), "use_se": True}, (2, 16, 14, 14), "eval-grad", {}),
    "folded-pointwise-se": (
        "folded",
        {**_pointwise(64, 64), "use_se": True},
        (2, 64, 10, 10),
        "eval-grad",
        {},
    ),
    "fused-pointwise": ("fused", _pointwise(64, 64), (2, 64, 10, 10), "fused", {}),
    "fused-cpu": ("fused_cpu", _depthwise(16), (2, 16, 14, 14), "fused", {}),
}


def _models(kwargs, options):
    """(ours in float32, the oracle in float32, the oracle in float64), with the same weights."""
    gen = torch.Generator().manual_seed(7)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        reference = oracle.MobileOneBlock(**kwargs)
    oracle.randomize_bn_stats(reference, gen)
    reference.float()
    ours = mobileone_rs.MobileOneBlock(**kwargs, **options)
    oracle.copy_weights(reference, ours)
    truth = oracle.MobileOneBlock(**kwargs).double()
    oracle.copy_weights(reference, truth)
    return ours, reference, truth


def _prepare(models, mode):
    for model in models:
        model.train(mode == "train")
    if mode == "fused":
        models = [mobileone_rs.reparameterize_model(models[0])] + [
            oracle.reparameterize_model(m) for m in models[1:]
        ]
    return models


def _step(model, x, upstream, mode):
    """Forward (and backward when a gradient is wanted); every resulting tensor in float64."""
    x = x.to(next(model.parameters()).dtype).clone().requires_grad_(mode in ("train", "eval-grad"))
    with torch.set_grad_enabled(x.requires_grad):
        out = model(x)
        result = {"output": out.detach()}
        if x.requires_grad:
            (out * upstream.to(out.dtype)).sum().backward()
            result["input.grad"] = x.grad
            result.update({f"{n}.grad": p.grad for n, p in model.named_parameters() if p.grad is not None})
    result.update({n: b for n, b in model.named_buffers() if b.dtype.is_floating_point})
    return {k: v.detach().double() for k, v in result.items()}


def _out_shape(kwargs, shape):
    stride = kwargs.get("stride", 1)
    return (shape[0], kwargs["out_channels"], *[(s - 1) // stride + 1 for s in shape[2:]])


def _away_from_kink(truth, x, upstream):
    """The upstream gradient, zero where the true output is within KINK of ReLU's kink: there an
    output error of float32's size flips the ReLU mask, a discontinuity no precision removes."""
    with torch.no_grad():
        out = copy.deepcopy(truth)(x.double())
    return upstream * (out > KINK * out.abs().max()).float()


def error_ratios(case: str, family: str) -> dict[str, tuple[float, float]]:
    """Per tensor of the step: (our float32 error, the reference's float32 error) against the truth."""
    path, kwargs, shape, mode, options = CASES[case]
    gen = torch.Generator().manual_seed(11)
    x = FAMILIES[family](gen, shape).float()
    ours, reference, truth = _prepare(_models(kwargs, options), mode)
    with torch.set_grad_enabled(mode in ("train", "eval-grad")):
        probe = x.clone().requires_grad_(torch.is_grad_enabled())
        assert ours.forward_path(probe) == path, ours.forward_path(probe, explain=True)
    upstream = _away_from_kink(truth, x, torch.randn(_out_shape(kwargs, shape), generator=gen).float())
    got, ref, want = (_step(m, x, upstream, mode) for m in (ours, reference, truth))
    assert got.keys() == want.keys() == ref.keys()
    return {key: (rel_err(got[key], want[key]), rel_err(ref[key], want[key])) for key in want}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("case", list(CASES))
def test_float32_error_within_reference_error(case, family):
    worst = []
    for key, (ours, reference) in error_ratios(case, family).items():
        ratio = ours / max(reference, FLOOR)
        if ratio > RATIO:
            worst.append(f"{key}: ours {ours:.2e} vs reference {reference:.2e} ({ratio:.1f}x)")
    assert not worst, f"{case}/{family}: " + "; ".join(worst)
