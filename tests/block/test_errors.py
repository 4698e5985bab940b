"""Typed errors for bad configurations and bad inputs; never a pyo3 PanicException."""

import subprocess
import sys

import mobileone_rs
import pytest
import torch
from mobileone_rs import ConfigError, InputShapeError, InputTypeError, MobileOneError

BLOCK = mobileone_rs.MobileOneBlock
STAGE = mobileone_rs.MobileOne


def _raises(error, pattern, build):
    with pytest.raises(error, match=pattern) as info:
        build()
    assert type(info.value).__name__ != "PanicException"
    assert isinstance(info.value, MobileOneError)


def test_error_hierarchy():
    assert issubclass(ConfigError, MobileOneError) and issubclass(ConfigError, ValueError)
    assert issubclass(InputShapeError, MobileOneError) and issubclass(InputShapeError, ValueError)
    assert issubclass(InputTypeError, MobileOneError) and issubclass(InputTypeError, TypeError)
    assert issubclass(mobileone_rs.YamlError, MobileOneError)
    assert issubclass(MobileOneError, Exception)


CONFIG_ERRORS = {
    "num_se-above-num_blocks": (r"(?i)exceed|num_se|SE blocks", lambda: STAGE(64, 64, 2, 4, True, 3)),
    "stage-zero-blocks": (r"(?i)block", lambda: STAGE(64, 64, 0, 4)),
    "stage-negative-blocks": (r"(?i)block", lambda: STAGE(64, 64, -1, 4)),
    "stage-zero-branches": (r"(?i)branch", lambda: STAGE(64, 64, 2, 0)),
    "stage-zero-in": (r"(?i)channel", lambda: STAGE(0, 64, 2, 1)),
    "stage-negative-out": (r"(?i)channel", lambda: STAGE(64, -8, 2, 1)),
    "stage-se-too-narrow": (r"(?i)\bSE\b|squeeze|reduc", lambda: STAGE(8, 8, 2, 1, True, 1)),
    "block-zero-in": (r"(?i)channel", lambda: BLOCK(0, 4, 3, padding=1)),
    "block-negative-in": (r"(?i)channel", lambda: BLOCK(-4, 4, 3, padding=1)),
    "block-zero-out": (r"(?i)channel", lambda: BLOCK(4, 0, 3, padding=1)),
    "block-zero-branches": (r"(?i)branch", lambda: BLOCK(4, 4, 3, padding=1, num_conv_branches=0)),
    "block-negative-branches": (
        r"(?i)branch",
        lambda: BLOCK(4, 4, 3, padding=1, num_conv_branches=-2),
    ),
    "groups-not-dividing-out": (r"(?i)group", lambda: BLOCK(4, 6, 3, padding=1, groups=4)),
    "groups-not-dividing-in": (r"(?i)group", lambda: BLOCK(6, 4, 3, padding=1, groups=4)),
    "zero-groups": (r"(?i)group", lambda: BLOCK(4, 4, 3, padding=1, groups=0)),
    "se-out-below-16": (r"(?i)\bSE\b|squeeze|reduc", lambda: BLOCK(8, 15, 1, use_se=True)),
    "se-block-width-zero": (r"(?i)\bSE\b|squeeze|reduc|channel", lambda: mobileone_rs.SEBlock(8)),
    "even-kernel-2": (r"(?i)kernel", lambda: BLOCK(4, 4, 2, padding=1)),
    "even-kernel-4": (r"(?i)kernel", lambda: BLOCK(4, 4, 4, padding=2)),
    # The reference accepts these and fails at forward time with mismatched branch sizes.
    "padding-not-same": (r"(?i)padding", lambda: BLOCK(4, 4, 3, padding=0)),
    "padding-ignores-dilation": (r"(?i)padding", lambda: BLOCK(4, 8, 3, padding=1, dilation=2)),
    "zero-kernel": (r"(?i)kernel", lambda: BLOCK(4, 4, 0)),
}


@pytest.mark.parametrize("key", list(CONFIG_ERRORS))
def test_bad_configuration_raises_config_error(key):
    pattern, build = CONFIG_ERRORS[key]
    _raises(ConfigError, pattern, build)


def _block(state: str):
    block = BLOCK(4, 4, 3, padding=1, groups=2, num_conv_branches=2)
    if state == "fused":
        block.reparameterize()
    block.train(state == "train")
    return block


STATES = ["train", "eval", "fused"]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("shape", [(4, 8, 8), (1, 1, 4, 8, 8), (8, 8)], ids=["3d", "5d", "2d"])
def test_wrong_rank_raises_input_shape_error(state, shape):
    block = _block(state)
    _raises(InputShapeError, r"(?i)4-?D|rank|dim", lambda: block(torch.randn(*shape)))


@pytest.mark.parametrize("state", STATES)
def test_channel_mismatch_raises_input_shape_error(state):
    block = _block(state)
    _raises(InputShapeError, r"(?i)channel", lambda: block(torch.randn(2, 3, 8, 8)))


def test_stage_checks_input_shape():
    stage = STAGE(16, 32, 1, 1)
    _raises(InputShapeError, r"(?i)channel", lambda: stage(torch.randn(2, 8, 8, 8)))
    _raises(InputShapeError, r"(?i)4-?D|rank|dim", lambda: stage(torch.randn(16, 8, 8)))


@pytest.mark.parametrize("state", STATES)
def test_dtype_mismatch_raises_input_type_error(state):
    block = _block(state)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    _raises(InputTypeError, r"(?i)dtype|float", lambda: block(x))


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("value", [[[1.0, 2.0]], None, 3.0], ids=["list", "None", "float"])
def test_non_tensor_input_raises_input_type_error(state, value):
    block = _block(state)
    _raises(InputTypeError, r"(?i)tensor", lambda: block(value))


def test_import_from_another_directory():
    code = "import mobileone_rs; print(mobileone_rs.MobileOne(64, 64, 2, 4).__class__.__name__)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd="/tmp", check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MobileOne"
