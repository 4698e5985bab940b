"""``python -m mobileone_rs.pretrained``: init checkpoints for train_dual.py, refusals, yaml writing.

The "downloaded" checkpoints are timm MobileOnes with random weights saved to disk, as timm's
``pytorch_model.bin`` is (a plain state dict); nothing is downloaded.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mobileone_rs
import pytest
import torch
from mobileone_rs.yolov9.yamls import YAML_NAMES, yolov9_yaml

from tests.pretrained.helpers import timm_model, to_timm
from tests.yolov9 import helpers as h

SEED_YAML = h.SEED_YAML


# One OpenMP thread per subprocess: with the cores shared, OpenMP spin-waiting makes runs many times
# slower (tests/conftest.py limits the test process itself the same way).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mobileone_rs.pretrained", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD, timeout=300, check=False)


@pytest.fixture(scope="module")
def timm_s0_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "pytorch_model.bin"
    torch.save(timm_model("s0", seed=11, dtype=torch.float32).state_dict(), path)
    return path


def test_init_checkpoint_holds_the_backbone_under_yolov9_names(timm_s0_file, tmp_path):
    out = tmp_path / "init.pt"
    result = run_cli("--weights", timm_s0_file, "--cfg", YAML_NAMES["s0"], "--out", out)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "timm schema, train-time, MobileOne-S0, 1000-class classifier" in lines[0]
    table = dict(re.findall(r"^(stage\d)\s+model\.(\d)\s+\d+$", result.stdout, re.MULTILINE))
    assert table == {"stage0": "1", "stage1": "2", "stage2": "3", "stage3": "4", "stage4": "5"}
    assert re.search(r"^linear\s+-\s+2 .*1000-class ImageNet classifier", result.stdout, re.MULTILINE)
    checkpoint = torch.load(out, weights_only=False)
    state = checkpoint["model"].state_dict()
    counts = [int(n) for n in re.findall(r"^stage\d\s+model\.\d\s+(\d+)$", result.stdout, re.MULTILINE)]
    assert sum(counts) == len(state) == checkpoint["mobileone_rs"]["tensors"]
    assert f"Transferred {len(state)}/" in lines[-1] and "nothing else dropped" in lines[-1]
    # every tensor is the timm checkpoint's, renamed: model.1 <- stem, model.{k+2}.stage <- stages.k
    timm_state = torch.load(timm_s0_file, weights_only=True)
    apple = {
        k: v for k, v in mobileone_rs.convert_checkpoint(timm_state).items() if not k.startswith("linear.")
    }
    assert to_timm(apple).keys() <= timm_state.keys()
    for key, value in state.items():
        layer, rest = re.fullmatch(r"model\.(\d)\.(?:stage\.)?(.+)", key).groups()
        apple_key = "stage0." + rest if layer == "1" else f"stage{int(layer) - 1}.{rest}"
        assert value.dtype == timm_state[to_timm({apple_key: 0}).popitem()[0]].dtype
        assert torch.equal(value, apple[apple_key]), key


def test_fused_checkpoint_is_refused_for_training(tmp_path):
    from timm.utils.model import reparameterize_model

    fused = reparameterize_model(timm_model("s1", dtype=torch.float32))
    torch.save({"state_dict": fused.state_dict()}, tmp_path / "fused.pth")
    result = run_cli(
        "--weights", tmp_path / "fused.pth", "--cfg", YAML_NAMES["s1"], "--out", tmp_path / "x.pt"
    )
    assert result.returncode == 2
    assert "fused (inference)" in result.stdout
    assert "cannot initialize training" in result.stderr and "mobileone_s1_unfused.pth.tar" in result.stderr
    assert "inference_mode=True" in result.stderr
    assert not (tmp_path / "x.pt").exists()


def test_yaml_of_another_variant_is_refused(timm_s0_file, tmp_path):
    for cfg in (YAML_NAMES["s1"], SEED_YAML):
        result = run_cli("--weights", timm_s0_file, "--cfg", cfg, "--out", tmp_path / "x.pt")
        assert result.returncode == 2
        assert (
            "backbone is not MobileOne-S0's" in result.stderr
            and "yolov9-c-mobileone-s0.yaml" in result.stderr
        )


def test_foreign_checkpoint_is_refused_with_its_keys(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, tmp_path / "resnet.pth")
    result = run_cli("--weights", tmp_path / "resnet.pth", "--cfg", YAML_NAMES["s0"])
    assert result.returncode == 2 and "conv1.weight" in result.stderr and "fc.weight" in result.stderr


def test_write_yamls_into_a_yolov9_tree(tmp_path):
    (tmp_path / "models" / "detect").mkdir(parents=True)
    result = run_cli("--write-yamls", tmp_path)
    assert result.returncode == 0, result.stderr
    for variant, name in YAML_NAMES.items():
        assert (tmp_path / "models" / "detect" / name).read_text() == yolov9_yaml(variant)
    refused = run_cli("--write-yamls", tmp_path / "models")
    assert refused.returncode == 2 and "does not look like a YOLOv9 tree" in refused.stderr


@pytest.mark.slow
@pytest.mark.skipif(h.installed_yolo9() is None, reason="yolo9 (YOLOv9 from PyPI) is not installed")
def test_train_dual_starts_from_the_init_checkpoint(timm_s0_file, tmp_path):
    """train_dual.py --weights init.pt --cfg S0 yaml, one epoch: YOLOv9 transfers every backbone tensor.

    ``--freeze 6`` (layers 0-5, the backbone) makes the check exact: the trained checkpoint's backbone
    weights are still init.pt's (up to its half precision).
    """
    copy = h.copy_yolo9(tmp_path / "yolo9-copy")
    assert h.run_patch(copy).returncode == 0
    assert run_cli("--write-yamls", copy).returncode == 0
    cfg = copy / "models" / "detect" / YAML_NAMES["s0"]
    init = tmp_path / "init.pt"
    made = run_cli("--weights", timm_s0_file, "--cfg", cfg, "--out", init)
    assert made.returncode == 0, made.stderr
    tensors = torch.load(init, weights_only=False)["mobileone_rs"]["tensors"]

    data = h.write_synthetic_dataset(tmp_path / "data", count=4, size=128)
    env = h.script_env(copy.parent, tmp_path / "config")
    runs = tmp_path / "runs"
    hyp = copy / "data" / "hyps" / "hyp.scratch-high.yaml"
    train = h.cli(
        copy / "train_dual.py",
        weights=init,
        cfg=cfg,
        data=data,
        hyp=hyp,
        epochs=1,
        batch_size=2,
        workers=0,
        img=64,
        device="cpu",
        noplots=True,
        exist_ok=True,
        project=runs,
        name="ft",
        freeze=6,
    )
    result = h.run_python(train, cwd=tmp_path, env=env)
    log = result.stdout + result.stderr
    transferred = re.search(r"Transferred (\d+)/(\d+) items", log)
    assert transferred, log[-3000:]
    assert int(transferred.group(1)) == tensors

    trained = torch.load(runs / "ft" / "weights" / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert int(transferred.group(2)) == len(trained.state_dict())
    backbone_keys = [k for k in trained.state_dict() if re.match(r"model\.[1-5]\.", k)]
    assert len(backbone_keys) == tensors  # every tensor of layers 1-5, and nothing else, came from init.pt
    initial = torch.load(init, weights_only=False)["model"].state_dict()
    trained_state = trained.float().state_dict()
    for key, value in initial.items():
        if key.endswith(".weight") and value.ndim == 4:  # frozen convs (BN statistics still move)
            assert (trained_state[key] - value).abs().max() <= 1e-3 * value.abs().max(), key
