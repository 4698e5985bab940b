"""A ConfigError raised while YOLOv9's parse_model builds a MobileOne layer names the yaml layer and the edit.

Without model edit 2, parse_model passes the yaml row's arguments without the input channels, and the
stage rejects them; the message must say which layer and which edit (the error alone would not).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mobileone_rs
import pytest
from mobileone_rs import MobileOne

from tests.yolov9 import helpers as h


@pytest.fixture()
def copy_dir(tmp_path: Path) -> Path:
    if h.installed_yolo9() is None:
        pytest.skip("yolo9 (YOLOv9 from PyPI) is not installed")
    return h.copy_yolo9(tmp_path)


UNPATCHED_CHANNEL_SET = """
import sys
import mobileone_rs
from yolo9.models.yolo import Model
try:
    Model(sys.argv[1], ch=3, nc=1)
except mobileone_rs.ConfigError as err:
    print(err)
"""


def test_missing_channel_set_edit_names_the_yaml_layer_and_the_edit(copy_dir: Path):
    assert h.run_patch(copy_dir, "--model-only").returncode == 0
    yolo = copy_dir / "models" / "yolo.py"
    yolo.write_text(yolo.read_text().replace(", MobileOne, MobileOneBlock}:", "}:"))
    check = h.run_patch(copy_dir, "--check", "--model-only")
    assert check.stdout.endswith("parse_model channel set (models/yolo.py)\n")
    result = subprocess.run(
        [sys.executable, "-c", UNPATCHED_CHANNEL_SET, str(h.SEED_YAML)],
        check=False, capture_output=True, text=True, env=h.subprocess_env(copy_dir.parent), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == (
        "yaml layer 2 (MobileOne [64, 2, 4, False, 0]): num_conv_branches must be an integer, got bool False. "
        "parse_model called MobileOne(64, 2, 4, False, 0): the yaml row's arguments without the input "
        "channels in front, so every argument shifted by one. models/yolo.py's parse_model lacks "
        "MobileOne in its channel set (model edit 2): run `python -m mobileone_rs.yolov9 patch PATH`"
    )


def parse_model(d, ch):
    """The loop of YOLOv9's parse_model, reduced: row index ``i``, the row's ``args`` as the call gets them."""
    for i, (f, n, m, args) in enumerate(d["backbone"] + d["head"]):
        if "prepend" in d:
            args = [ch[f], *args]
        return m(*args)


def test_the_hint_without_yolov9_code():
    row = [-1, 1, MobileOne, [64, 2, 0, False, 0]]
    with pytest.raises(mobileone_rs.ConfigError) as raised:
        parse_model({"backbone": [row], "head": []}, [3])
    assert str(raised.value).startswith(
        "yaml layer 0 (MobileOne [64, 2, 0, False, 0]): num_conv_branches must be an integer, got bool False. "
        "parse_model called MobileOne(64, 2, 0, False, 0): the yaml row's arguments without the input channels"
    )
    with pytest.raises(mobileone_rs.ConfigError) as raised:  # prepended: the layer, no edit blamed
        parse_model({"backbone": [row], "head": [], "prepend": True}, [3])
    assert str(raised.value) == (
        "yaml layer 0 (MobileOne [64, 2, 0, False, 0]): num_conv_branches must be in [1, 255], got 0"
    )
    with pytest.raises(mobileone_rs.ConfigError) as raised:  # outside parse_model: the error as it was
        MobileOne(64, 2, 4, False, 0)
    assert str(raised.value) == "num_conv_branches must be an integer, got bool False"
