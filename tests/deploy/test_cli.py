"""``python -m mobileone_rs.deploy`` on bad input: one clear line, exit status 2, nothing written in DIR."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.deploy.models import write_checkpoint
from tests.yolov9 import helpers as h

pytestmark = pytest.mark.skipif(
    h.installed_yolo9() is None, reason="yolo9 (YOLOv9 from PyPI) is not installed"
)


def run_cli(*args, env) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mobileone_rs.deploy", *map(str, args)]
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def env(patched):
    return h.subprocess_env(patched.parent)


@pytest.fixture(scope="module")
def checkpoints(yolo, tmp_path_factory):
    """A dual-head training checkpoint, the same after fuse(), and one whose yaml has a Triple head."""
    tmp = tmp_path_factory.mktemp("checkpoints")
    with h.captured_yolo_log():
        model = yolo.yolo.Model(str(h.SEED_YAML), ch=3, nc=1)
    dual = write_checkpoint(model, tmp / "dual.pt")
    with h.captured_yolo_log():
        fused = write_checkpoint(model.eval().fuse(), tmp / "fused.pt")
    triple = torch.load(dual, weights_only=False)
    triple["model"].yaml["head"][-1][2] = "TripleDDetect"
    torch.save(triple, tmp / "triple.pt")
    return {"dual": dual, "fused": fused, "triple": tmp / "triple.pt"}


def assert_refused(result, message: str, out=None) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    assert "Traceback" not in result.stderr and result.stdout == ""
    if out is not None:
        assert not out.exists() or list(out.iterdir()) == []


def test_not_a_checkpoint(tmp_path, env):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    assert_refused(
        run_cli(text, "--out", tmp_path / "out", env=env), f"{text}: not a torch checkpoint", tmp_path / "out"
    )


def test_not_a_yolov9_checkpoint(tmp_path, env):
    state = tmp_path / "state.pt"
    torch.save({"weights": torch.zeros(3)}, state)
    assert_refused(
        run_cli(state, "--out", tmp_path / "out", env=env),
        f"{state}: not a YOLOv9 checkpoint (no 'model' or 'ema' entry with a model yaml)",
        tmp_path / "out",
    )


def test_missing_file(tmp_path, env):
    assert_refused(
        run_cli(tmp_path / "none.pt", "--out", tmp_path / "out", env=env),
        f"{tmp_path / 'none.pt'}: no such file",
        tmp_path / "out",
    )


@pytest.mark.slow  # loads a 90 MB checkpoint in a subprocess
def test_fused_checkpoint(checkpoints, tmp_path, env):
    assert_refused(
        run_cli(checkpoints["fused"], "--out", tmp_path / "out", env=env),
        f"{checkpoints['fused']} holds a fused model (",
        tmp_path / "out",
    )


@pytest.mark.slow  # loads a 90 MB checkpoint in a subprocess
def test_head_that_is_not_covered(checkpoints, tmp_path, env):
    assert_refused(
        run_cli(checkpoints["triple"], "--out", tmp_path / "out", env=env),
        "the model's head is TripleDDetect: not covered (covered dual heads: DualDetect -> Detect, "
        "DualDDetect -> DDetect, DualDSegment -> DSegment)",
        tmp_path / "out",
    )


@pytest.mark.slow  # loads a 90 MB checkpoint in a subprocess
def test_empty_calibration_folder(checkpoints, tmp_path, env):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "readme.txt").write_text("no images here")
    assert_refused(
        run_cli(checkpoints["dual"], "--out", tmp_path / "out", "--int8", tmp_path / "images", env=env),
        f"--int8 {tmp_path / 'images'}: 0 images (jpg, png, ...); INT8 needs at least 2",
        tmp_path / "out",
    )


@pytest.mark.slow  # loads a 90 MB checkpoint in a subprocess
def test_missing_calibration_folder(checkpoints, tmp_path, env):
    assert_refused(
        run_cli(checkpoints["dual"], "--out", tmp_path / "out", "--int8", tmp_path / "no", env=env),
        f"--int8 {tmp_path / 'no'}: not a folder",
        tmp_path / "out",
    )


@pytest.mark.slow  # loads a 90 MB checkpoint in a subprocess
def test_unreadable_calibration_image(checkpoints, tmp_path, env):
    images = tmp_path / "images"
    h.write_synthetic_dataset(tmp_path / "data", count=2, size=64)
    (tmp_path / "data" / "images" / "train").rename(images)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert_refused(
        run_cli(checkpoints["dual"], "--out", tmp_path / "out", "--int8", images, env=env),
        f"--int8 {images}: cannot read broken.jpg as an image",
        tmp_path / "out",
    )


@pytest.mark.slow  # loads a 90 MB checkpoint in a subprocess
def test_output_folder_that_cannot_be_created(checkpoints, tmp_path, env):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_refused(
        run_cli(checkpoints["dual"], "--out", blocker / "out", env=env), f"cannot create {blocker / 'out'}"
    )
    assert blocker.read_text() == "x"


@pytest.mark.slow  # loads a 90 MB checkpoint in a subprocess
def test_image_size_not_a_multiple_of_32(checkpoints, tmp_path, env):
    assert_refused(
        run_cli(checkpoints["dual"], "--out", tmp_path / "out", "--img", 100, env=env),
        "--img 100: must be a positive multiple of 32",
        tmp_path / "out",
    )


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--calib", 0, "--calib 0: must be at least 1"),
        ("--heldout", -2, "--heldout -2: must be at least 1"),
        ("--runs", 0, "--runs 0: must be at least 1"),
        ("--opset", 8, "--opset 8: must be at least 9"),
    ],
)
def test_option_values_are_refused_before_any_work(tmp_path, env, option, value, message):
    # checked before the checkpoint is read: the missing file is not what is reported
    assert_refused(
        run_cli(tmp_path / "none.pt", "--out", tmp_path / "out", option, value, env=env),
        message,
        tmp_path / "out",
    )


@pytest.mark.parametrize("missing, int8", [("onnxruntime", False), ("onnx", False), ("cv2", True)])
def test_a_missing_package_is_named_before_any_work(tmp_path, monkeypatch, missing, int8):
    import importlib.util

    from mobileone_rs.deploy import DeployError, deploy

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a)
    )
    with pytest.raises(
        DeployError, match=r"deploy needs .*not installed: pip install 'mobileone-rs\[deploy\]'"
    ):
        deploy(tmp_path / "none.pt", tmp_path / "out", int8=tmp_path if int8 else None)
    assert not (tmp_path / "out").exists()
