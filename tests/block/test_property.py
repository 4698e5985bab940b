"""Property tests (hypothesis, derandomized): random valid blocks equal the oracle; random invalid
configurations and inputs raise the package's typed errors, never a panic or a crash.
"""

from __future__ import annotations

import mobileone_rs
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mobileone_rs import ConfigError, InputShapeError, InputTypeError, MobileOneError

from tests import oracle
from tests._util import TOLERANCE, assert_close, build_pair, eval_output, train_step

F64 = TOLERANCE[torch.float64]
PROPERTY = settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
INVALID = settings(PROPERTY, max_examples=80)


# ------------------------------------------------------------------------------------------------
# Valid configurations: ours == oracle (train output, gradients, running statistics), fused == unfused.


@st.composite
def block_configs(draw) -> dict:
    """A valid block: odd kernel, "same" padding for its dilation, groups dividing both widths."""
    groups = draw(st.sampled_from([1, 2, 4, 8]))
    use_se = draw(st.integers(0, 2)) == 0
    out_multiple = draw(st.integers(1, 3))
    if use_se:  # SE needs int(out_channels / 16) >= 1
        out_multiple = max(out_multiple, -(-16 // groups))
    kernel_size = draw(st.sampled_from([1, 3, 5]))
    dilation = draw(st.sampled_from([1, 2]))
    return {
        "in_channels": groups * draw(st.integers(1, 3)),
        "out_channels": groups * out_multiple,
        "kernel_size": kernel_size,
        "stride": draw(st.sampled_from([1, 2])),
        "padding": dilation * (kernel_size // 2),
        "dilation": dilation,
        "groups": groups,
        "use_se": use_se,
        "num_conv_branches": draw(st.integers(1, 4)),
    }


def _output_size(size: int, config: dict) -> int:
    return (size - 1) // config["stride"] + 1  # "same" padding


@PROPERTY
@given(
    config=block_configs(),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)),
    bn=st.tuples(st.sampled_from([1e-5, 1e-3]), st.sampled_from([0.1, 0.03, None])),
    seed=st.integers(0, 2**16),
)
def test_random_block_matches_oracle(config, shape, bn, seed):
    batch, height, width = shape
    # Train-mode BN needs more than one value per channel (the reference raises there too).
    assume(batch * _output_size(height, config) * _output_size(width, config) > 1)
    torch.manual_seed(seed)
    ours, reference = build_pair("MobileOneBlock", **config)
    for model in (ours, reference):
        oracle.set_bn_hyperparameters(model, eps=bn[0], momentum=bn[1])
    x = torch.randn(batch, config["in_channels"], height, width, dtype=torch.float64)

    got, expected = train_step(ours, x), train_step(reference, x)
    for name, value in expected.items():
        assert_close(got[name], value, F64, f"train {name}")
    buffers = dict(reference.named_buffers())
    for name, value in ours.named_buffers():
        assert_close(value.double(), buffers[name].double(), F64, f"running statistics {name}")

    unfused = eval_output(reference, x)
    assert_close(eval_output(ours, x), unfused, F64, "eval")
    ours.reparameterize()
    assert_close(eval_output(ours, x), unfused, F64, "fused vs unfused")


# ------------------------------------------------------------------------------------------------
# Invalid configurations.

BLOCK = mobileone_rs.MobileOneBlock
STAGE = mobileone_rs.MobileOne
SE = mobileone_rs.SEBlock
BLOCK_BASE = {
    "in_channels": 16,
    "out_channels": 16,
    "kernel_size": 3,
    "stride": 1,
    "padding": 1,
    "dilation": 1,
    "groups": 4,
    "use_se": False,
    "num_conv_branches": 2,
}
STAGE_BASE = {
    "in_channels": 16,
    "out_channels": 32,
    "num_blocks_per_stage": 2,
    "num_conv_branches": 2,
    "use_se": True,
    "num_se": 1,
}
SE_BASE = {"in_channels": 16, "rd_ratio": 0.0625}
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
NON_POSITIVE = st.integers(I64_MIN, 0)


def _above(limit: int):
    return st.integers(limit + 1, I64_MAX)


# Per (constructor, argument): integers the validation must reject, within the int64 range. SE
# in_channels stops at 0 from above: a large valid width allocates gigabytes.
INVALID_INTS = {
    (BLOCK, "in_channels"): NON_POSITIVE | _above(65536),
    (BLOCK, "out_channels"): NON_POSITIVE | _above(65536),
    (BLOCK, "kernel_size"): NON_POSITIVE | st.integers(1, 127).map(lambda n: 2 * n) | _above(255),
    (BLOCK, "stride"): NON_POSITIVE | _above(255),
    (BLOCK, "padding"): st.integers(I64_MIN, I64_MAX).filter(lambda p: p != 1),
    (BLOCK, "dilation"): NON_POSITIVE | _above(255),
    (BLOCK, "groups"): NON_POSITIVE | st.sampled_from([3, 5, 6, 7, 9, 32]) | _above(65536),
    (BLOCK, "num_conv_branches"): NON_POSITIVE | _above(255),
    (STAGE, "in_channels"): NON_POSITIVE | _above(65536),
    (STAGE, "out_channels"): NON_POSITIVE | _above(65536),
    (STAGE, "num_blocks_per_stage"): NON_POSITIVE | _above(4096),
    (STAGE, "num_conv_branches"): NON_POSITIVE | _above(255),
    (STAGE, "num_se"): st.integers(I64_MIN, -1) | st.integers(3, I64_MAX),
    (SE, "in_channels"): NON_POSITIVE,
}
BASES = {BLOCK: BLOCK_BASE, STAGE: STAGE_BASE, SE: SE_BASE}
INT_ARGUMENTS = sorted(INVALID_INTS, key=lambda k: (k[0].__name__, k[1]))


def _raised(build) -> BaseException | None:
    try:
        build()
    except BaseException as error:  # noqa: BLE001 - the class is what is under test
        return error
    return None


def _assert_typed(error, expected: type, what: str) -> None:
    assert error is not None, f"{what}: no error"
    assert type(error).__name__ != "PanicException", f"{what}: {error!r}"
    assert isinstance(error, expected), f"{what}: {type(error).__module__}.{type(error).__name__}: {error}"


@INVALID
@given(data=st.data(), key=st.sampled_from(INT_ARGUMENTS))
def test_invalid_integer_argument_raises_config_error(data, key):
    cls, name = key
    value = data.draw(INVALID_INTS[key], label=name)
    kwargs = {**BASES[cls], name: value}
    error = _raised(lambda: cls(**kwargs))
    _assert_typed(error, ConfigError, f"{cls.__name__}({name}={value})")
    assert isinstance(error, MobileOneError) and isinstance(error, ValueError)
    assert name in str(error), f"message does not name {name}: {error}"


@INVALID
@given(rd_ratio=st.floats(max_value=0.0) | st.floats(min_value=1.0, exclude_min=True) | st.just(float("nan")))
def test_invalid_se_ratio_raises_config_error(rd_ratio):
    error = _raised(lambda: SE(16, rd_ratio))
    _assert_typed(error, ConfigError, f"SEBlock(16, rd_ratio={rd_ratio})")


@pytest.mark.parametrize("width", range(1, 16))
def test_se_on_fewer_than_16_channels_raises_config_error(width):
    """Every width below 16 (exhaustive), on a block (each group count dividing it) and a stage."""
    builds = [
        lambda groups=groups: BLOCK(
            **{**BLOCK_BASE, "in_channels": width, "out_channels": width, "groups": groups, "use_se": True}
        )
        for groups in (1, 2, 4, 8)
        if width % groups == 0
    ]
    for build in [*builds, lambda: STAGE(width, width, 1, 1, True, 1)]:
        error = _raised(build)
        _assert_typed(error, ConfigError, f"SE on {width} channels")


NON_INTEGERS = st.sampled_from([3.5, 3.0, float("nan"), "a", "3", None, [3], (3,), 1j, b"3", object()])


@INVALID
@given(key=st.sampled_from(INT_ARGUMENTS), value=NON_INTEGERS)
def test_non_integer_argument_raises_type_error(key, value):
    """Observed and kept: a non-integer where an integer belongs is a TypeError (as in Python)."""
    cls, name = key
    kwargs = {**BASES[cls], name: value}
    error = _raised(lambda: cls(**kwargs))
    _assert_typed(error, TypeError, f"{cls.__name__}({name}={value!r})")


@pytest.mark.parametrize(
    "value", [np.int64(16), np.int32(16), torch.tensor(16).item()], ids=["np64", "np32", "item"]
)
def test_integer_likes_are_accepted(value):
    """Integers that are not ``int`` (numpy scalars) work, as they do for nn.Conv2d."""
    block = BLOCK(value, value, 3, padding=1, groups=4)
    stage = STAGE(value, 32, 2)
    assert block.in_channels == 16 and stage.stage[0].in_channels == 16


# ------------------------------------------------------------------------------------------------
# Integers beyond int64 and messages for non-integers: deterministic lists, one test per argument,
# so that each failure names its argument.

HUGE = [2**63, -(2**63) - 1, 10**30]


def _offenders(cls, value_of, expected: type, must_name: bool) -> list[str]:
    """Every integer argument of ``cls`` that, set to ``value_of(name)``, misses the expectation."""
    offenders = []
    for owner, name in INT_ARGUMENTS:
        for value in value_of(name):
            if owner is not cls:
                continue
            error = _raised(lambda name=name, value=value: cls(**{**BASES[cls], name: value}))
            if not isinstance(error, expected) or (must_name and name not in str(error)):
                offenders.append(f"{cls.__name__}({name}={value!r}) -> {type(error).__name__}: {error}")
    return offenders


@pytest.mark.parametrize("cls", [BLOCK, STAGE, SE], ids=lambda cls: cls.__name__)
def test_integer_beyond_int64_raises_config_error(cls):
    offenders = _offenders(cls, lambda _: HUGE, ConfigError, must_name=True)
    assert not offenders, "\n".join(offenders)


def test_se_block_rejects_a_width_that_cannot_be_allocated():
    """The block caps widths at 65536; SEBlock alone must not reach the allocator with 2^40."""
    error = _raised(lambda: SE(2**40))
    _assert_typed(error, ConfigError, "SEBlock(2**40)")


@pytest.mark.parametrize("cls", [BLOCK, STAGE, SE], ids=lambda cls: cls.__name__)
def test_non_integer_message_names_the_argument(cls):
    offenders = _offenders(cls, lambda _: ["a", 3.5], TypeError, must_name=True)
    assert not offenders, "\n".join(offenders)


# ------------------------------------------------------------------------------------------------
# Invalid inputs, on a random valid block in a random state.

WRONG_DTYPES = [
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
    torch.float16,
    torch.bfloat16,
    torch.float32,
]
NON_TENSORS = [None, 3, 2.5, "x", [[1.0, 2.0]], np.zeros((1, 4, 3, 3))]


def _model(config: dict, state: str) -> torch.nn.Module:
    model = BLOCK(**config).double()
    if state == "fused":
        model.reparameterize()
    return model.train(state == "train")


@st.composite
def bad_inputs(draw, config: dict, state: str):
    """(input, expected error class, description) for one kind of invalid input."""
    channels = config["in_channels"]
    kind = draw(st.sampled_from(["rank", "dtype", "channels", "empty", "single", "non-tensor"]))
    if kind == "rank":
        ndim = draw(st.sampled_from([0, 1, 2, 3, 5, 6]))
        shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
        return torch.zeros(shape, dtype=torch.float64), InputShapeError, f"{ndim}-D"
    if kind == "dtype":
        dtype = draw(st.sampled_from(WRONG_DTYPES))
        return torch.zeros(2, channels, 5, 5).to(dtype), InputTypeError, str(dtype)
    if kind == "channels":
        wrong = draw(st.integers(1, 2 * channels + 1).filter(lambda c: c != channels))
        return torch.zeros(2, wrong, 5, 5, dtype=torch.float64), InputShapeError, f"{wrong} channels"
    if kind == "empty":
        height, width = draw(st.sampled_from([(0, 5), (5, 0), (0, 0)]))
        return torch.zeros(2, channels, height, width, dtype=torch.float64), InputShapeError, "empty"
    if kind == "single" and state == "train":
        # The reference's BN raises this ValueError (after counting the batch); so do ours.
        return torch.zeros(1, channels, 1, 1, dtype=torch.float64), ValueError, "one value per channel"
    value = draw(st.sampled_from(NON_TENSORS))
    return value, InputTypeError, type(value).__name__


@INVALID
@given(data=st.data(), config=block_configs(), state=st.sampled_from(["train", "eval", "fused"]))
def test_invalid_input_raises_typed_error(data, config, state):
    model = _model(config, state)
    x, expected, what = data.draw(bad_inputs(config, state))
    error = _raised(lambda: model(x))
    _assert_typed(error, expected, f"{state} block, {what} input")
    assert isinstance(error, MobileOneError) or expected is ValueError


@PROPERTY
@given(
    config=block_configs(),
    state=st.sampled_from(["train", "eval", "fused"]),
    value=st.sampled_from([1e300, -1e300, -1e6, float("inf"), float("-inf"), float("nan")]),
)
def test_extreme_input_values_run(config, state, value):
    """Huge, negative and non-finite values are data, not errors: the output has the oracle's shape."""
    torch.manual_seed(0)
    ours, reference = build_pair("MobileOneBlock", **config)
    for model in (ours, reference):
        if state == "fused":
            model.reparameterize()
        model.train(state == "train")
    x = torch.full((2, config["in_channels"], 5, 4), value, dtype=torch.float64)
    with torch.no_grad():
        assert ours(x).shape == reference(x).shape
