"""The deploy model equals the training model's main head; its files load where YOLOv9 loads them.

Oracles: the training checkpoint's own main-head output (``preds[0][1]``, what val_dual.py and
detect_dual.py use), computed by the unfused dual model in float64 (for the reference yaml also by the
oracle twin, whose MobileOne layers are the reference's code); YOLOv9's printed model sizes; the
hand conversion's 17,744,803 parameters (README / issue); ONNX Runtime running the written file.
"""

from __future__ import annotations

import json

import mobileone_rs
import numpy as np
import onnxruntime as ort
import pytest
import torch
from mobileone_rs.deploy import DeployError, deploy, deploy_model

from tests.deploy.models import randomize_batch_norms, write_checkpoint
from tests.yolov9 import helpers as h

pytestmark = [
    pytest.mark.skipif(h.installed_yolo9() is None, reason="yolo9 (YOLOv9 from PyPI) is not installed"),
    pytest.mark.slow,
]

IMG = 64
DATA = h.REPO / "python" / "mobileone_rs" / "data"
YAMLS = {"reference": h.SEED_YAML, **{f"s{k}": DATA / f"yolov9-c-mobileone-s{k}.yaml" for k in range(5)}}
SIZES = [(64, 64), (96, 128)]


def training_checkpoint(yolo, cfg, tmp_path, seed=0):
    with h.captured_yolo_log():
        model = yolo.yolo.Model(str(cfg), ch=3, nc=1)
    return write_checkpoint(randomize_batch_norms(model, seed), tmp_path / "best.pt")


def load_model(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"].float().eval()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Boxes (pixels) and scores (0..1) of a (batch, 4 + nc, anchors) output, each relative to its own max."""
    errs = [
        ((a - b).abs().max() / b.abs().max()).item()
        for a, b in ((actual[:, :4], expected[:, :4]), (actual[:, 4:], expected[:, 4:]))
    ]
    return max(errs)


def main_head_errors(training, deployed, dtype=torch.float64) -> list[float]:
    """Deploy output vs the dual model's main head (index 1 of its inference list) at two sizes."""
    training, deployed = training.to(dtype), deployed.to(dtype)
    errs = []
    with torch.no_grad():
        for seed, (height, width) in enumerate(SIZES):
            x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=dtype)
            errs.append(rel_err(deployed(x)[0], training(x)[0][1]))
    return errs


def ort_vs_torch(onnx_path, deployed) -> float:
    for m in deployed.modules():
        if hasattr(m, "export") and hasattr(m, "nl"):
            m.export = True
    x = torch.rand(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = deployed(x)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": x.numpy()})
    return rel_err(torch.from_numpy(got), want)


def run_deploy(yolo, cfg, tmp_path, **options):
    weights = training_checkpoint(yolo, cfg, tmp_path)
    report = deploy(weights, tmp_path / "out", img=IMG, runs=1, **options)
    return weights, report


@pytest.fixture(scope="module")
def reference(yolo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    weights, report = run_deploy(yolo, h.SEED_YAML, tmp)
    return weights, report, tmp / "out"


def test_reference_yaml_deploys_to_the_oracles_main_head(reference):
    weights, _, out = reference
    training = load_model(weights)
    oracle = h.oracle_twin(training.double())
    assert max(main_head_errors(oracle, deploy_model(training, torch.float64))) <= 1e-9
    # the written model was fused in float32: float32 rounding
    assert (
        max(main_head_errors(load_model(weights), load_model(out / "best-deploy.pt"), torch.float32)) <= 1e-4
    )


def test_reference_yaml_sizes(reference):
    _, report, out = reference
    sizes = json.loads((out / "report.json").read_text())["models"]
    assert (sizes["training"]["params"], sizes["training"]["gflops"]) == (45_970_870, 212.0)
    assert (sizes["fused_dual"]["params"], sizes["fused_dual"]["gflops"]) == (42_920_310, 196.3)
    assert (sizes["deploy"]["params"], sizes["deploy"]["gflops"]) == (17_744_803, 63.3)
    assert report.to_dict()["models"] == sizes


def test_deploy_checkpoint_loads_with_yolov9s_attempt_load(reference, yolo):
    _, _, out = reference
    with h.captured_yolo_log() as log:
        model = yolo.experimental.attempt_load(str(out / "best-deploy.pt"), device="cpu", fuse=True)
    assert type(model.model[-1]).__name__ == "DDetect"
    assert sum(p.numel() for p in model.parameters()) == 17_744_803
    assert not any(hasattr(m, "bn") for m in model.modules())  # every Conv+BN fused
    blocks = [m for m in model.modules() if isinstance(m, mobileone_rs.MobileOneBlock)]
    assert len(blocks) == 42 and all(b.inference_mode and not hasattr(b, "rbr_conv") for b in blocks)
    assert any("17744803 parameters" in line for line in log)


def test_onnx_runs_in_onnxruntime_as_torch(reference):
    _, _, out = reference
    assert ort_vs_torch(out / "best-deploy.onnx", load_model(out / "best-deploy.pt")) <= 1e-4


def test_deploy_yaml_builds_the_deploy_model(reference, yolo):
    _, _, out = reference
    with h.captured_yolo_log():
        rebuilt = yolo.yolo.Model(str(out / "best-deploy.yaml"), ch=3, nc=1)
    assert sum(p.numel() for p in rebuilt.fuse().parameters()) == 17_744_803


@pytest.mark.parametrize("name", ["s0", "s1", "s2", "s3", "s4", "yolov9-c"])
def test_deploy_equals_the_main_head(name, yolo, tmp_path):
    cfg = YAMLS.get(name) or h.installed_yolo9() / "models" / "detect" / f"{name}.yaml"
    weights, report = run_deploy(yolo, cfg, tmp_path)
    training = load_model(weights)
    assert max(main_head_errors(training, deploy_model(training, torch.float64))) <= 1e-9
    deployed = load_model(tmp_path / "out" / "best-deploy.pt")
    assert max(main_head_errors(load_model(weights), deployed, torch.float32)) <= 1e-4
    assert ort_vs_torch(tmp_path / "out" / "best-deploy.onnx", deployed) <= 1e-4
    assert (
        report.deploy_head == "DDetect"
        and report.models["deploy"]["params"] < report.models["fused_dual"]["params"]
    )


def test_half_saves_float16_fused_in_float32(yolo, tmp_path):
    _, report = run_deploy(yolo, h.SEED_YAML, tmp_path, half=True)
    saved = torch.load(tmp_path / "out" / "best-deploy.pt", weights_only=False)["model"]
    assert {p.dtype for p in saved.parameters()} == {torch.float16}
    assert report.half["overflow"] == [] and report.half["rel_error"] <= 1e-2
    assert report.errors["float64 64x64"] <= 1e-9  # the checks ran on the float32 / float64 fuse


def test_a_failure_after_verification_leaves_nothing_in_the_folder(yolo, tmp_path, monkeypatch):
    from mobileone_rs.yolov9 import deploy_check

    def broken_export(model, path, *args, **kwargs):
        path.write_bytes(b"half an onnx file")
        raise DeployError("export interrupted")

    monkeypatch.setattr(deploy_check, "export_onnx", broken_export)
    (tmp_path / "out").mkdir()
    with pytest.raises(DeployError, match="export interrupted"):
        run_deploy(yolo, h.SEED_YAML, tmp_path)
    assert list((tmp_path / "out").iterdir()) == []


def test_single_head_model_is_fused_and_verified_only(reference, yolo, tmp_path):
    _, _, out = reference
    weights = training_checkpoint(yolo, out / "best-deploy.yaml", tmp_path)
    report = deploy(weights, tmp_path / "single", img=IMG, runs=1)
    assert report.note == "no auxiliary branch: fused and verified only"
    assert (report.head, report.deploy_head) == ("DDetect", "DDetect")
    assert report.models["deploy"]["params"] == report.models["fused_dual"]["params"] == 17_744_803
    assert max(report.errors.values()) <= 1e-3 and report.errors["float64 64x64"] <= 1e-9
    assert np.isfinite(report.latency_ms["onnxruntime"])
