"""A ConfigError raised while the patched parse_model builds a MobileOne layer names the yaml layer.

The patch wraps parse_model's layer construction (``m_ = ... m(*args)``); the wrapper re-raises a
``ConfigError`` with the yaml layer's index, module and arguments, and, when parse_model passed the
row's arguments without the input channels (model edit 2 missing), the edit that is missing. Nothing
else is wrapped and no stack frame is inspected: outside the patched parse_model the error is as it was.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import mobileone_rs
import pytest
from mobileone_rs import MobileOne
from mobileone_rs.yolov9 import NotYolov9Error
from mobileone_rs.yolov9.hints import add_yaml_layer_hint
from torch import nn

from tests.yolov9 import helpers as h


@pytest.fixture()
def copy_dir(tmp_path: Path) -> Path:
    if h.installed_yolo9() is None:
        pytest.skip("yolo9 (YOLOv9 from PyPI) is not installed")
    return h.copy_yolo9(tmp_path)


BUILD_FROM_YAML = """
import sys
import mobileone_rs
from yolo9.models.yolo import Model
try:
    Model(sys.argv[1], ch=3, nc=1)
    print("built")
except mobileone_rs.ConfigError as err:
    print(err)
"""


def _build(copy_dir: Path, yaml: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", BUILD_FROM_YAML, str(yaml)],
        check=False,
        capture_output=True,
        text=True,
        env=h.subprocess_env(copy_dir.parent),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_missing_channel_set_edit_names_the_yaml_layer_and_the_edit(copy_dir: Path):
    assert h.run_patch(copy_dir, "--model-only").returncode == 0
    yolo = copy_dir / "models" / "yolo.py"
    yolo.write_text(yolo.read_text().replace(", MobileOne, MobileOneBlock}:", "}:"))
    check = h.run_patch(copy_dir, "--check", "--model-only")
    assert check.stdout.endswith("parse_model channel set (models/yolo.py)\n")
    assert _build(copy_dir, h.SEED_YAML) == (
        "yaml layer 2 (MobileOne [64, 2, 4, False, 0]): num_conv_branches must be an integer, got "
        "bool False. "
        "parse_model called MobileOne(64, 2, 4, False, 0): the yaml row's arguments without the input "
        "channels in front, so every argument shifted by one. models/yolo.py's parse_model lacks "
        "MobileOne in its channel set (model edit 2): run `python -m mobileone_rs.yolov9 patch PATH`"
    )


def test_a_misspelt_bool_in_a_yaml_row_names_its_layer(copy_dir: Path, tmp_path: Path):
    """``Flase`` stays a string under parse_model (its eval's NameError is suppressed), a truthy one.

    EXPECTATION: the stage's constructor refuses a use_se that is not a bool with a ConfigError (the
    strict constructors of the package's modules, merged beside this test); the patched parse_model
    then names the layer. Without the strict constructor the model builds with squeeze-excite on and
    this test fails on its first assertion.
    """
    assert h.run_patch(copy_dir, "--model-only").returncode == 0
    yaml = tmp_path / "flase.yaml"
    yaml.write_text(h.SEED_YAML.read_text().replace("[256, 10, 4, True, 1]", "[256, 10, 4, Flase, 1]"))
    message = _build(copy_dir, yaml)
    assert message != "built", "a use_se of 'Flase' built a model (squeeze-excite on)"
    assert message.startswith("yaml layer 4 (MobileOne [256, 10, 4, 'Flase', 1]): ")
    assert "Flase" in message.split(": ", 1)[1] and "model edit 2" not in message


# parse_model's loop as YOLOv9 writes it, reduced; "prepend" stands for model edit 2.
MINI_PARSE_MODEL = """
def parse_model(d, ch):
    for i, (f, n, m, args) in enumerate(d["backbone"] + d["head"]):
        if "prepend" in d:
            args = [ch[f], *args]
        m_ = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)  # module
    return m_
"""


def _patched_parse_model():
    namespace = {"nn": nn}
    exec(add_yaml_layer_hint(MINI_PARSE_MODEL), namespace)  # noqa: S102 (the test's own source)
    return namespace["parse_model"]


def test_the_hint_edit_on_parse_models_loop():
    patched = add_yaml_layer_hint(MINI_PARSE_MODEL)
    assert add_yaml_layer_hint(patched) == patched  # idempotent
    assert "        try:\n            m_ = nn.Sequential(" in patched
    parse_model = _patched_parse_model()
    row = [-1, 1, MobileOne, [64, 2, 0, False, 0]]
    with pytest.raises(mobileone_rs.ConfigError) as raised:
        parse_model({"backbone": [row], "head": []}, [3])
    assert str(raised.value).startswith(
        "yaml layer 0 (MobileOne [64, 2, 0, False, 0]): num_conv_branches must be an integer, got "
        "bool False. "
        "parse_model called MobileOne(64, 2, 0, False, 0): the yaml row's arguments without the input "
        "channels"
    )
    twice = [-1, 2, MobileOne, [64, 2, 0, False, 0]]  # n = 2: parse_model builds an nn.Sequential
    with pytest.raises(mobileone_rs.ConfigError) as raised:  # prepended: the layer, no edit blamed
        parse_model({"backbone": [twice], "head": [], "prepend": True}, [3])
    assert str(raised.value) == (
        "yaml layer 0 (MobileOne [64, 2, 0, False, 0]): num_conv_branches must be in [1, 255], got 0"
    )


def test_other_errors_pass_through_the_patched_parse_model_unchanged():
    def broken(*args):
        raise KeyError("not ours")

    with pytest.raises(KeyError, match="not ours") as raised:
        _patched_parse_model()({"backbone": [[-1, 1, broken, [1]]], "head": []}, [3])
    assert raised.value.__cause__ is None


def test_no_stack_frame_is_inspected_outside_the_patched_parse_model():
    """A function that only looks like parse_model (name, ``i``, ``args``, ``d``) gets the plain error."""

    def parse_model(d, ch):
        for i, (f, n, m, args) in enumerate(d["backbone"]):
            return m(ch[f], *args)

    with pytest.raises(mobileone_rs.ConfigError) as raised:
        parse_model({"backbone": [[-1, 1, MobileOne, [64, 2, 0, False, 0]]]}, [3])
    assert str(raised.value) == "num_conv_branches must be in [1, 255], got 0"


def test_a_parse_model_without_the_layer_statement_is_left_alone():
    text = textwrap.dedent(
        """\
        def parse_model(d, ch):
            return build(d)
        """
    )
    assert add_yaml_layer_hint(text) == text


def test_the_patch_errors_are_mobileone_errors():
    assert issubclass(NotYolov9Error, mobileone_rs.MobileOneError)
    assert issubclass(mobileone_rs.ConfigError, mobileone_rs.MobileOneError)
